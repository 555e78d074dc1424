"""Stage 4, finetune + evaluate.

Shards cache raw CLIP image features (ID train/test, evaluation OOD sets, kept synthetic images);
``finalize`` trains the SynOOD residual adapter and the negative-label text features as released,
a separate Multi-OS adapter, scores every method on the same features (each at its reference
temperature and prompt template) and writes metrics and the report.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass

import numpy as np

from ood_core.config import RunConfig
from ood_core.identity import data_content, key_dump
from ood_core.stages.base import (
    ID_PROMPT,
    STAGES,
    ShardOutput,
    ShardPlan,
    Stage,
    StageContext,
    check_not_all_failed,
    chunk,
    guarded,
    memo,
    npy_bytes,
    npy_load,
    row,
)
from ood_core.storage import StageStore
from schemas import FINETUNE

FEATURE_SHARD = 256
BASELINES = ("mcm", "energy", "max_logit", "neglabel", "eoe", "mm_ood")


@STAGES.register("finetune")
class FinetuneStage(Stage):
    name = "finetune"
    schema = FINETUNE
    upstream = ("sketch", "elaborate")
    models = ("clip",)
    round_window = ("elaborate",)

    def window_size(self, cfg: RunConfig) -> int:
        return cfg.finetune.rounds_window

    def config_slice(self, cfg: RunConfig) -> dict:
        return {
            "seed": cfg.seed,
            "data": data_content(cfg.data, cfg.seed),
            "clip": cfg.models.clip.model_dump(mode="json"),
            # the window's effect is the set of rounds it reads, which the key hashes as upstream
            # folders (so the same set gives the same key, and a window of 1 keeps the old keys)
            "finetune": {k: v for k, v in key_dump(cfg.finetune).items() if k != "rounds_window"},
        }

    def shard_slice(self, cfg: RunConfig) -> dict:
        # the feature cache depends on the images and CLIP only: a new lr reuses the features
        return {
            "seed": cfg.seed,
            "data": data_content(cfg.data, cfg.seed),
            "clip": cfg.models.clip.model_dump(mode="json"),
            "feature_shard": FEATURE_SHARD,
            # raw (unnormalised) features: SynOOD's adapter takes them; scores normalise
            "features": "raw",
        }

    def listed_bad_inputs(self, ctx: StageContext) -> list:
        from ood_core.data import list_ood_set

        bad = list(ctx.dataset.bad_inputs)
        for name in ctx.cfg.data.ood_sets:
            bad += list_ood_set(name, ctx.cfg.data, ctx.cfg.seed)[1]
        return bad

    # ------------------------------------------------------------ plan: feature cache
    def plan(self, ctx: StageContext) -> list[ShardPlan]:
        n_id = len(ctx.dataset.classnames)
        dups = _cross_dups(ctx)
        kept = [r for r in window_rows(ctx, status="kept") if r["key"] not in dups]
        if not kept:
            raise RuntimeError(
                "finetune: elaborate kept no synthetic image; see the rejection reasons with "
                "`synth-ood status` and loosen elaborate.max_id_confidence or elaborate.dedup_cosine"
            )
        # only the ID train images training reads get a feature (ImageNet: ~1k sources, not 1.28M)
        train = used_train_keys(ctx, kept)
        items = [
            {"key": r.key, "role": f"id_{r.split}", "class_idx": r.class_idx, "label_idx": r.class_idx}
            for r in ctx.dataset.records
            if r.split != "train" or train is None or r.key in train
        ]
        for name, recs in _ood_sets(ctx).items():
            items += [{"key": r.key, "role": f"ood:{name}", "class_idx": -1, "label_idx": -1} for r in recs.values()]
        items += [
            {
                "key": r["key"],
                "role": "synthetic",
                "class_idx": r["class_idx"],
                "label_idx": n_id + r["neg_index"],
                "up_shard": r["shard"],
                # an earlier round's image: which folder, under which key (this round's need neither)
                **({"up": r["up"], "up_key": r["up_key"]} if "up" in r else {}),
            }
            for r in kept
        ]
        return chunk(items, FEATURE_SHARD)

    def run_shard(self, ctx: StageContext, shard: ShardPlan) -> ShardOutput:
        from PIL import Image

        from ood_core.data import load_image

        size = ctx.cfg.data.image_size
        ood = {k: rec for recs in _ood_sets(ctx).values() for k, rec in recs.items()}
        by_folder: dict[str, list[dict]] = {}
        for it in shard.items:
            if it["role"] == "synthetic":
                by_folder.setdefault(it.get("up", "elaborate"), []).append(it)
        syn_files = {}
        for up, its in by_folder.items():
            files = ctx.upstream[up].load_samples({it.get("up_key", it["key"]) for it in its},
                                                  {it["up_shard"] for it in its})
            syn_files.update({it["key"]: files[it.get("up_key", it["key"])] for it in its
                              if it.get("up_key", it["key"]) in files})
        out = ShardOutput()
        images, loaded = [], []

        def load(it: dict) -> None:
            if it["role"] == "synthetic":
                images.append(Image.open(io.BytesIO(syn_files[it["key"]]["png"])).convert("RGB"))
            else:
                rec = ood[it["key"]] if it["role"].startswith("ood:") else ctx.records[it["key"]]
                images.append(load_image(rec, size))
            loaded.append(it)

        for it in shard.items:
            cols = {"role": it["role"], "class_idx": it["class_idx"], "label_idx": it["label_idx"]}
            guarded(out, it["key"], lambda it=it: load(it), **cols)
        feats = ctx.models.clip().encode_images(images, normalize=False).numpy().astype(np.float32) if images else []
        for it, f in zip(loaded, feats, strict=True):
            r = row(it["key"], "ok", "ok", None, role=it["role"], class_idx=it["class_idx"], label_idx=it["label_idx"])
            out.add(r, {"npy": npy_bytes(f)})
        check_not_all_failed(self.name, shard, out)
        return out

    # ------------------------------------------------------------ finalize: train + evaluate
    def finalize(self, ctx: StageContext) -> dict:
        import torch
        import torch.nn.functional as F

        from ood_core.adapter import train_image_adapter, train_negative_text, train_negative_text_released
        from ood_core.classnames import prompt_set_names
        from ood_core.metrics import id_accuracy, ood_metrics, roc_curve
        from ood_core.models import resolve_device
        from ood_core.scores import SCORES, ScoreContext, score_temperature

        fc = ctx.cfg.finetune
        log = ctx.log
        device = resolve_device(ctx.cfg.models.device)
        # 1. cached raw features: one array per role
        by_role = load_role_features(ctx.store)
        dim = next(b.feats.shape[1] for b in by_role.values() if len(b))

        def raw(role: str, keys: list[str] | None = None) -> torch.Tensor:
            block = by_role.get(role)
            if block is None:
                return torch.zeros((0, dim))
            return torch.from_numpy(block.feats if keys is None else block.feats[block.positions(keys)])

        # 2. text features, each method with its reference template and class-name list
        classnames = ctx.dataset.classnames
        n_id = len(classnames)

        names = prompt_set_names(fc.id_names, ctx.dataset)

        def id_texts(template: str, prompts: str) -> torch.Tensor:
            return ctx.text_features([template.format(c) for c in names[prompts]])

        id_mm = id_texts(ID_PROMPT, "mm_ood")  # MM-OOD / Multi-OS: the project's ID prompt
        id_eoe, id_neg = id_texts(fc.eoe_template, "eoe"), id_texts(fc.neglabel_template, "neglabel")
        id_syn = id_texts(fc.synood_id_template, "synood")
        neg_text = ctx.negative_text_features
        sketch_rows = ctx.upstream_rows("sketch")
        outliers, *further_sets = eoe_label_sets(sketch_rows)
        leaked = [r for r in sketch_rows if r.get("leakage")]
        out_mm = ctx.text_features([ID_PROMPT.format(t) for t in outliers]) if outliers else None
        out_eoe = ctx.text_features([fc.eoe_template.format(t) for t in outliers]) if outliers else None
        out_eoe_sets = [ctx.text_features([fc.eoe_template.format(t) for t in labels]) for labels in further_sets
                        if labels and outliers]
        mm_labels = mm_ood_labels(ctx)  # MM-OOD: sketched + elaborated labels, near/far mixed
        mm_text = ctx.text_features([ID_PROMPT.format(t) for t in mm_labels]) if mm_labels else None
        log(f"[finetune] outlier labels: EOE {len(outliers)} sketched ({1 + len(further_sets)} label set(s)), "
            f"MM-OOD {len(mm_labels)} sketched + elaborated")
        all_synthetic = by_role.get("synthetic", RoleFeatures.empty(dim))
        syn = by_role["synthetic"] = select_synthetic(ctx, all_synthetic)

        # 3. SynOOD: the adapter on the chosen kinds, and one per finetune.kind_sets entry
        kept_rows = window_rows(ctx, status="kept")
        source_of = {r["key"]: r["source_key"] for r in kept_rows}

        def fit_synood(syn: RoleFeatures, tag: str = "") -> dict:
            """SynOOD's adapter and text side trained on the synthetic features ``syn`` (``tag``: log prefix)."""
            # image side: source ID images paired 1:1 with their kept synthetic images
            neg_index = torch.from_numpy(syn.label_idx - n_id)
            id_keys: list[str] | None = []
            if fc.synood_data == "sources":
                # a source whose feature failed to load leaves its synthetic image unpaired (still trained on)
                cached = by_role["id_train"].positions_of() if "id_train" in by_role else {}
                paired = [j for j, k in enumerate(syn.keys) if source_of.get(k) in cached]
                id_keys = [source_of[syn.keys[j]] for j in paired]
                id_cls = syn.class_idx[paired].tolist()
            if fc.synood_data == "all" or not id_keys:
                if fc.synood_data == "sources":
                    # text-to-image samples have no source image (finetune.synthetic_kinds without boundary)
                    log(f"[finetune] {tag}no kept synthetic image has a source ID image: the adapter trains on the "
                        "whole ID train split instead (as synood_data: all)")
                id_keys = None
                id_cls = by_role["id_train"].class_idx.tolist() if "id_train" in by_role else []
            x_syn = torch.from_numpy(syn.feats)
            x_train = torch.cat([raw("id_train", id_keys), x_syn])
            used = torch.unique(neg_index)  # only the negatives assigned to kept images are classes
            y_train = torch.cat([torch.tensor(id_cls), n_id + torch.searchsorted(used, neg_index)])
            log(f"[finetune] {tag}training adapter on {len(x_train)} cached features ({len(syn)} synthetic, "
                f"{len(used)} negative labels)")
            adapter, img_hist = train_image_adapter(
                x_train, y_train, torch.cat([id_syn, neg_text[used]]), fc, seed=ctx.cfg.seed,
                loss=fc.loss, num_id=n_id, device=device,
                progress=lambda e, loss: log(f"[finetune] {tag}adapter epoch {e + 1}/{fc.epochs} loss {loss:.4f}"),
            )
            # 3b. SynOOD text side
            txt_progress = lambda e, loss: log(f"[finetune] {tag}negatives epoch {e + 1}/{fc.text_epochs} loss {loss:.4f}")  # noqa: E731
            text_set = text_side_set(fc.synood_text_data, syn.rows(), all_synthetic.rows(), kept_rows,
                                     ctx.negatives[0], n_id)
            log(f"[finetune] {tag}text side ({fc.synood_text_data}): {len(text_set)} images, by kind "
                f"{format_kinds(text_set)}")
            used_negatives = len({t["neg_index"] for t in text_set})
            if fc.synood_text == "released" and used_negatives == 1 and fc.text_epochs:
                # the released loss is a softmax over the used negatives only: with one there is nothing to learn
                log(f"[finetune] {tag}warning: every text-side image is assigned the same negative label "
                    f"('{ctx.negatives[0][text_set[0]['neg_index']]}'): the released text side's loss is zero and "
                    "no negative is tuned; more varied synthetic images, or finetune.synood_text: joint, give it a "
                    "signal")
            if fc.synood_text == "released":
                neg_raw = ctx.models.clip().encode_texts(ctx.negatives[1], normalize=False)
                tuned_np, _, txt_hist = train_negative_text_released(
                    torch.from_numpy(all_synthetic.feats[all_synthetic.positions([t["key"] for t in text_set])]),
                    torch.tensor([t["neg_index"] for t in text_set]), neg_raw, fc,
                    seed=ctx.cfg.seed, progress=txt_progress, device=device)
                tuned_neg = torch.from_numpy(tuned_np)
            else:
                with torch.no_grad():
                    x_adapted = adapter(x_train)
                y_joint = torch.cat([torch.tensor(id_cls), n_id + neg_index])
                tuned_neg, txt_hist = train_negative_text(
                    x_adapted, y_joint, id_syn, neg_text, fc, seed=ctx.cfg.seed, progress=txt_progress,
                    device=device)
            return {"syn": syn, "adapter": adapter, "tuned_neg": tuned_neg, "img_hist": img_hist,
                    "txt_hist": txt_hist, "x_train": x_train, "x_syn": x_syn, "id_cls": id_cls,
                    "text_set": text_set, "used_negatives": used_negatives}

        main = fit_synood(syn)
        adapter, tuned_neg, img_hist, txt_hist = main["adapter"], main["tuned_neg"], main["img_hist"], main["txt_hist"]
        x_train, x_syn, id_cls, text_set = main["x_train"], main["x_syn"], main["id_cls"], main["text_set"]
        used_negatives = main["used_negatives"]
        # the training sets by kind, each on the same cached features (one row each, in one run)
        kind_of = kind_by_key(ctx)
        set_fits: dict[str, dict] = {}
        set_info: dict[str, dict] = {}
        for set_name, kinds in fc.kind_sets.items():
            counts = {k: sum(kind_of.get(key, "boundary") == k for key in all_synthetic.keys) for k in kinds}
            info = {"kinds": list(kinds), "synthetic_by_kind": counts}
            missing = [k for k, n in counts.items() if n == 0]
            if missing:
                reason = (f"no kept synthetic image of kind {', '.join(missing)} (generate.t2i_kinds and "
                          "elaborate's filters decide which kinds are kept)")
                log(f"[finetune] synood[{set_name}] skipped: {reason}")
                set_info[set_name] = {**info, "status": "skipped", "reason": reason}
                continue
            fit = set_fits[set_name] = fit_synood(select_synthetic(ctx, all_synthetic, kinds), f"synood[{set_name}]: ")
            set_info[set_name] = {**info, "status": "trained", "samples": len(fit["x_train"]),
                                  "synthetic": len(fit["syn"]), "id": len(fit["x_train"]) - len(fit["syn"]),
                                  "text_side_kinds": _kind_counts(fit["text_set"]),
                                  "used_negatives": fit["used_negatives"]}

        # 3c. Multi-OS: its own adapter, contrastive image-text objective, its synthesised texts as text side
        mos_adapter, mos_text, mos_train = None, None, {}
        if fc.multi_os and fc.multi_os_data == "multi_os":
            mos_rows, mos_texts, mos_idx = multi_os_training_set(ctx, all_synthetic.rows())
            if mos_rows:
                # pull the cached ID train images together (the sources; all of train with synood_data:
                # all), push each synthesised image to its own text
                mos_text = ctx.text_features([ID_PROMPT.format(t) for t in mos_texts])
                mos_pos = all_synthetic.positions([r["key"] for r in mos_rows])
                x_mos = torch.cat([raw("id_train"), torch.from_numpy(all_synthetic.feats[mos_pos])])
                id_train_cls = by_role["id_train"].class_idx if "id_train" in by_role else np.zeros(0, np.int64)
                y_mos = torch.cat([torch.from_numpy(id_train_cls), n_id + torch.tensor(mos_idx, dtype=torch.long)])
                mos_train = {"synthetic_keys": [r["key"] for r in mos_rows], "texts": mos_texts}
            else:
                log("[finetune] no kept multi_os image-text pair: the Multi-OS row is left out (see generate's "
                    "multi_os rows and elaborate's reasons)")
        elif fc.multi_os and out_mm is not None:  # boundary_nearest: SynOOD's images, nearest outlier label
            mos_text = out_mm
            x_mos = x_train
            y_mos = torch.cat([torch.tensor(id_cls), n_id + (F.normalize(x_syn, dim=-1) @ out_mm.T).argmax(-1)])
            mos_train = {"synthetic_keys": list(syn.keys), "texts": outliers}
        if mos_text is not None:
            log(f"[finetune] multi-os ({fc.multi_os_data}): {len(mos_train['synthetic_keys'])} synthetic images, "
                f"{len(mos_train['texts'])} texts")
            mos_adapter, _ = train_image_adapter(
                x_mos, y_mos, torch.cat([id_mm, mos_text]), fc, seed=ctx.cfg.seed,
                loss="ce+contrastive", num_id=n_id, device=device,
                progress=lambda e, loss: log(f"[finetune] multi-os epoch {e + 1}/{fc.epochs} loss {loss:.4f}"),
            )

        # 4. score every method on the same features
        eval_roles = ["id_test"] + sorted(r for r in by_role if r.startswith("ood:"))
        texts = {  # method -> (ID texts, negative texts, outlier texts)
            "mcm": (id_eoe, None, None), "energy": (id_eoe, None, None), "max_logit": (id_eoe, None, None),
            "neglabel": (id_neg, neg_text, None), "eoe": (id_eoe, None, out_eoe), "mm_ood": (id_mm, None, mm_text),
        }
        scores: dict[str, dict[str, np.ndarray]] = {}
        for role in eval_roles:
            x_raw = raw(role)
            x = F.normalize(x_raw, dim=-1)
            for method in BASELINES:
                idt, negt, outt = texts[method]
                if method in ("eoe", "mm_ood") and outt is None:
                    continue
                sc = ScoreContext(image_feats=x, id_text_feats=idt, neg_text_feats=negt, outlier_text_feats=outt,
                                  outlier_sets=out_eoe_sets if method == "eoe" else [], cfg=fc, seed=ctx.cfg.seed,
                                  device=device)
                scores.setdefault(method, {})[role] = np.asarray(SCORES.get(method)(sc))
            with torch.no_grad():
                xa = adapter(x_raw)
            # SynOOD is NegLabel on the adapted features and tuned negatives (the grouping is shared)
            tuned = ScoreContext(image_feats=xa, id_text_feats=id_neg, neg_text_feats=tuned_neg, cfg=fc,
                                 seed=ctx.cfg.seed, device=device)
            scores.setdefault("synood", {})[role] = np.asarray(SCORES.get("neglabel")(tuned))
            for set_name, fit in set_fits.items():
                with torch.no_grad():
                    xs = fit["adapter"](x_raw)
                variant = ScoreContext(image_feats=xs, id_text_feats=id_neg, neg_text_feats=fit["tuned_neg"], cfg=fc,
                                       seed=ctx.cfg.seed, device=device)
                scores.setdefault(f"synood[{set_name}]", {})[role] = np.asarray(SCORES.get("neglabel")(variant))
            if mos_adapter is not None:
                with torch.no_grad():
                    xm = mos_adapter(x_raw)
                mos = ScoreContext(image_feats=xm, id_text_feats=id_mm, outlier_text_feats=mos_text, cfg=fc,
                                   device=device)
                scores.setdefault("multi_os", {})[role] = np.asarray(SCORES.get("mm_ood")(mos))
        temperatures = {m: score_temperature(m, fc) for m in scores}

        # 5. metrics per OOD set and averaged
        results: dict[str, dict[str, dict]] = {}
        curves: dict[str, dict] = {}
        for method, per_role in scores.items():
            for role in eval_roles[1:]:
                name = role.split(":", 1)[1]
                results.setdefault(method, {})[name] = ood_metrics(per_role["id_test"], per_role[role], fc.fpr_convention)
                curves.setdefault(method, {})[name] = roc_curve(per_role["id_test"], per_role[role], fc.fpr_convention)
            sets = list(results[method].values())
            results[method]["average"] = {k: float(np.mean([m[k] for m in sets])) for k in sets[0]}
        y_test = torch.from_numpy(by_role["id_test"].class_idx)
        with torch.no_grad():
            x_test = raw("id_test")
            acc = {
                "zero_shot": id_accuracy((F.normalize(x_test, dim=-1) @ id_mm.T).numpy(), y_test.numpy()),
                "adapted": id_accuracy((adapter(x_test) @ id_mm.T).numpy(), y_test.numpy()),
            }
        for method in results:
            log(f"[finetune] {method:>9} (T={temperatures[method]:g}): "
                f"FPR95 {100 * results[method]['average']['fpr95']:6.2f}  "
                f"AUROC {100 * results[method]['average']['auroc']:6.2f}")

        # 6. artifacts: weights, scores, metrics, report
        extra = {"temperatures": temperatures, "leaked": leaked, "text_set": text_set, "kind_sets": set_info,
                 "kind_set_keys": {n: (fit["syn"].keys, [kind_of.get(k, "boundary") for k in fit["syn"].keys])
                                   for n, fit in set_fits.items()}}
        self._write_artifacts(ctx, adapter, tuned_neg, scores, by_role, results, curves, acc, img_hist, txt_hist,
                              extra)
        return {
            "metrics": results,
            "temperatures": temperatures,
            "leaked_labels": [r["text"] for r in leaked],
            "id_accuracy": acc,
            "convention": fc.fpr_convention,
            "train": {"adapter_loss": img_hist, "negatives_loss": txt_hist, "samples": len(x_train),
                      "synthetic": len(by_role["synthetic"]),
                      "text_side": {"data": fc.synood_text_data, "kinds": _kind_counts(text_set),
                                    "used_negatives": used_negatives},
                      # finetune.kind_sets: per set its kinds, counts, and trained or skipped (why)
                      **({"kind_sets": set_info} if set_info else {})},
            # EOE scores with the sketched labels, MM-OOD with sketched + elaborated (mixed near/far)
            "outlier_labels": {"eoe": outliers, "mm_ood": mm_labels},
            "eoe_label_sets": [len(outliers), *(len(x) for x in further_sets)],
            # what the Multi-OS adapter trained on (finetune.multi_os_data)
            "multi_os_train": {"data": fc.multi_os_data, **mos_train} if mos_train else {},
            **_window_summary(ctx),
            "artifacts": ctx.store.url() + "/artifacts",
        }

    def _write_artifacts(self, ctx, adapter, tuned_neg, scores, by_role, results, curves, acc, img_hist, txt_hist,
                         extra):
        import pyarrow as pa

        from ood_core import report
        from ood_core.leakage import context_index
        from ood_core.storage import format_counts, parquet_bytes

        store = ctx.store
        art = lambda name: store.path("artifacts", name)  # noqa: E731
        # safetensors: weights load without executing code (no pickle)
        from safetensors.torch import save as save_safetensors

        weights = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
        store.write_bytes(art("adapter.safetensors"), save_safetensors(weights))
        neg = tuned_neg.detach().cpu().float().contiguous()
        store.write_bytes(art("tuned_negatives.safetensors"), save_safetensors({"tuned_negatives": neg}))
        table = {"key": [], "role": []}
        for role in ["id_test"] + sorted(r for r in by_role if r.startswith("ood:")):
            table["key"] += by_role[role].keys
            table["role"] += [role] * len(by_role[role])
        for method, per_role in scores.items():
            table[method] = np.concatenate([per_role[r] for r in ["id_test"] + sorted(x for x in per_role if x != "id_test")]).tolist()
        store.write_bytes(art("scores.parquet"), parquet_bytes(pa.table(table)))
        # the text side's training set, image by image (which kind, which negative label)
        ts = extra["text_set"]
        store.write_bytes(art("text_side_set.parquet"), parquet_bytes(pa.table(
            {c: [t[c] for t in ts] for c in ("key", "kind", "neg_index")},
            schema=pa.schema([("key", pa.string()), ("kind", pa.string()), ("neg_index", pa.int32())]))))
        # finetune.kind_sets: each set's synthetic training images (the features its adapter trained on)
        if extra["kind_sets"]:
            sets = extra["kind_set_keys"]
            store.write_bytes(art("kind_sets.parquet"), parquet_bytes(pa.table(
                {"set": [n for n, (keys, _) in sets.items() for _ in keys],
                 "key": [k for keys, _ in sets.values() for k in keys],
                 "kind": [k for _, kinds in sets.values() for k in kinds]},
                schema=pa.schema([("set", pa.string()), ("key", pa.string()), ("kind", pa.string())]))))
        metrics = {"convention": ctx.cfg.finetune.fpr_convention, "results": results, "id_accuracy": acc,
                   "temperatures": extra["temperatures"], "leaked_labels": [r["text"] for r in extra["leaked"]],
                   "adapter_loss": img_hist, "negatives_loss": txt_hist,
                   **({"kind_sets": extra["kind_sets"]} if extra["kind_sets"] else {})}
        store.write_json(art("metrics.json"), metrics)

        with tempfile.TemporaryDirectory() as tmp:
            report.plot_roc(curves, os.path.join(tmp, "roc.png"))
            hist = {m: {("id" if r == "id_test" else r.split(":", 1)[1]): v for r, v in per.items()} for m, per in scores.items()}
            report.plot_score_histograms(hist, os.path.join(tmp, "score_histograms.png"))
            grid = _synthetic_grid(ctx)
            if grid:
                report.image_grid(grid[0], grid[1], os.path.join(tmp, "synthetic_grid.png"))
            rounds = _rounds(ctx, results)
            if len(rounds) > 1:
                report.plot_rounds(rounds, os.path.join(tmp, "rounds.png"))
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as f:
                    store.write_bytes(art(name), f.read())
        m = ctx.cfg.models
        sizes = ", ".join(f"{role}: {len(block)}" for role, block in sorted(by_role.items()))
        md = [
            f"# synth-ood report — preset `{ctx.cfg.preset}`",
            "",
            f"- CLIP `{m.clip.name}` ({m.clip.pretrained}), MLLM `{m.mllm.name}`, diffusion `{m.diffusion.name}`",
            f"- cached features: {sizes}",
            f"- synthetic images: {format_counts(ctx.upstream['elaborate'].read_success()['counts'], '; ')}"
            f"; near-duplicates across shards (left out): {len(_cross_dups(ctx))}",
            *_window_lines(ctx),
            *_kind_set_lines(extra["kind_sets"]),
            "",
            report.metrics_table_markdown(results, ctx.cfg.finetune.fpr_convention,
                                          temperatures=extra["temperatures"]),
            "",
            report.leaked_labels_markdown(extra["leaked"], ctx.cfg.sketch.keep_leaked_labels,
                                          why=context_index(ctx).match, rule=ctx.cfg.sketch.leakage_match),
            f"ID accuracy: zero-shot {100 * acc['zero_shot']:.2f}%, with adapter {100 * acc['adapted']:.2f}%",
            "",
            "![ROC curves](roc.png)",
            "![Score histograms](score_histograms.png)",
            "![Kept and rejected synthetic images](synthetic_grid.png)",
            *(["", f"Metrics of the {len(rounds)} generation rounds present (average over the OOD sets):", "",
                "![Metrics per round](rounds.png)"] if len(rounds) > 1 else []),
        ]
        store.write_bytes(art("report.md"), "\n".join(md).encode())


def _rounds(ctx: StageContext, results: dict) -> list[dict]:
    """The metrics of every recorded generation round on this root, this one's from ``results``."""
    from ood_core.rounds import round_metrics

    current = ctx.cfg.generate.round
    return round_metrics(ctx.store.root, current, results) if current else []


def _kind_set_lines(sets: dict[str, dict]) -> list[str]:
    """The report's lines on the training sets by kind (``finetune.kind_sets``): trained or skipped, why."""
    if not sets:
        return []
    lines = ["- training sets by kind (finetune.kind_sets), each its own `synood[set]` row:"]
    for name, s in sets.items():
        kinds = ", ".join(f"{k} {n}" for k, n in s["synthetic_by_kind"].items())
        what = (f"{s['synthetic']} synthetic + {s['id']} ID train features" if s["status"] == "trained"
                else f"skipped: {s['reason']}")
        lines.append(f"  - `{name}` ({kinds}): {what}")
    return lines


def _window_summary(ctx: StageContext) -> dict:
    """``{"rounds": {folder name: elaborate key}}`` when finetune trains on earlier rounds too."""
    folders = window_folders(ctx)
    return {"rounds": {name: store.key for name, store in folders}} if len(folders) > 1 else {}


def _window_lines(ctx: StageContext) -> list[str]:
    """The report's line naming the earlier rounds finetune trained on (none for this round alone)."""
    earlier = [name.split("@", 1)[1] for name, _ in window_folders(ctx)[1:]]
    return [f"- trained on the kept images of this round and of {', '.join(earlier)}"] if earlier else []


def mix_labels(near: list[str], far: list[str], near_ratio: float) -> list[str]:
    """MM-OOD's near/far mix for an unknown OOD type: the largest prefix-mix with ``near_ratio`` near labels.

    ``near_ratio`` 0 gives the far labels only, 1 the near labels only (and an empty set gives the
    other alone); in between, the set that runs out first is taken whole and the other cut to the
    ratio (order kept: deterministic).
    """
    if not near or not far:  # one set is empty: the other alone
        return list(near or far)
    if near_ratio <= 0.0:
        return list(far)
    if near_ratio >= 1.0:
        return list(near)
    total = min(len(near) / near_ratio, len(far) / (1.0 - near_ratio))
    n_near = min(len(near), max(1, round(total * near_ratio)))
    n_far = min(len(far), max(1, round(total * (1.0 - near_ratio))))
    return list(near[:n_near]) + list(far[:n_far])


def eoe_label_sets(sketch_rows: list[dict]) -> list[list[str]]:
    """EOE's outlier label sets from sketch's rows: set 0 = the kept far, near and fine labels; set
    k > 0 = the kept labels of far conversation k (``sketch.far_label_sets``) with the same near
    and fine labels (EOE's near and fine-grained tasks are other runs than its far label files)."""
    kept = [r for r in sketch_rows if r["status"] == "kept"]
    first = [r["text"] for r in kept if r["kind"] in ("far", "near", "fine")]
    others = [r["text"] for r in kept if r["kind"] in ("near", "fine")]
    sets: dict[str, list[str]] = {}
    for r in kept:
        if r["kind"] == "far_set":
            sets.setdefault(r["source_key"], []).append(r["text"])
    # conversation order far1, far2, ... (numeric: far10 after far9)
    order = sorted(sets, key=lambda k: int(k.removeprefix("far").split("_", 1)[0]))
    return [first, *([*sets[k], *others] for k in order)]


def mm_ood_labels(ctx: StageContext) -> list[str]:
    """The MM-OOD label set: kept rows of elaborate's outlier-label table (sketched + elaborated), mixed;
    over every round finetune reads (this round's labels first)."""
    from ood_core.stages.elaborate import read_outlier_table

    kept = [r for _, store in window_folders(ctx) for r in read_outlier_table(store) if r["status"] == "kept"]
    near = list(dict.fromkeys(r["label"] for r in kept if r["kind"] == "near"))
    far = list(dict.fromkeys(r["label"] for r in kept if r["kind"] == "far" and r["label"] not in near))
    return mix_labels(near, far, ctx.cfg.finetune.mm_ood_near_ratio)


# finetune.synood_text_data: released -> the kinds of SynOOD's near-OOD folders (near_energy,
# near_no_grad; near_msp has no equivalent) and of its far_neg_label folder
NEAR_KINDS = ("boundary", "boundary_no_grad")
FAR_NEGATIVE_KIND = "negative"


def text_side_set(data: str, adapter_rows: list[dict], cached: list[dict], elaborate_rows: list[dict],
                  negatives: list[str], n_id: int) -> list[dict]:
    """SynOOD's text-side training images as ``[{key, kind, neg_index}]``, in cache order.

    ``kept_boundary``: the adapter's synthetic set, each image with its assigned (argmax) negative.
    ``released`` (datasets.py 304-334): every cached kept image of a near kind with its assigned
    negative, plus every ``negative`` text-to-image image with the negative it was drawn from. As in
    the reference (ood_label_mining.py labels the energy images; every variant of a source file
    reuses that label), a no-gradient image takes its energy sibling's negative when that image was
    kept, else its own.
    """
    meta = {r["key"]: r for r in elaborate_rows}

    def kind(r: dict) -> str:
        return meta.get(r["key"], {}).get("kind") or "boundary"

    if data == "kept_boundary":
        return [{"key": r["key"], "kind": kind(r), "neg_index": int(r["label_idx"]) - n_id} for r in adapter_rows]
    index = {}
    for i, w in enumerate(negatives):
        index.setdefault(w, i)
    from ood_core.stages.generate import BOUNDARY_VARIANTS

    no_grad = f"syn_{BOUNDARY_VARIANTS['no_grad'].prefix}"
    assigned = {r["key"]: int(r["label_idx"]) - n_id for r in cached}
    out = []
    for r in cached:
        k = kind(r)
        if k in NEAR_KINDS:
            energy_key = r["key"].replace(no_grad, "syn_", 1)
            out.append({"key": r["key"], "kind": k, "neg_index": assigned.get(energy_key, assigned[r["key"]])})
        elif k == FAR_NEGATIVE_KIND and meta[r["key"]].get("label") in index:
            out.append({"key": r["key"], "kind": k, "neg_index": index[meta[r["key"]]["label"]]})
    if not out:
        raise RuntimeError("finetune: synood_text_data 'released' found no kept near-OOD or negative-label image")
    return out


def _kind_counts(text_set: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for t in text_set:
        counts[t["kind"]] = counts.get(t["kind"], 0) + 1
    return dict(sorted(counts.items()))


def format_kinds(text_set: list[dict]) -> str:
    return ", ".join(f"{k} {n}" for k, n in _kind_counts(text_set).items()) or "none"


def multi_os_training_set(ctx: StageContext, rows: list[dict]) -> tuple[list[dict], list[str], list[int]]:
    """Multi-OS's own pairs among the cached synthetic ``rows``: the kept ``multi_os`` images (of
    every round finetune reads), the distinct synthesised texts (in row order) and, per image, the
    index of its own text."""
    label_of = {r["key"]: r["label"] for r in window_rows(ctx, status="kept") if r["kind"] == "multi_os"}
    chosen = [r for r in rows if label_of.get(r["key"])]
    texts = list(dict.fromkeys(label_of[r["key"]] for r in chosen))
    index = {t: i for i, t in enumerate(texts)}
    return chosen, texts, [index[label_of[r["key"]]] for r in chosen]


def kind_by_key(ctx: StageContext) -> dict[str, str]:
    """``{key: kind}`` of the kept synthetic images finetune reads (no kind recorded = boundary)."""
    return {r["key"]: r["kind"] or "boundary" for r in window_rows(ctx, status="kept")}


def select_synthetic(ctx: StageContext, block: RoleFeatures, kinds: list[str] | None = None) -> RoleFeatures:
    """The cached synthetic features whose kind is in ``kinds`` (default ``finetune.synthetic_kinds``:
    the training set)."""
    kind_of = kind_by_key(ctx)
    wanted = set(ctx.cfg.finetune.synthetic_kinds if kinds is None else kinds)
    chosen = block.select(np.array([kind_of.get(k, "boundary") in wanted for k in block.keys], dtype=bool))
    if not len(chosen):
        raise RuntimeError(
            f"finetune: no kept synthetic image of kinds {sorted(wanted)} (kept kinds: "
            f"{sorted(set(kind_of.values()))}); check finetune.synthetic_kinds and generate.t2i_kinds"
        )
    return chosen


def used_train_keys(ctx: StageContext, kept: list[dict]) -> set[str] | None:
    """The ID train images finetune reads, None for all of them.

    ``synood_data: sources`` reads the source images of the kept synthetic images; when none of
    the chosen kinds has a source (text-to-image only) finalize trains on the whole train split,
    as ``synood_data: all``. The sources of every kept kind are cached (not only the chosen
    kinds'), so that another ``finetune.synthetic_kinds`` reuses the same feature shards. Each
    ``finetune.kind_sets`` entry counts as chosen kinds too (one that finalize skips for lack of a
    kept kind does not).
    """
    fc = ctx.cfg.finetune
    if fc.synood_data == "all":
        return None
    train = {r.key for r in ctx.dataset.records if r.split == "train"}
    kept_kinds = {r["kind"] or "boundary" for r in kept}
    sourced = {r["kind"] or "boundary" for r in kept if r.get("source_key") in train}
    chosen = [fc.synthetic_kinds, *(k for k in fc.kind_sets.values() if set(k) <= kept_kinds)]
    if any(not sourced & set(kinds) for kinds in chosen):
        return None
    return {r["source_key"] for r in kept if r.get("source_key") in train}


@dataclass
class RoleFeatures:
    """One role's cached features: keys, class and label indices, and one (n, dim) float32 array."""

    keys: list[str]
    class_idx: np.ndarray
    label_idx: np.ndarray
    feats: np.ndarray

    @classmethod
    def empty(cls, dim: int) -> RoleFeatures:
        return cls([], np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, dim), np.float32))

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, mask: np.ndarray) -> RoleFeatures:
        return RoleFeatures([k for k, m in zip(self.keys, mask, strict=True) if m], self.class_idx[mask],
                            self.label_idx[mask], self.feats[mask])

    def positions_of(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}

    def rows(self) -> list[dict]:
        """``[{key, label_idx}]`` in order (what the text-side set is chosen from)."""
        return [{"key": k, "label_idx": int(v)} for k, v in zip(self.keys, self.label_idx, strict=True)]

    def positions(self, keys: list[str]) -> np.ndarray:
        pos = self.positions_of()
        return np.array([pos[k] for k in keys], dtype=np.int64)


def load_role_features(store: StageStore) -> dict[str, RoleFeatures]:
    """Finetune's cached features of every ``ok`` row, one :class:`RoleFeatures` per role (manifest order)."""
    cols = store.read_manifest().select(["key", "status", "role", "class_idx", "label_idx"]).to_pydict()
    ok = [i for i, st in enumerate(cols["status"]) if st == "ok"]
    where: dict[str, tuple[str, int]] = {}
    members: dict[str, list[int]] = {}
    for i in ok:
        role = cols["role"][i]
        where[cols["key"][i]] = (role, len(members.setdefault(role, [])))
        members[role].append(i)
    arrays: dict[str, np.ndarray] = {}
    for key, files in store.iter_samples():
        if key not in where or "npy" not in files:
            continue
        role, j = where[key]
        f = npy_load(files["npy"])
        if role not in arrays:
            arrays[role] = np.zeros((len(members[role]), f.shape[-1]), dtype=np.float32)
        arrays[role][j] = f
    out = {}
    for role, idx in members.items():
        if role not in arrays:
            continue
        out[role] = RoleFeatures([cols["key"][i] for i in idx],
                                 np.array([cols["class_idx"][i] for i in idx], dtype=np.int64),
                                 np.array([cols["label_idx"][i] for i in idx], dtype=np.int64), arrays[role])
    return out


def window_folders(ctx: StageContext) -> list[tuple[str, StageStore]]:
    """The elaborate folders finetune trains on: this round's, then earlier rounds' (``finetune.rounds_window``)."""
    earlier = sorted((n, s) for n, s in ctx.upstream.items() if n.startswith("elaborate@"))
    return [("elaborate", ctx.upstream["elaborate"]), *earlier]


def window_key(store: StageStore, key: str) -> str:
    """An earlier round's sample key inside finetune (the same key may name an image of each round)."""
    return f"r{store.key[:10]}_{key}"


def window_rows(ctx: StageContext, **where) -> list[dict]:
    """Elaborate manifest rows of every round finetune reads; an earlier round's row gets its own key
    (``window_key``) and says where its image is (``up``: the folder's name, ``up_key``: its key there)."""
    rows = []
    for name, store in window_folders(ctx):
        for r in ctx.upstream_rows(name, **where):
            rows.append(r if name == "elaborate" else {**r, "key": window_key(store, r["key"]), "up": name,
                                                      "up_key": r["key"]})
    return rows


def _cross_dups(ctx: StageContext) -> dict:
    """Near-duplicates across the shards of each round (each round's images are deduplicated on their own)."""
    from ood_core.stages.elaborate import read_cross_shard_duplicates

    dups = {}
    for name, store in window_folders(ctx):
        found = read_cross_shard_duplicates(store)
        dups.update(found if name == "elaborate" else {window_key(store, k): v for k, v in found.items()})
    return dups


def _ood_sets(ctx: StageContext) -> dict[str, dict]:
    from ood_core.data import load_ood_set

    # every feature shard task needs the listing: list the (possibly large) folders once per process
    return memo(
        ("ood_sets", ctx.cfg.data.model_dump_json(), ctx.cfg.seed),
        lambda: {
            name: {r.key: r for r in load_ood_set(name, ctx.cfg.data, ctx.cfg.seed)} for name in ctx.cfg.data.ood_sets
        },
    )


def _synthetic_grid(ctx: StageContext, per_status: int = 8):
    """Up to 8 kept and 8 rejected synthetic images with their label or rejection reason."""
    from PIL import Image

    rows = ctx.upstream_rows("elaborate")
    chosen = [r for r in rows if r["status"] == "kept"][:per_status]
    chosen += [r for r in rows if r["status"] == "rejected"][:per_status]
    if not chosen:
        return None
    files = ctx.upstream["elaborate"].load_samples({r["key"] for r in chosen}, {r["shard"] for r in chosen})
    images, captions = [], []
    for r in chosen:
        if r["key"] in files and "png" in files[r["key"]]:
            images.append(Image.open(io.BytesIO(files[r["key"]]["png"])).convert("RGB"))
            captions.append(f"kept: {r['neg_label']}" if r["status"] == "kept" else f"rejected: {r['reason']}")
    return (images, captions) if images else None

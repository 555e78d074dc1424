"""Stage 4, finetune + evaluate.

Shards cache CLIP image features (ID train/test, evaluation OOD sets, kept synthetic images);
``finalize`` trains the SynOOD residual adapter and the negative-label text features on the
cached features, scores every method on the same features and writes metrics and the report.
"""

from __future__ import annotations

import io
import os
import tempfile

import numpy as np

from ood_core.config import RunConfig
from ood_core.identity import data_content
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
from schemas import FINETUNE

FEATURE_SHARD = 256
BASELINES = ("mcm", "energy", "max_logit", "neglabel", "eoe", "mm_ood")


@STAGES.register("finetune")
class FinetuneStage(Stage):
    name = "finetune"
    schema = FINETUNE
    upstream = ("sketch", "elaborate")
    models = ("clip",)

    def config_slice(self, cfg: RunConfig) -> dict:
        return {
            "seed": cfg.seed,
            "data": data_content(cfg.data, cfg.seed),
            "clip": cfg.models.clip.model_dump(mode="json"),
            "finetune": cfg.finetune.model_dump(mode="json"),
        }

    def shard_slice(self, cfg: RunConfig) -> dict:
        # the feature cache depends on the images and CLIP only: a new lr reuses the features
        return {
            "seed": cfg.seed,
            "data": data_content(cfg.data, cfg.seed),
            "clip": cfg.models.clip.model_dump(mode="json"),
            "feature_shard": FEATURE_SHARD,
        }

    # ------------------------------------------------------------ plan: feature cache
    def plan(self, ctx: StageContext) -> list[ShardPlan]:
        n_id = len(ctx.dataset.classnames)
        items = [
            {"key": r.key, "role": f"id_{r.split}", "class_idx": r.class_idx, "label_idx": r.class_idx}
            for r in ctx.dataset.records
        ]
        for name, recs in _ood_sets(ctx).items():
            items += [{"key": r.key, "role": f"ood:{name}", "class_idx": -1, "label_idx": -1} for r in recs.values()]
        kept = ctx.upstream_rows("elaborate", status="kept")
        if not kept:
            raise RuntimeError(
                "finetune: elaborate kept no synthetic image; see the rejection reasons with "
                "`synth-ood status` and loosen elaborate.max_id_confidence or elaborate.dedup_cosine"
            )
        items += [
            {
                "key": r["key"],
                "role": "synthetic",
                "class_idx": r["class_idx"],
                "label_idx": n_id + r["neg_index"],
                "up_shard": r["shard"],
            }
            for r in kept
        ]
        return chunk(items, FEATURE_SHARD)

    def run_shard(self, ctx: StageContext, shard: ShardPlan) -> ShardOutput:
        from PIL import Image

        from ood_core.data import load_image

        size = ctx.cfg.data.image_size
        ood = {k: rec for recs in _ood_sets(ctx).values() for k, rec in recs.items()}
        synthetic = [it for it in shard.items if it["role"] == "synthetic"]
        syn_files = (
            ctx.upstream["elaborate"].load_samples({it["key"] for it in synthetic}, {it["up_shard"] for it in synthetic})
            if synthetic
            else {}
        )
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
        feats = ctx.models.clip().encode_images(images).numpy().astype(np.float32) if images else []
        for it, f in zip(loaded, feats, strict=True):
            r = row(it["key"], "ok", "ok", None, role=it["role"], class_idx=it["class_idx"], label_idx=it["label_idx"])
            out.add(r, {"npy": npy_bytes(f)})
        check_not_all_failed(self.name, shard, out)
        return out

    # ------------------------------------------------------------ finalize: train + evaluate
    def finalize(self, ctx: StageContext) -> dict:
        import torch

        from ood_core.adapter import train_image_adapter, train_negative_text
        from ood_core.metrics import id_accuracy, ood_metrics, roc_curve
        from ood_core.models import resolve_device
        from ood_core.scores import SCORES, ScoreContext

        fc = ctx.cfg.finetune
        log = ctx.log
        device = resolve_device(ctx.cfg.models.device)
        # 1. cached features and their roles
        feats = {k: npy_load(f["npy"]) for k, f in ctx.store.iter_samples()}
        rows = [r for r in ctx.store.read_manifest().to_pylist() if r["status"] == "ok"]
        by_role: dict[str, list[dict]] = {}
        for r in rows:
            by_role.setdefault(r["role"], []).append(r)

        def stack(role: str) -> torch.Tensor:
            return torch.from_numpy(np.stack([feats[r["key"]] for r in by_role.get(role, [])]))

        # 2. text features: ID prompts, negative labels, sketched outlier labels
        id_text = ctx.id_text_features
        neg_text = ctx.negative_text_features
        outliers = [r["text"] for r in ctx.upstream_rows("sketch", status="kept") if r["kind"] in ("far", "near")]
        out_text = ctx.models.clip().encode_texts([ID_PROMPT.format(t) for t in outliers]) if outliers else None

        # 3. train the image adapter, then the negative text features, on cached features
        train_roles = ["id_train", "synthetic"]
        x_train = torch.cat([stack(r) for r in train_roles])
        y_train = torch.tensor([r["label_idx"] for role in train_roles for r in by_role[role]])
        log(f"[finetune] training adapter on {len(x_train)} cached features ({len(by_role['synthetic'])} synthetic)")
        adapter, img_hist = train_image_adapter(
            x_train, y_train, torch.cat([id_text, neg_text]), fc, seed=ctx.cfg.seed,
            loss=fc.loss, num_id=len(id_text), device=device,
            progress=lambda e, loss: log(f"[finetune] adapter epoch {e + 1}/{fc.epochs} loss {loss:.4f}"),
        )
        with torch.no_grad():
            x_train_adapted = adapter(x_train)
        tuned_neg, txt_hist = train_negative_text(
            x_train_adapted, y_train, id_text, neg_text, fc, seed=ctx.cfg.seed,
            progress=lambda e, loss: log(f"[finetune] negatives epoch {e + 1}/{fc.text_epochs} loss {loss:.4f}"),
            device=device,
        )

        # 4. score every method on the same features
        eval_roles = ["id_test"] + sorted(r for r in by_role if r.startswith("ood:"))
        scores: dict[str, dict[str, np.ndarray]] = {}
        for role in eval_roles:
            x = stack(role)
            with torch.no_grad():
                xa = adapter(x)
            base = ScoreContext(image_feats=x, id_text_feats=id_text, neg_text_feats=neg_text,
                                outlier_text_feats=out_text, cfg=fc, seed=ctx.cfg.seed)
            for method in BASELINES:
                if method in ("eoe", "mm_ood") and out_text is None:
                    continue
                scores.setdefault(method, {})[role] = np.asarray(SCORES.get(method)(base))
            tuned = ScoreContext(image_feats=xa, id_text_feats=id_text, neg_text_feats=tuned_neg,
                                 outlier_text_feats=out_text, cfg=fc, seed=ctx.cfg.seed)
            scores.setdefault("synood", {})[role] = np.asarray(SCORES.get("neglabel")(tuned))

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
        y_test = torch.tensor([r["class_idx"] for r in by_role["id_test"]])
        with torch.no_grad():
            x_test = stack("id_test")
            acc = {
                "zero_shot": id_accuracy((x_test @ id_text.T).numpy(), y_test.numpy()),
                "adapted": id_accuracy((adapter(x_test) @ id_text.T).numpy(), y_test.numpy()),
            }
        for method in results:
            log(f"[finetune] {method:>9}: FPR95 {100 * results[method]['average']['fpr95']:6.2f}  "
                f"AUROC {100 * results[method]['average']['auroc']:6.2f}")

        # 6. artifacts: weights, scores, metrics, report
        self._write_artifacts(ctx, adapter, tuned_neg, scores, by_role, results, curves, acc, img_hist, txt_hist)
        return {
            "metrics": results,
            "id_accuracy": acc,
            "convention": fc.fpr_convention,
            "train": {"adapter_loss": img_hist, "negatives_loss": txt_hist, "samples": len(x_train)},
            "artifacts": ctx.store.url() + "/artifacts",
        }

    def _write_artifacts(self, ctx, adapter, tuned_neg, scores, by_role, results, curves, acc, img_hist, txt_hist):
        import pyarrow as pa
        import torch

        from ood_core import report
        from ood_core.storage import format_counts, parquet_bytes

        store = ctx.store
        art = lambda name: store.path("artifacts", name)  # noqa: E731
        buf = io.BytesIO()
        torch.save(adapter.state_dict(), buf)
        store.write_bytes(art("adapter.pt"), buf.getvalue())
        store.write_bytes(art("tuned_negatives.npy"), npy_bytes(tuned_neg.detach().numpy().astype(np.float32)))
        table = {"key": [], "role": []}
        for role in ["id_test"] + sorted(r for r in by_role if r.startswith("ood:")):
            table["key"] += [r["key"] for r in by_role[role]]
            table["role"] += [role] * len(by_role[role])
        for method, per_role in scores.items():
            table[method] = np.concatenate([per_role[r] for r in ["id_test"] + sorted(x for x in per_role if x != "id_test")]).tolist()
        store.write_bytes(art("scores.parquet"), parquet_bytes(pa.table(table)))
        metrics = {"convention": ctx.cfg.finetune.fpr_convention, "results": results, "id_accuracy": acc,
                   "adapter_loss": img_hist, "negatives_loss": txt_hist}
        store.write_json(art("metrics.json"), metrics)

        with tempfile.TemporaryDirectory() as tmp:
            report.plot_roc(curves, os.path.join(tmp, "roc.png"))
            hist = {m: {("id" if r == "id_test" else r.split(":", 1)[1]): v for r, v in per.items()} for m, per in scores.items()}
            report.plot_score_histograms(hist, os.path.join(tmp, "score_histograms.png"))
            grid = _synthetic_grid(ctx)
            if grid:
                report.image_grid(grid[0], grid[1], os.path.join(tmp, "synthetic_grid.png"))
            for name in sorted(os.listdir(tmp)):
                with open(os.path.join(tmp, name), "rb") as f:
                    store.write_bytes(art(name), f.read())
        m = ctx.cfg.models
        sizes = ", ".join(f"{role}: {len(rows)}" for role, rows in sorted(by_role.items()))
        md = [
            f"# synth-ood report — preset `{ctx.cfg.preset}`",
            "",
            f"- CLIP `{m.clip.name}` ({m.clip.pretrained}), MLLM `{m.mllm.name}`, diffusion `{m.diffusion.name}`",
            f"- cached features: {sizes}",
            f"- synthetic images: {format_counts(ctx.upstream['elaborate'].read_success()['counts'], '; ')}",
            "",
            report.metrics_table_markdown(results, ctx.cfg.finetune.fpr_convention),
            "",
            f"ID accuracy: zero-shot {100 * acc['zero_shot']:.2f}%, with adapter {100 * acc['adapted']:.2f}%",
            "",
            "![ROC curves](roc.png)",
            "![Score histograms](score_histograms.png)",
            "![Kept and rejected synthetic images](synthetic_grid.png)",
        ]
        store.write_bytes(art("report.md"), "\n".join(md).encode())


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

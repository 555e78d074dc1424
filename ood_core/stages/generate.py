"""Stage 2, generate: synthetic outlier images, two kinds behind one generator interface.

* ``boundary`` (SynOOD): each selected ID image is inpainted with its MLLM context prompt; the
  initial noise is pushed towards the ID/OOD boundary by the energy-score gradient
  (see ``ood_core.models.diffusion.boundary_inpaint``); ``generate.boundary_variants`` adds
  SynOOD's no-gradient variant (kind ``boundary_no_grad``, :data:`BOUNDARY_VARIANTS`).
* ``far`` / ``near`` (MM-OOD's far branch): N text-to-image samples of every kept sketched
  outlier label, from a prompt template with an id (``ood_core.prompts.T2I_TEMPLATES``);
  ``negative``: of mined negative labels (SynOOD's ``far_neg_label`` images).
* ``multi_os`` (Multi-OS): concept texts synthesised in the semantic blank areas of CLIP's space
  (``ood_core.multi_os``), painted by the text-to-image model, each with its image-text alignment.
* ``noise`` (a control, off by default): seeded noise images, ``generate.noise_per_source`` per
  boundary source, so a benchmark can train on noise in place of generated images.

A generator is chosen from :data:`GENERATORS` by the plan item's ``generator`` field; every shard
holds the items of one generator only, so each kind's shards depend only on that generator's
config (:meth:`Generator.config_slice`): a changed number of far images per label leaves the
boundary shards' content keys unchanged and they are copied, not recomputed (see
``ood_core.pipeline.content_donor``).
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ood_core.config import RunConfig
from ood_core.registry import Registry
from ood_core.stages.base import (
    STAGES,
    ShardOutput,
    ShardPlan,
    Stage,
    StageContext,
    check_not_all_failed,
    chunk,
    derive_seed,
    is_shard_error,
    row,
)
from schemas import GENERATE

# the plan's order of generators: boundary shards first, so their shard indices do not move
# when the far branch's item count changes
GENERATOR_ORDER = ("boundary", "t2i", "multi_os", "noise")
# the clock-dependent part of run_batched's record: kept out of the stats marker, whose bytes are
# part of the shard's content (see ood_core.storage)
TIMING_KEYS = ("generate_seconds", "images_per_s", "s_per_image")


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def sample_files(r: dict, image, **meta: object) -> dict[str, bytes]:
    """A generated sample's files: the PNG and its row (plus ``meta``) as JSON. Rows hold no
    timing, so the shard's bytes depend on the seed, config and numerics alone."""
    doc = {**r, **meta}
    return {"png": png_bytes(image), "json": json.dumps(doc, sort_keys=True).encode()}


class Generator:
    """One kind of generated sample: plan items, the config they depend on, a batch generator."""

    name: str

    def config_slice(self, cfg: RunConfig) -> dict:
        """The config this generator's shards depend on (their content key hashes it)."""
        raise NotImplementedError

    def items(self, ctx: StageContext) -> list[dict]:
        raise NotImplementedError

    def shard_size(self, cfg: RunConfig) -> int:
        raise NotImplementedError

    def batch_size(self, cfg: RunConfig) -> int:
        return 1

    def key(self, item: dict) -> str:
        raise NotImplementedError

    def columns(self, item: dict) -> dict:
        """Manifest columns known before generating (also on a failed row)."""
        raise NotImplementedError

    def generate_batch(self, ctx: StageContext, items: list[dict]) -> list[tuple[dict, dict[str, bytes]]]:
        """Generate ``items`` together; one (row, files) per item, in order."""
        raise NotImplementedError

    def model(self, ctx: StageContext):
        """The loaded model this generator samples with (its device, dtype and kernels)."""
        raise NotImplementedError

    def run(self, ctx: StageContext, items: list[dict], out: ShardOutput) -> None:
        """Every item through :func:`run_batched` with this generator's batch size; the batch size
        that worked and the numerics that made its bytes
        (:func:`ood_core.models.diffusion.numerics_record`) go into its stats marker, its
        throughput (:data:`TIMING_KEYS`) into its timings."""
        from ood_core.models.diffusion import numerics_record

        stats = run_batched(self, ctx, items, out, self.batch_size(ctx.cfg))
        out.timings.update({k: stats.pop(k) for k in TIMING_KEYS})
        out.stats.update(stats)
        model = self.model(ctx)
        if model is not None:  # a generator without a model (the noise control) has no numerics
            out.stats["numerics"] = numerics_record(model, stats["batch_used"])

    def _guarded(self, ctx: StageContext, batch: list[dict], out: ShardOutput) -> None:
        try:
            results = self.generate_batch(ctx, batch)
        except Exception as err:  # noqa: BLE001 - every candidate gets a row, failures included
            if is_shard_error(err):
                raise
            if is_out_of_memory(err):
                raise MemoryError(f"generate ({self.name}): out of memory at batch size {len(batch)}: {err}") from err
            self._failed(batch, err, out)
            return
        for r, files in results:
            out.add(r, files)

    def _failed(self, batch: list[dict], err: BaseException, out: ShardOutput) -> None:
        for it in batch:
            out.add(row(self.key(it), "failed", type(err).__name__, f"{type(err).__name__}: {err}",
                        **self.columns(it)))


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA out-of-memory: ``torch.OutOfMemoryError`` (matched by name: no torch import here) or a
    RuntimeError saying so (older PyTorch, cuDNN/cuBLAS workspaces)."""
    return type(err).__name__ == "OutOfMemoryError" or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


def _free_accelerator_memory() -> None:
    import gc
    import sys

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_batched(gen: Generator, ctx: StageContext, items: list[dict], out: ShardOutput, size: int) -> dict:
    """Generate ``items`` in batches of ``size``, the one batching loop of every generator.

    1. A batch that runs out of accelerator memory is split in half and retried, down to batch 1;
       the smaller size is kept for the rest of the shard. Out of memory at batch 1 fails the
       shard (raised, for Prefect to retry), never a candidate.
    2. Any other failure of a batch is retried item by item, so one bad item fails alone.
    3. Progress (images done / total, rate, ETA) is logged after each batch; returns the stats
       the shard records: images, seconds, images/s, s/image, batch size asked and used.
    """
    name = gen.name
    total, done, start = len(items), 0, 0
    t0 = time.perf_counter()
    configured = size
    while start < total:
        batch = items[start : start + size]
        try:
            results = gen.generate_batch(ctx, batch)
        except Exception as err:  # noqa: BLE001 - out of memory is halved, others retried per item
            if is_out_of_memory(err):
                _free_accelerator_memory()
                if len(batch) == 1:
                    raise MemoryError(
                        f"generate ({name}): out of memory at batch size 1 ({type(err).__name__}: {err}); "
                        "lower models.diffusion.resolution, set models.diffusion.vae_slicing: true, or use a "
                        "GPU with more memory"
                    ) from err
                size = max(1, len(batch) // 2)
                ctx.log(f"[generate] {name}: out of memory at batch {len(batch)}; retrying at batch {size}")
                continue
            if is_shard_error(err):
                raise
            if len(batch) == 1:
                gen._failed(batch, err, out)
            else:
                for it in batch:
                    gen._guarded(ctx, [it], out)
        else:
            for r, files in results:
                out.add(r, files)
        start += len(batch)
        done += len(batch)
        elapsed = time.perf_counter() - t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        ctx.log(f"[generate] {name}: {done}/{total} images, {rate:.2f} images/s, ETA {eta:.0f} s (batch {size})")
    seconds = time.perf_counter() - t0
    if size < configured:
        ctx.log(f"[generate] {name}: batch size {size} worked (configured {configured})")
    return {
        "generator": name,
        "images": total,
        "generate_seconds": round(seconds, 3),
        "images_per_s": round(total / seconds, 4) if seconds > 0 else None,
        "s_per_image": round(seconds / total, 4) if total else None,
        "batch_size": configured,
        "batch_used": size,
    }


GENERATORS: Registry[type[Generator]] = Registry("generator")


def _round(g) -> dict:
    # an empty generation round leaves keys as they were before rounds existed
    return {"round": g.round} if g.round else {}


def _unset_new_fields(g) -> set[str]:
    """Fields at the value that means 'as before they existed': left out of the key (keys unchanged)."""
    return ({"boundary_variants"} if g.boundary_variants == ["energy"] else set()) | (
        {"t2i_negative_labels"} if g.t2i_negative_labels is None else set()) | (
        {"noise_per_source"} if not g.noise_per_source else set())


def _variants(g) -> dict:
    # the energy variant alone leaves the keys as they were before variants existed
    return {"boundary_variants": g.boundary_variants} if g.boundary_variants != ["energy"] else {}


def _scorer(g) -> dict:
    # frozen CLIP (the default) leaves keys as they were before the closed loop existed; the
    # detector a closed loop follows is in the key as the upstream folder ``finetune@<round>``
    return {} if g.scorer == "frozen" else {"scorer": g.scorer}


def detector_adapter(ctx: StageContext) -> tuple[str | None, object | None]:
    """``(upstream name, adapter)`` of the latest earlier round's finetune that the closed loop scores
    with, or ``(None, None)`` (``generate.scorer: frozen``, or no earlier round's finetune yet)."""
    from ood_core.adapter import load_adapter

    earlier = sorted(n for n in ctx.upstream if n.startswith("finetune@"))
    if not earlier:
        return None, None
    store = ctx.upstream[earlier[-1]]
    return earlier[-1], load_adapter(store.read_bytes(store.path("artifacts", "adapter.safetensors")))


@dataclass(frozen=True)
class BoundaryVariant:
    """One of SynOOD's near-OOD generation variants: its sample-key prefix, kind and rounds."""

    prefix: str
    kind: str
    rounds: Callable[[object], int]


# generate.boundary_variants -> how its samples are made (the reference's near_energy / near_no_grad;
# its msp-guided variant has no equivalent here)
BOUNDARY_VARIANTS = {
    "energy": BoundaryVariant("", "boundary", lambda g: g.rounds),
    "no_grad": BoundaryVariant("nograd_", "boundary_no_grad", lambda g: 1),
}


def sample_seed(cfg: RunConfig, key: str) -> int:
    """A generated sample's seed: run seed, sample key and the generation round (a new round, new data)."""
    return derive_seed(cfg.seed, "generate", key, *([cfg.generate.round] if cfg.generate.round else []))


@GENERATORS.register("boundary")
class BoundaryGenerator(Generator):
    """SynOOD boundary inpainting of one selected ID image per item."""

    name = "boundary"

    def config_slice(self, cfg: RunConfig) -> dict:
        g = cfg.generate
        return {
            "seed": cfg.seed,
            "diffusion": cfg.models.diffusion.key_dump(),
            "clip": cfg.models.clip.model_dump(mode="json"),
            # the batch size too: batched kernels round differently (README, "Reproducibility")
            "generate": {k: getattr(g, k) for k in ("steps", "strength", "guidance", "rounds", "lr", "m_out",
                                                   "grad_batch", "mask", "batch")} | _round(g) | _scorer(g)
            | _variants(g),
            # the energy scorer guiding the noise uses this scale
            "logit_scale": cfg.finetune.logit_scale,
        }

    def shard_size(self, cfg: RunConfig) -> int:
        return cfg.generate.shard_size

    def items(self, ctx: StageContext) -> list[dict]:
        items = [
            {"generator": self.name, "source_key": r["source_key"], "class_idx": r["class_idx"], "prompt": r["text"],
             **({"variant": v} if v != "energy" else {})}
            for v in ctx.cfg.generate.boundary_variants  # config order, then sketch order: a stable plan
            for r in ctx.upstream_rows("sketch", kind="context", status="kept")
        ]
        if not items:
            raise RuntimeError(
                "generate: sketch produced no kept context prompts; check the sketch manifest "
                f"({ctx.upstream['sketch'].url()}) for failed rows and their errors"
            )
        return items

    def key(self, item: dict) -> str:
        return f"syn_{BOUNDARY_VARIANTS[item.get('variant', 'energy')].prefix}{item['source_key']}"

    def columns(self, item: dict) -> dict:
        return {"kind": BOUNDARY_VARIANTS[item.get("variant", "energy")].kind, "source_key": item["source_key"],
                "class_idx": item["class_idx"], "prompt": item["prompt"]}

    def batch_size(self, cfg: RunConfig) -> int:
        return cfg.generate.batch

    def _detector(self, ctx: StageContext):
        if "detector" not in ctx.__dict__:  # once per stage run (the context's own cache), not per batch
            name, ctx.__dict__["detector"] = detector_adapter(ctx)
            if ctx.cfg.generate.scorer == "latest_round":
                which = f"the fine-tuned detector of {name}" if name else "frozen CLIP (no earlier round's finetune yet)"
                ctx.log(f"[generate] closed loop: the noise step follows {which}")
        return ctx.__dict__["detector"]

    def model(self, ctx: StageContext):
        return ctx.models.inpainter()

    def generate_batch(self, ctx: StageContext, items: list[dict]) -> list[tuple[dict, dict[str, bytes]]]:
        """All ``items`` through the sampler together (each with its own seed, prompt, mask, target)."""
        from ood_core.data import load_image
        from ood_core.models.diffusion import (
            InpaintJob,
            boundary_inpaint_batch,
            center_box_mask,
            energy_score_fn,
        )
        from ood_core.models.diffusion import resolve_m_out as _m_out

        g = ctx.cfg.generate
        pipe = ctx.models.inpainter()
        score_fn = energy_score_fn(ctx.models.clip(), ctx.id_text_features, ctx.cfg.finetune.logit_scale,
                                   adapter=self._detector(ctx))  # fmt: skip
        m_out = _m_out(g.m_out, len(ctx.dataset.classnames))
        recs = [ctx.records[it["source_key"]] for it in items]
        # every variant of a source starts from the energy sample's noise (the reference seeds each
        # variant's run alike): the no_grad image is the energy sample's first-round image
        seeds = [sample_seed(ctx.cfg, self.key({**it, "variant": "energy"})) for it in items]
        jobs = [
            InpaintJob(load_image(rec, pipe.resolution), it["prompt"], seed,
                       center_box_mask(pipe.resolution) if g.mask == "box" else None, m_out)
            for it, rec, seed in zip(items, recs, seeds, strict=True)
        ]
        rounds = [BOUNDARY_VARIANTS[it.get("variant", "energy")].rounds(g) for it in items]
        results: list = [None] * len(items)
        for n_rounds in dict.fromkeys(rounds):  # one sampler batch per variant (a shard may hold two)
            idx = [i for i, r in enumerate(rounds) if r == n_rounds]
            done = boundary_inpaint_batch(
                pipe, [jobs[i] for i in idx], score_fn=score_fn, rounds=n_rounds, steps=g.steps,
                strength=g.strength, guidance=g.guidance, lr=g.lr, grad_batch=g.grad_batch,
            )
            for i, res in zip(idx, done, strict=True):
                results[i] = res
        out = []
        for it, rec, seed, result, n_rounds in zip(items, recs, seeds, results, rounds, strict=True):
            key = self.key(it)
            r = row(
                key,
                "ok",
                "ok",
                None,
                kind=self.columns(it)["kind"],
                source_key=rec.key,
                class_idx=rec.class_idx,
                prompt=it["prompt"],
                seed=seed,
                rounds=n_rounds,
                score_before=result.score_before,
                score_after=result.score_after,
                prompt_id="synood_context",
                model_id=ctx.cfg.models.diffusion.name,
                moved_toward_ood=result.moved_toward_ood,
            )
            ctx.log(
                f"[generate] {key}: energy score {result.score_before:.2f} -> {result.score_after:.2f} "
                f"(target {result.m_out:.2f}, {n_rounds} rounds, moved toward OOD: {result.moved_toward_ood})"
            )
            out.append((r, sample_files(r, result.image, round_scores=result.round_scores)))
        return out


@GENERATORS.register("t2i")
class TextToImageGenerator(Generator):
    """MM-OOD far branch: ``images_per_label`` text-to-image samples of each kept sketched label."""

    name = "t2i"

    def config_slice(self, cfg: RunConfig) -> dict:
        g = cfg.generate
        return {
            "seed": cfg.seed,
            "t2i": cfg.models.t2i.key_dump(),
            "generate": {k: getattr(g, k) for k in ("t2i_steps", "t2i_guidance", "t2i_template", "t2i_batch")}
            | _round(g) | ({"t2i_negative_labels": g.t2i_negative_labels} if "negative" in g.t2i_kinds else {}),
        }

    def shard_size(self, cfg: RunConfig) -> int:
        return cfg.generate.t2i_shard_size

    def batch_size(self, cfg: RunConfig) -> int:
        return cfg.generate.t2i_batch

    def model(self, ctx: StageContext):
        return ctx.models.text_to_image()

    def items(self, ctx: StageContext) -> list[dict]:
        g = ctx.cfg.generate
        items = []
        for kind in g.t2i_kinds:  # config order, then sketch order: a stable plan
            for r in t2i_label_rows(ctx, kind):
                for i in range(g.images_per_label):
                    items.append({"generator": self.name, "kind": kind, "label": r["text"], "label_key": r["key"],
                                  "class_idx": r["class_idx"] if r["class_idx"] is not None else -1, "index": i})
        return items

    def key(self, item: dict) -> str:
        return f"t2i_{item['label_key']}_{item['index']:02d}"

    def columns(self, item: dict) -> dict:
        return {"kind": item["kind"], "class_idx": item["class_idx"], "label": item["label"],
                "label_key": item["label_key"]}

    def generate_batch(self, ctx: StageContext, items: list[dict]) -> list[tuple[dict, dict[str, bytes]]]:
        from ood_core.prompts import T2I_TEMPLATES

        g = ctx.cfg.generate
        pipe = ctx.models.text_to_image()
        template = T2I_TEMPLATES[g.t2i_template]
        prompts = [template.format(label=it["label"]) for it in items]
        seeds = [sample_seed(ctx.cfg, self.key(it)) for it in items]
        t0 = time.perf_counter()
        images = pipe.generate(prompts, seeds, steps=g.t2i_steps, guidance=g.t2i_guidance)
        per_image = round((time.perf_counter() - t0) / len(items), 3)
        ctx.log(f"[generate] {len(items)} text-to-image samples in one batch, {per_image:.2f} s each")
        results = []
        for it, prompt, seed, image in zip(items, prompts, seeds, images, strict=True):
            r = row(self.key(it), "ok", "ok", None, **self.columns(it), prompt=prompt, prompt_id=g.t2i_template,
                    seed=seed, model_id=ctx.cfg.models.t2i.name)
            results.append((r, sample_files(r, image)))
        return results


def noise_image(seed: int, size: int):
    """A seeded RGB noise image: uniform noise on a random grid (1 px to size/4 px cells), upsampled
    bilinearly, so the set spans white noise to coloured blobs (Hendrycks et al.'s noise outliers)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    cells = int(rng.integers(2, size + 1)) if rng.random() < 0.5 else int(rng.integers(2, max(3, size // 4)))
    grid = rng.integers(0, 256, size=(cells, cells, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((size, size), Image.BILINEAR), cells


@GENERATORS.register("noise")
class NoiseGenerator(Generator):
    """Control: ``noise_per_source`` noise images per boundary source, in place of generated ones
    (same source key and class, so finetune pairs them as it pairs boundary samples)."""

    name = "noise"

    def config_slice(self, cfg: RunConfig) -> dict:
        g = cfg.generate
        return {"seed": cfg.seed, "resolution": cfg.models.diffusion.resolution,
                "generate": {"noise_per_source": g.noise_per_source, "shard_size": g.shard_size} | _round(g)}

    def shard_size(self, cfg: RunConfig) -> int:
        return cfg.generate.shard_size

    def items(self, ctx: StageContext) -> list[dict]:
        n = ctx.cfg.generate.noise_per_source
        return [{"generator": self.name, "source_key": r["source_key"], "class_idx": r["class_idx"], "index": i}
                for r in (ctx.upstream_rows("sketch", kind="context", status="kept") if n else []) for i in range(n)]

    def key(self, item: dict) -> str:
        return f"noise_{item['source_key']}_{item['index']:02d}"

    def columns(self, item: dict) -> dict:
        return {"kind": "noise", "source_key": item["source_key"], "class_idx": item["class_idx"]}

    def batch_size(self, cfg: RunConfig) -> int:
        return cfg.generate.shard_size  # no model: a shard's noise images in one batch

    def model(self, ctx: StageContext):
        return None

    def generate_batch(self, ctx: StageContext, items: list[dict]) -> list[tuple[dict, dict[str, bytes]]]:
        results = []
        for it in items:
            seed = sample_seed(ctx.cfg, self.key(it))
            image, cells = noise_image(seed, ctx.cfg.models.diffusion.resolution)
            r = row(self.key(it), "ok", "ok", None, **self.columns(it), seed=seed, prompt=f"noise:{cells}",
                    prompt_id="noise", model_id="noise")
            results.append((r, sample_files(r, image)))
        return results
def t2i_label_rows(ctx: StageContext, kind: str) -> list[dict]:
    """The kept sketch rows of ``kind`` drawn as text-to-image samples; for ``negative`` a seeded
    sample of ``generate.t2i_negative_labels`` of them (sketch order kept)."""
    rows = ctx.upstream_rows("sketch", kind=kind, status="kept")
    limit = ctx.cfg.generate.t2i_negative_labels
    if kind != "negative" or limit is None or limit >= len(rows):
        return rows
    import numpy as np

    rng = np.random.default_rng(derive_seed(ctx.cfg.seed, "t2i_negative"))
    return [rows[i] for i in sorted(rng.choice(len(rows), size=limit, replace=False).tolist())]


def known_outlier_labels(ctx: StageContext) -> list[str]:
    """The kept sketched far / near / fine labels, in sketch order (the known outlier concepts)."""
    return [r["text"] for r in ctx.upstream_rows("sketch", status="kept") if r["kind"] in ("far", "near", "fine")]


@GENERATORS.register("multi_os")
class MultiOSGenerator(Generator):
    """Multi-OS (seed 001): concept texts in the semantic blank areas (``ood_core.multi_os``), each
    painted by the text-to-image model and scored for CLIP image-text alignment.

    One row per candidate: ``rejected`` with its reason when the text is never made
    (``no_label_parsed``, a bound's cut, ``no_blank_words``), fails hygiene (its verdict's reason,
    ``leaks_eval_ood``) or lies outside every blank area (``not_blank``); else its image's row,
    ``ok`` or ``rejected`` / ``misaligned`` (``generate.multi_os.alignment_margin``).
    """

    name = "multi_os"

    def config_slice(self, cfg: RunConfig) -> dict:
        # the lexicon, label hygiene and the MLLM are sketch's settings: in the key as its upstream key
        g = cfg.generate
        return {
            "seed": cfg.seed,
            "t2i": cfg.models.t2i.key_dump(),
            "clip": cfg.models.clip.model_dump(mode="json"),
            "generate": {k: getattr(g, k) for k in ("t2i_steps", "t2i_guidance", "t2i_template")}
            | {"multi_os": g.multi_os.model_dump(mode="json")} | _round(g),
        }

    def shard_size(self, cfg: RunConfig) -> int:
        return cfg.generate.multi_os.shard_size

    def batch_size(self, cfg: RunConfig) -> int:
        return cfg.generate.multi_os.batch

    def model(self, ctx: StageContext):
        return ctx.models.text_to_image()

    def items(self, ctx: StageContext) -> list[dict]:
        from ood_core.lexicon import load_lexicon
        from ood_core.multi_os import ORIGINS, plan_candidates

        mc, sc = ctx.cfg.generate.multi_os, ctx.cfg.sketch
        counts = {origin: getattr(mc, field) for origin, field in ORIGINS.items()}
        if not any(counts.values()):
            return []
        words = load_lexicon(sc.lexicon, sc.lexicon_limit).nouns if counts["blank"] else []
        items = plan_candidates(counts, list(ctx.dataset.classnames), known_outlier_labels(ctx), words, ctx.cfg.seed)
        return [{"generator": self.name, **it} for it in items]

    def key(self, item: dict) -> str:
        return f"mos_{item['origin']}_{item['index']:04d}"

    def columns(self, item: dict) -> dict:
        return {"kind": "multi_os", "class_idx": -1, "origin": item["origin"],
                "concept_sources": json.dumps(item["sources"])}

    def _space(self, ctx: StageContext) -> dict:
        """The known concepts' text embeddings, the blank threshold and the blank-area lexicon words
        (once per stage run: every batch of the run shares them)."""
        if "multi_os_space" not in ctx.__dict__:
            from ood_core.lexicon import load_lexicon
            from ood_core.multi_os import blank_scores, blank_threshold
            from ood_core.stages.base import ID_PROMPT

            sc = ctx.cfg.sketch
            known = list(dict.fromkeys(list(ctx.dataset.classnames) + known_outlier_labels(ctx)))
            anchors = ctx.text_features([ID_PROMPT.format(c) for c in known]).numpy()
            tau = blank_threshold(anchors, ctx.cfg.generate.multi_os.blank_quantile)
            words = [w for w in load_lexicon(sc.lexicon, sc.lexicon_limit).nouns if w not in set(known)]
            word_feats = ctx.text_features([ID_PROMPT.format(w) for w in words]).numpy() if words else None
            blank = blank_scores(word_feats, anchors)[0] < tau if words else None
            ctx.__dict__["multi_os_space"] = {"known": known, "anchors": anchors, "tau": tau, "words": words,
                                              "word_feats": word_feats, "blank_words": blank}
            ctx.log(f"[generate] multi_os: {len(known)} known concepts, blank threshold {tau:.4f} "
                    f"(quantile {ctx.cfg.generate.multi_os.blank_quantile:g} of nearest-neighbour cosines), "
                    f"{int(blank.sum()) if words else 0}/{len(words)} lexicon words in blank areas")
        return ctx.__dict__["multi_os_space"]

    def _texts(self, ctx: StageContext, items: list[dict]) -> list[dict]:
        """Per item its concept text or the reason there is none, and the MLLM's raw answer."""
        from ood_core.labels import answer_labels, bound_answer
        from ood_core.models.mllm import chat_batch
        from ood_core.multi_os import LLM_ORIGINS, interpolate, nearest_words
        from ood_core.prompts import MULTI_OS_PROMPTS
        from ood_core.stages.base import ID_PROMPT

        mc, spec = ctx.cfg.generate.multi_os, ctx.cfg.models.mllm
        max_words = ctx.cfg.sketch.max_label_words
        out = [{"text": None, "reason": None, "error": None, "answer": None} for _ in items]
        asked = [j for j, it in enumerate(items) if it["origin"] in LLM_ORIGINS]
        if asked:
            convs = []
            for j in asked:
                src = items[j]["sources"]
                q = MULTI_OS_PROMPTS[getattr(mc, LLM_ORIGINS[items[j]["origin"]])].format(
                    a=src[0], b=src[-1], max_words=max_words)
                convs.append([{"role": "user", "content": [{"type": "text", "text": q}]}])
            seeds = [derive_seed(ctx.cfg.seed, "multi_os", self.key(items[j])) for j in asked]
            for j, reply in zip(asked, chat_batch(ctx.models.mllm(), convs, seeds=seeds), strict=True):
                if isinstance(reply, Exception):
                    out[j].update(reason="mllm_error", error=f"{type(reply).__name__}: {reply}")
                    continue
                reply, cut = bound_answer(reply, spec.max_answer_bytes)
                labels, cut2 = answer_labels(reply, max_words, spec.max_answer_labels)
                cut = cut or cut2
                out[j]["answer"] = reply
                if cut:  # an answer that ignored its bounds is not trusted to name a concept
                    out[j].update(reason=cut.reason, error=cut.detail)
                elif not labels:  # the tiny / world MLLM may answer anything: a recorded rejection
                    out[j]["reason"] = "no_label_parsed"
                else:
                    out[j]["text"] = labels[0]
        space = None
        for j, it in enumerate(items):
            if it["origin"] == "blank":
                out[j]["text"] = it["sources"][0]
            elif it["origin"] == "embed_interp":
                space = space or self._space(ctx)
                if space["words"]:
                    a, b = ctx.text_features([ID_PROMPT.format(c) for c in it["sources"]]).numpy()
                    allowed = space["blank_words"] & ~np.isin(space["words"], it["sources"])
                    near = nearest_words(interpolate(a, b, mc.interp_weight), space["word_feats"], space["words"],
                                         allowed, mc.interp_words, max_words)
                else:
                    near = []
                if near:
                    out[j]["text"] = " ".join(near)
                else:
                    out[j]["reason"] = "no_blank_words"
        return out

    def generate_batch(self, ctx: StageContext, items: list[dict]) -> list[tuple[dict, dict[str, bytes]]]:
        """Texts of every item, hygiene, the blank-area check, then images of the kept texts (one
        text-to-image batch) with their alignment."""
        from ood_core.multi_os import blank_scores
        from ood_core.prompts import T2I_TEMPLATES
        from ood_core.stages.base import ID_PROMPT
        from ood_core.stages.elaborate import hygiene

        g, mc = ctx.cfg.generate, ctx.cfg.generate.multi_os
        space = self._space(ctx)
        made = self._texts(ctx, items)
        named = [j for j, m in enumerate(made) if m["text"] is not None]
        for j, v in zip(named, hygiene(ctx, [made[j]["text"] for j in named], ctx.cfg.sketch.max_label_words),
                        strict=True):
            made[j]["text"] = v.label
            if v.status != "kept":
                made[j]["reason"] = v.reason
            elif v.leakage and not ctx.cfg.sketch.keep_leaked_labels:
                made[j]["reason"] = "leaks_eval_ood"
        named = [j for j in named if made[j]["reason"] is None]
        text_feats = {}
        if named:
            feats = ctx.models.clip().encode_texts([ID_PROMPT.format(made[j]["text"]) for j in named]).numpy()
            score, nearest = blank_scores(feats, space["anchors"])
            for j, f, s_, n_ in zip(named, feats, score, nearest, strict=True):
                made[j].update(blank_score=float(s_), nearest_known=space["known"][int(n_)])
                if s_ >= space["tau"]:
                    made[j]["reason"] = "not_blank"
                else:
                    text_feats[j] = f
        results: list[tuple[dict, dict[str, bytes] | None]] = []

        def cols(j: int) -> dict:
            m = made[j]
            return {**self.columns(items[j]), "label": m["text"], "mllm_answer": m["answer"],
                    "blank_score": m.get("blank_score"), "blank_threshold": space["tau"],
                    "nearest_known": m.get("nearest_known")}

        painted = sorted(text_feats)
        images = []
        if painted:
            template = T2I_TEMPLATES[g.t2i_template]
            prompts = {j: template.format(label=made[j]["text"]) for j in painted}
            seeds = {j: sample_seed(ctx.cfg, self.key(items[j])) for j in painted}
            images = ctx.models.text_to_image().generate([prompts[j] for j in painted], [seeds[j] for j in painted],
                                                         steps=g.t2i_steps, guidance=g.t2i_guidance)
            img = ctx.models.clip().encode_images(images).numpy()
            id_cos = (img @ ctx.id_text_features.numpy().T).max(axis=1)
            painted_at = {j: i for i, j in enumerate(painted)}
        for j, it in enumerate(items):
            if j not in text_feats:
                status = "failed" if made[j]["reason"] == "mllm_error" else "rejected"
                results.append((row(self.key(it), status, made[j]["reason"], made[j]["error"], **cols(j)), None))
                continue
            i = painted_at[j]
            align, align_id = float(img[i] @ text_feats[j]), float(id_cos[i])
            ok = mc.alignment_margin is None or align - align_id > mc.alignment_margin
            r = row(self.key(it), "ok" if ok else "rejected", "ok" if ok else "misaligned", None, **cols(j),
                    prompt=prompts[j], prompt_id=g.t2i_template, seed=seeds[j], model_id=ctx.cfg.models.t2i.name,
                    alignment=align, alignment_id=align_id)
            results.append((r, sample_files(r, images[i])))
        ctx.log(f"[generate] multi_os: {len(items)} candidates, {len(named)} texts checked, "
                f"{len(text_feats)} in blank areas painted")
        return results


def throughput(shard_stats: list[dict]) -> dict:
    """``{generator: {images, seconds, images_per_s, s_per_image, batch_size, batch_used}}`` summed
    over shards, each a stats marker merged with its timings (shards from before throughput was
    recorded are left out; ``batch_used`` is the smallest batch any shard fell back to; the rates
    count only shards whose timings are there)."""
    out: dict[str, dict] = {}
    timed: dict[str, int] = {}
    for st in shard_stats:
        if "generator" not in st:
            continue
        t = out.setdefault(st["generator"], {"images": 0, "seconds": 0.0, "batch_size": st["batch_size"],
                                             "batch_used": st["batch_used"], "shards": 0})
        t["images"] += st["images"]
        if "generate_seconds" in st:
            t["seconds"] = round(t["seconds"] + st["generate_seconds"], 3)
            timed[st["generator"]] = timed.get(st["generator"], 0) + st["images"]
        t["batch_used"] = min(t["batch_used"], st["batch_used"])
        t["shards"] += 1
    for name, t in out.items():
        n = timed.get(name, 0)
        t["images_per_s"] = round(n / t["seconds"], 4) if t["seconds"] > 0 else None
        t["s_per_image"] = round(t["seconds"] / n, 4) if n else None
    return out


@STAGES.register("generate")
class GenerateStage(Stage):
    name = "generate"
    schema = GENERATE
    upstream = ("sketch",)
    models = ("clip", "diffusion", "t2i")
    # the closed loop (generate.scorer: latest_round) reads the previous round's finetune folder
    round_window = ("finetune",)

    def window_size(self, cfg: RunConfig) -> int:
        return 2 if cfg.generate.scorer == "latest_round" else 1

    def config_slice(self, cfg: RunConfig) -> dict:
        return {
            "seed": cfg.seed,
            "diffusion": cfg.models.diffusion.key_dump(),
            "t2i": cfg.models.t2i.key_dump(),
            "clip": cfg.models.clip.model_dump(mode="json"),
            # an empty round leaves keys as they were before rounds existed; the batch sizes
            # (batch, t2i_batch) are in: a sample's bytes depend on the batch it ran in
            "generate": cfg.generate.model_dump(mode="json", exclude=({"round"} if not cfg.generate.round else set())
                                                | ({"scorer"} if cfg.generate.scorer == "frozen" else set())
                                                | _unset_new_fields(cfg.generate)),
            # the energy scorer guiding the noise uses this scale
            "logit_scale": cfg.finetune.logit_scale,
        }

    def shard_content_slice(self, cfg: RunConfig, items: list[dict]) -> dict | None:
        return GENERATORS.get(items[0]["generator"])().config_slice(cfg) if items else None

    def plan(self, ctx: StageContext) -> list[ShardPlan]:
        plans: list[ShardPlan] = []
        for name in GENERATOR_ORDER:
            gen = GENERATORS.get(name)()
            plans += chunk(gen.items(ctx), gen.shard_size(ctx.cfg), start=len(plans))
        return plans

    def finalize(self, ctx: StageContext) -> dict:
        """Throughput per generator over this folder's shards (``_SUCCESS.json`` and the artifact)."""
        store = ctx.store
        return {"throughput": throughput([{**store.shard_stats(i), **store.shard_timing(i)}
                                          for i in store.shard_indices()])}

    def run_shard(self, ctx: StageContext, shard: ShardPlan) -> ShardOutput:
        out = ShardOutput()
        if shard.items:
            GENERATORS.get(shard.items[0]["generator"])().run(ctx, shard.items, out)
        check_not_all_failed(self.name, shard, out)
        return out

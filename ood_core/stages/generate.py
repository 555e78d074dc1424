"""Stage 2, generate: synthetic outlier images, two kinds behind one generator interface.

* ``boundary`` (SynOOD): each selected ID image is inpainted with its MLLM context prompt; the
  initial noise is pushed towards the ID/OOD boundary by the energy-score gradient
  (see ``ood_core.models.diffusion.boundary_inpaint``).
* ``far`` / ``near`` (MM-OOD's far branch): N text-to-image samples of every kept sketched
  outlier label, from a prompt template with an id (``ood_core.prompts.T2I_TEMPLATES``).

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
GENERATOR_ORDER = ("boundary", "t2i")


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


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

    def run(self, ctx: StageContext, items: list[dict], out: ShardOutput) -> None:
        """Batches of ``batch_size``; a failed batch is retried item by item so one bad item fails alone."""
        size = self.batch_size(ctx.cfg)
        for start in range(0, len(items), size):
            batch = items[start : start + size]
            if len(batch) == 1:
                self._guarded(ctx, batch, out)
                continue
            try:
                results = self.generate_batch(ctx, batch)
            except Exception as err:  # noqa: BLE001 - retried item by item below
                if is_shard_error(err):
                    raise
                for it in batch:
                    self._guarded(ctx, [it], out)
                continue
            for r, files in results:
                out.add(r, files)

    def _guarded(self, ctx: StageContext, batch: list[dict], out: ShardOutput) -> None:
        try:
            results = self.generate_batch(ctx, batch)
        except Exception as err:  # noqa: BLE001 - every candidate gets a row, failures included
            if is_shard_error(err):
                raise
            for it in batch:
                out.add(row(self.key(it), "failed", type(err).__name__, f"{type(err).__name__}: {err}",
                            **self.columns(it)))
            return
        for r, files in results:
            out.add(r, files)


GENERATORS: Registry[type[Generator]] = Registry("generator")


def _round(g) -> dict:
    # an empty generation round leaves keys as they were before rounds existed
    return {"round": g.round} if g.round else {}


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
            "diffusion": cfg.models.diffusion.model_dump(mode="json"),
            "clip": cfg.models.clip.model_dump(mode="json"),
            "generate": {k: getattr(g, k) for k in ("steps", "strength", "guidance", "rounds", "lr", "m_out",
                                                   "grad_batch", "mask")} | _round(g),
            # the energy scorer guiding the noise uses this scale
            "logit_scale": cfg.finetune.logit_scale,
        }

    def shard_size(self, cfg: RunConfig) -> int:
        return cfg.generate.shard_size

    def items(self, ctx: StageContext) -> list[dict]:
        items = [
            {"generator": self.name, "source_key": r["source_key"], "class_idx": r["class_idx"], "prompt": r["text"]}
            for r in ctx.upstream_rows("sketch", kind="context", status="kept")
        ]
        if not items:
            raise RuntimeError(
                "generate: sketch produced no kept context prompts; check the sketch manifest "
                f"({ctx.upstream['sketch'].url()}) for failed rows and their errors"
            )
        return items

    def key(self, item: dict) -> str:
        return f"syn_{item['source_key']}"

    def columns(self, item: dict) -> dict:
        return {"kind": "boundary", "source_key": item["source_key"], "class_idx": item["class_idx"],
                "prompt": item["prompt"]}

    def generate_batch(self, ctx: StageContext, items: list[dict]) -> list[tuple[dict, dict[str, bytes]]]:
        return [self._one(ctx, it) for it in items]

    def _one(self, ctx: StageContext, item: dict) -> tuple[dict, dict[str, bytes]]:
        from ood_core.data import load_image
        from ood_core.models.diffusion import boundary_inpaint, center_box_mask, energy_score_fn
        from ood_core.models.diffusion import resolve_m_out as _m_out

        g = ctx.cfg.generate
        key = self.key(item)
        pipe = ctx.models.inpainter()
        score_fn = energy_score_fn(ctx.models.clip(), ctx.id_text_features, ctx.cfg.finetune.logit_scale)
        rec = ctx.records[item["source_key"]]
        seed = sample_seed(ctx.cfg, key)
        t0 = time.perf_counter()
        result = boundary_inpaint(
            pipe,
            load_image(rec, pipe.resolution),
            item["prompt"],
            score_fn=score_fn,
            seed=seed,
            mask=center_box_mask(pipe.resolution) if g.mask == "box" else None,
            rounds=g.rounds,
            steps=g.steps,
            strength=g.strength,
            guidance=g.guidance,
            lr=g.lr,
            m_out=_m_out(g.m_out, len(ctx.dataset.classnames)),
            grad_batch=g.grad_batch,
        )
        r = row(
            key,
            "ok",
            "ok",
            None,
            kind="boundary",
            source_key=rec.key,
            class_idx=rec.class_idx,
            prompt=item["prompt"],
            seed=seed,
            rounds=g.rounds,
            score_before=result.score_before,
            score_after=result.score_after,
            prompt_id="synood_context",
            model_id=ctx.cfg.models.diffusion.name,
            seconds=round(time.perf_counter() - t0, 3),
            moved_toward_ood=result.moved_toward_ood,
        )
        ctx.log(
            f"[generate] {key}: energy score {result.score_before:.2f} -> {result.score_after:.2f} "
            f"(target {result.m_out:.2f}, {g.rounds} rounds, moved toward OOD: {result.moved_toward_ood})"
        )
        # timings stay in the manifest only: the shard's bytes depend on the seed alone
        meta = {**{k: v for k, v in r.items() if k != "seconds"}, "round_scores": result.round_scores}
        return r, {"png": png_bytes(result.image), "json": json.dumps(meta, sort_keys=True).encode()}


@GENERATORS.register("t2i")
class TextToImageGenerator(Generator):
    """MM-OOD far branch: ``images_per_label`` text-to-image samples of each kept sketched label."""

    name = "t2i"

    def config_slice(self, cfg: RunConfig) -> dict:
        g = cfg.generate
        return {
            "seed": cfg.seed,
            "t2i": cfg.models.t2i.model_dump(mode="json"),
            "generate": {k: getattr(g, k) for k in ("t2i_steps", "t2i_guidance", "t2i_template")} | _round(g),
        }

    def shard_size(self, cfg: RunConfig) -> int:
        return cfg.generate.t2i_shard_size

    def batch_size(self, cfg: RunConfig) -> int:
        return cfg.generate.t2i_batch

    def items(self, ctx: StageContext) -> list[dict]:
        g = ctx.cfg.generate
        items = []
        for kind in g.t2i_kinds:  # config order, then sketch order: a stable plan
            for r in ctx.upstream_rows("sketch", kind=kind, status="kept"):
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
                    seed=seed, model_id=ctx.cfg.models.t2i.name, seconds=per_image)
            meta = {k: v for k, v in r.items() if k != "seconds"}
            results.append((r, {"png": png_bytes(image), "json": json.dumps(meta, sort_keys=True).encode()}))
        return results


@STAGES.register("generate")
class GenerateStage(Stage):
    name = "generate"
    schema = GENERATE
    upstream = ("sketch",)
    models = ("clip", "diffusion", "t2i")

    def config_slice(self, cfg: RunConfig) -> dict:
        return {
            "seed": cfg.seed,
            "diffusion": cfg.models.diffusion.model_dump(mode="json"),
            "t2i": cfg.models.t2i.model_dump(mode="json"),
            "clip": cfg.models.clip.model_dump(mode="json"),
            # an empty round leaves keys as they were before rounds existed
            "generate": cfg.generate.model_dump(mode="json", exclude={"round"} if not cfg.generate.round else None),
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

    def run_shard(self, ctx: StageContext, shard: ShardPlan) -> ShardOutput:
        out = ShardOutput()
        if shard.items:
            GENERATORS.get(shard.items[0]["generator"])().run(ctx, shard.items, out)
        check_not_all_failed(self.name, shard, out)
        return out

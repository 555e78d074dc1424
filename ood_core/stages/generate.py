"""Stage 2, generate: SynOOD boundary inpainting of the selected ID images.

Each source image is inpainted with its MLLM context prompt; the initial noise is pushed towards
the ID/OOD boundary by the energy-score gradient (see ``ood_core.models.diffusion``).
"""

from __future__ import annotations

import io
import json

from ood_core.config import RunConfig
from ood_core.stages.base import (
    STAGES,
    ShardOutput,
    ShardPlan,
    Stage,
    StageContext,
    check_not_all_failed,
    chunk,
    derive_seed,
    guarded,
    row,
)
from schemas import GENERATE


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@STAGES.register("generate")
class GenerateStage(Stage):
    name = "generate"
    schema = GENERATE
    upstream = ("sketch",)

    def config_slice(self, cfg: RunConfig) -> dict:
        return {
            "seed": cfg.seed,
            "diffusion": cfg.models.diffusion.model_dump(mode="json"),
            "clip": cfg.models.clip.model_dump(mode="json"),
            # an empty round leaves keys as they were before rounds existed
            "generate": cfg.generate.model_dump(mode="json", exclude={"round"} if not cfg.generate.round else None),
            # the energy scorer guiding the noise uses this scale
            "logit_scale": cfg.finetune.logit_scale,
        }

    def plan(self, ctx: StageContext) -> list[ShardPlan]:
        items = [
            {"source_key": r["source_key"], "class_idx": r["class_idx"], "prompt": r["text"]}
            for r in ctx.upstream_rows("sketch", kind="context", status="kept")
        ]
        if not items:
            raise RuntimeError(
                "generate: sketch produced no kept context prompts; check the sketch manifest "
                f"({ctx.upstream['sketch'].url()}) for failed rows and their errors"
            )
        return chunk(items, ctx.cfg.generate.shard_size)

    def run_shard(self, ctx: StageContext, shard: ShardPlan) -> ShardOutput:
        out = ShardOutput()
        for item in shard.items:
            key = f"syn_{item['source_key']}"
            guarded(
                out,
                key,
                lambda item=item, key=key: self._one(ctx, out, item, key),
                kind="boundary",
                source_key=item["source_key"],
                class_idx=item["class_idx"],
                prompt=item["prompt"],
            )
        check_not_all_failed(self.name, shard, out)
        return out

    def _one(self, ctx: StageContext, out: ShardOutput, item: dict, key: str) -> None:
        from ood_core.data import load_image
        from ood_core.models.diffusion import boundary_inpaint, center_box_mask, energy_score_fn

        g = ctx.cfg.generate
        pipe = ctx.models.inpainter()
        score_fn = energy_score_fn(ctx.models.clip(), ctx.id_text_features, ctx.cfg.finetune.logit_scale)
        rec = ctx.records[item["source_key"]]
        seed = derive_seed(ctx.cfg.seed, "generate", key, *([ctx.cfg.generate.round] if ctx.cfg.generate.round else []))
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
            m_out=g.m_out,
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
        )
        ctx.log(
            f"[generate] {key}: energy score {result.score_before:.2f} -> {result.score_after:.2f} "
            f"(target {g.m_out}, {g.rounds} rounds)"
        )
        meta = {**r, "round_scores": result.round_scores}
        out.add(r, {"png": png_bytes(result.image), "json": json.dumps(meta, sort_keys=True).encode()})

"""Stage 3, elaborate: judge and filter the generated images, assign each a negative label.

CLIP filters: blank/NaN images, ID zero-shot confidence (the ID class is still visible),
an optional energy band, near-duplicates (embedding cosine within the shard). Every kept image
gets the argmax CLIP label among the mined negative labels: its training label in finetune.
"""

from __future__ import annotations

import io
import json

import numpy as np

from ood_core.config import RunConfig
from ood_core.stages.base import (
    STAGES,
    ShardOutput,
    ShardPlan,
    Stage,
    StageContext,
    chunk,
    row,
)
from schemas import ELABORATE


@STAGES.register("elaborate")
class ElaborateStage(Stage):
    name = "elaborate"
    schema = ELABORATE
    upstream = ("sketch", "generate")
    models = ("clip",)

    def config_slice(self, cfg: RunConfig) -> dict:
        return {
            "clip": cfg.models.clip.model_dump(mode="json"),
            "logit_scale": cfg.finetune.logit_scale,
            "elaborate": cfg.elaborate.model_dump(mode="json"),
        }

    def plan(self, ctx: StageContext) -> list[ShardPlan]:
        if not ctx.negatives[0]:
            raise RuntimeError(
                "elaborate: sketch kept no negative labels; check sketch.lexicon and sketch.neg_keep_fraction"
            )
        items = [
            {"key": r["key"], "source_key": r["source_key"], "class_idx": r["class_idx"], "up_shard": r["shard"]}
            for r in ctx.upstream_rows("generate", status="ok")
        ]
        if not items:
            raise RuntimeError(
                f"elaborate: generate produced no images; see the failed rows in {ctx.upstream['generate'].url()}"
            )
        return chunk(items, ctx.cfg.elaborate.shard_size)

    def run_shard(self, ctx: StageContext, shard: ShardPlan) -> ShardOutput:
        from PIL import Image

        ec = ctx.cfg.elaborate
        scale = ctx.cfg.finetune.logit_scale
        clip = ctx.models.clip()
        negatives = ctx.negatives[0]
        neg_feats = ctx.negative_text_features
        wanted = {it["key"] for it in shard.items}
        files = ctx.upstream["generate"].load_samples(wanted, {it["up_shard"] for it in shard.items})
        out = ShardOutput()

        images, items = [], []
        for it in shard.items:
            cols = {"source_key": it["source_key"], "class_idx": it["class_idx"]}
            if it["key"] not in files or "png" not in files[it["key"]]:
                out.add(row(it["key"], "failed", "missing_image", "image not found in generate shard", **cols))
                continue
            image = Image.open(io.BytesIO(files[it["key"]]["png"])).convert("RGB")
            arr = np.asarray(image, dtype=np.float32)
            if not np.isfinite(arr).all() or arr.std() < 1.0:
                out.add(row(it["key"], "rejected", "blank", None, **cols))
                continue
            images.append(image)
            items.append((it, cols))
        if not images:
            return out

        feats = clip.encode_images(images)
        id_logits = scale * feats @ ctx.id_text_features.T
        id_conf = id_logits.softmax(-1).max(-1).values.numpy()
        energy = id_logits.logsumexp(-1).numpy()
        neg_idx = (feats @ neg_feats.T).argmax(-1).numpy()
        kept_feats: list[np.ndarray] = []
        for j, (it, cols) in enumerate(items):
            f = feats[j].numpy()
            dup = max((float(f @ k) for k in kept_feats), default=-1.0)
            measures = {
                "id_confidence": float(id_conf[j]),
                "energy": float(energy[j]),
                "max_dup_cosine": dup,
                "neg_label": negatives[int(neg_idx[j])],
                "neg_index": int(neg_idx[j]),
            }
            if id_conf[j] > ec.max_id_confidence:
                status, reason = "rejected", "id_class_visible"
            elif ec.energy_band and not ec.energy_band[0] <= energy[j] <= ec.energy_band[1]:
                status, reason = "rejected", "energy_out_of_band"
            elif dup > ec.dedup_cosine:
                status, reason = "rejected", "near_duplicate"
            else:
                status, reason = "kept", "ok"
                kept_feats.append(f)
            r = row(it["key"], status, reason, None, **cols, **measures)
            # rejected images are kept too (for the report's grid), marked by their row
            out.add(r, {"png": files[it["key"]]["png"], "json": json.dumps(r, sort_keys=True).encode()})
        return out


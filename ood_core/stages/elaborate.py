"""Stage 3, elaborate: judge and filter the generated images, assign each a negative label.

Multi-round MLLM elaboration (MM-OOD), one multi-turn chat per image, batched per round:
round 1 what does the image show; round 2 is the source ID class (boundary / near images) or any
of the image's CLIP top-k ID classes (far images) visible (``yes`` rejects, an answer that is
neither is ``unclear`` and handled by ``elaborate.unclear``); round 3 (far / near images) one
short outlier label, which goes through sketch's label hygiene.

CLIP filters on every kind: blank/NaN images, ID zero-shot confidence (the ID class is still
visible), an optional energy band, near-duplicates (embedding cosine within the shard, then across shards in
``finalize``: ``ood_core.dedup``). Every kept image gets the argmax CLIP label among the mined negative labels: its training label in
finetune. ``finalize`` writes the accepted outlier-label table (sketched + elaborated).
"""

from __future__ import annotations

import io
import json
import re

import numpy as np

from ood_core.config import RunConfig
from ood_core.identity import key_dump
from ood_core.stages.base import (
    ID_PROMPT,
    STAGES,
    ShardOutput,
    ShardPlan,
    Stage,
    StageContext,
    chunk,
    derive_seed,
    npy_load,
    row,
)
from schemas import ELABORATE

OUTLIER_TABLE = "outlier_labels.parquet"
T2I_KINDS = ("far", "near")
MIN_IMAGE_SIDE = 8
_YES = {"yes", "yeah", "yep", "true", "correct"}
_NO = {"no", "nope", "false"}


def parse_yes_no(answer: str | None) -> str:
    """``yes`` / ``no`` from the answer's first word, else ``unclear`` (empty, hedged, other language)."""
    m = re.match(r"^[\W_]*([a-z]+)", (answer or "").strip().lower())
    if not m:
        return "unclear"
    word = m.group(1)
    return "yes" if word in _YES else "no" if word in _NO else "unclear"


def parse_outlier_label(answer: str | None, max_words: int) -> str | None:
    """The first label in a round-3 answer (at most ``max_words`` words), or None if there is none."""
    from ood_core.labels import parse_label_list

    labels = parse_label_list(answer or "", max_words)
    return labels[0] if labels else None


def _text(s: str) -> dict:
    return {"type": "text", "text": s}


def hygiene(ctx: StageContext, labels: list[str], max_words: int | None = None):
    """Sketch's label hygiene (ID overlap by words and text cosine, dedupe, leakage flag); labels of at
    most ``max_words`` words (default ``elaborate.max_label_words``)."""
    from ood_core.labels import label_hygiene
    from ood_core.leakage import context_index

    clip = ctx.models.clip()

    def text_cosine(cands: list[str], ids: list[str]) -> np.ndarray:
        return (clip.encode_texts([ID_PROMPT.format(c) for c in cands]) @ ctx.id_text_features.T).numpy()

    return label_hygiene(
        labels,
        ctx.dataset.classnames,
        eval_ood_names=context_index(ctx),
        text_cosine=text_cosine,
        overlap_cosine=ctx.cfg.sketch.overlap_cosine,
        max_words=max_words or ctx.cfg.elaborate.max_label_words,
    )


@STAGES.register("elaborate")
class ElaborateStage(Stage):
    name = "elaborate"
    schema = ELABORATE
    upstream = ("sketch", "generate")
    models = ("clip", "elaborate_mllm")

    def config_slice(self, cfg: RunConfig) -> dict:
        return {
            "clip": cfg.models.clip.model_dump(mode="json"),
            "mllm": key_dump(cfg.elaborate.mllm or cfg.models.mllm),
            "seed": cfg.seed,
            "logit_scale": cfg.finetune.logit_scale,
            "elaborate": key_dump(cfg.elaborate),
        }

    def plan(self, ctx: StageContext) -> list[ShardPlan]:
        if not ctx.negatives[0]:
            raise RuntimeError(
                "elaborate: sketch kept no negative labels; check sketch.lexicon and sketch.neg_keep_fraction"
            )
        items = [
            {"key": r["key"], "source_key": r["source_key"], "class_idx": r["class_idx"], "up_shard": r["shard"],
             "kind": r["kind"], "label": r["label"]}
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

        # 1. decode every image; an image nobody can look at is a failed row with its reason
        images, items = [], []
        for it in shard.items:
            cols = {"source_key": it["source_key"], "class_idx": it["class_idx"], "kind": it.get("kind"),
                    "label": it.get("label")}
            if it["key"] not in files or "png" not in files[it["key"]]:
                out.add(row(it["key"], "failed", "missing_image", "image not found in generate shard", **cols))
                continue
            try:
                image = Image.open(io.BytesIO(files[it["key"]]["png"])).convert("RGB")
            except Exception as err:  # noqa: BLE001 - a broken image is this candidate's failure
                out.add(row(it["key"], "failed", "image_decode_error", f"{type(err).__name__}: {err}", **cols))
                continue
            if min(image.size) < MIN_IMAGE_SIDE:
                out.add(row(it["key"], "failed", "image_too_small",
                            f"image is {image.size[0]}x{image.size[1]} px, the MLLM needs >= {MIN_IMAGE_SIDE}", **cols))
                continue
            images.append(image)
            items.append((it, cols))
        if not images:
            return out

        # 2. CLIP measures of every image
        feats = clip.encode_images(images)
        id_logits = scale * feats @ ctx.id_text_features.T
        id_conf = id_logits.softmax(-1).max(-1).values.numpy()
        energy = id_logits.logsumexp(-1).numpy()
        neg_idx = (feats @ neg_feats.T).argmax(-1).numpy()
        k = min(ec.id_topk, id_logits.shape[1])
        topk = id_logits.topk(k, dim=-1).indices.numpy()

        # 3. multi-round MLLM elaboration and the round-3 labels' hygiene
        talks = self._elaborate(ctx, images, [it for it, _ in items], topk)
        labelled = [j for j, t in enumerate(talks) if t.get("elaborated_label")]
        verdicts = dict(zip(labelled, hygiene(ctx, [talks[j]["elaborated_label"] for j in labelled]), strict=True))

        # 4. one status and reason per image
        from ood_core.dedup import ShardDedup
        from ood_core.storage import features_npz

        feats_np = feats.numpy().astype(np.float32)
        dedup = ShardDedup(feats_np)
        for j, (it, cols) in enumerate(items):
            talk = talks[j]
            if talk.get("error"):
                out.add(row(it["key"], "failed", "mllm_error", talk["error"], **cols, **talk["cols"]))
                continue
            cuts = talk["cuts"]
            arr = np.asarray(images[j], dtype=np.float32)
            dup = dedup.max_cosine(j)
            measures = {
                "id_confidence": float(id_conf[j]),
                "energy": float(energy[j]),
                "max_dup_cosine": dup,
                "neg_label": negatives[int(neg_idx[j])],
                "neg_index": int(neg_idx[j]),
                **talk["cols"],
            }
            if j in verdicts:
                v = verdicts[j]
                measures.update(elaborated_label=v.label, label_status=v.status, label_reason=v.reason,
                                leakage=v.leakage)
            seen = talk["cols"]["id_visible"]
            if cuts:
                # a judge whose answer had to be cut (it ignored max_tokens) is not trusted to filter
                status, reason = "rejected", cuts[0].reason
            elif not np.isfinite(arr).all() or arr.std() < 1.0:
                status, reason = "rejected", "blank"
            elif ec.mllm_filter and seen == "yes":
                status, reason = "rejected", "id_visible"
            elif ec.mllm_filter and seen == "unclear" and (
                ec.unclear == "reject" or (ec.unclear == "clip" and id_conf[j] > ec.unclear_max_id_confidence)
            ):
                status, reason = "rejected", "id_visible_unclear"
            elif id_conf[j] > ec.max_id_confidence:
                status, reason = "rejected", "id_class_visible"
            elif ec.energy_band and not ec.energy_band[0] <= energy[j] <= ec.energy_band[1]:
                status, reason = "rejected", "energy_out_of_band"
            elif dup > ec.dedup_cosine:
                status, reason = "rejected", "near_duplicate"
            else:
                status, reason = "kept", "ok"
                dedup.keep(j)
            r = row(it["key"], status, reason, "; ".join(c.detail for c in cuts) or None, **cols, **measures)
            meta = {**r, "conversation": talk["conversation"]}
            # rejected images are kept too (for the report's grid), marked by their row
            out.add(r, {"png": files[it["key"]]["png"], "json": json.dumps(meta, sort_keys=True).encode()})
        # the kept images' embeddings in their own file: cross-shard dedup reads it, not the images
        out.features = features_npz([items[j][0]["key"] for j in dedup.kept], feats_np[dedup.kept])
        return out

    def _elaborate(self, ctx: StageContext, images: list, items: list[dict], topk: np.ndarray) -> list[dict]:
        """Rounds 1-3 for every image, batched per round; returns per image its columns and transcript.

        Each answer is cut to the spec's ``max_answer_bytes`` before it is stored or sent back with
        the next round's question; ``cuts`` lists what the bounds cut, per image.
        """
        from ood_core.labels import Cut, answer_labels, bound_answer
        from ood_core.models.mllm import chat_batch
        from ood_core.prompts import ELABORATE_PROMPTS as P

        ec = ctx.cfg.elaborate
        spec = ec.mllm or ctx.cfg.models.mllm
        mllm = ctx.models.elaborate_mllm()
        classnames = ctx.dataset.classnames
        convs: list[list[dict]] = []
        talks: list[dict] = []
        for j, it in enumerate(items):
            convs.append([{"role": "user", "content": [{"type": "image", "image": images[j]},
                                                       _text(P[ec.describe_prompt])]}])
            if it["class_idx"] is not None and it["class_idx"] >= 0:  # boundary / near: its source class
                asked, q2 = [classnames[it["class_idx"]]], ec.id_visible_source_prompt
            else:  # far: the image's CLIP top-k ID classes
                asked, q2 = [classnames[int(c)] for c in topk[j]], ec.id_visible_any_prompt
            rounds = [ec.describe_prompt, q2] + ([ec.label_prompt] if it.get("kind") in T2I_KINDS else [])
            talks.append({"asked": asked, "rounds": rounds, "answers": [], "error": None, "cuts": []})

        def ask(r: int) -> None:
            active = [j for j, t in enumerate(talks) if len(t["rounds"]) > r and not t["error"]]
            if not active:
                return
            seeds = [derive_seed(ctx.cfg.seed, "elaborate", items[j]["key"], r) for j in active]
            replies = chat_batch(mllm, [convs[j] for j in active], seeds=seeds)
            for j, reply in zip(active, replies, strict=True):
                if isinstance(reply, Exception):
                    talks[j]["error"] = f"round {r + 1}: {type(reply).__name__}: {reply}"
                    continue
                reply, cut = bound_answer(reply, spec.max_answer_bytes)
                if cut:
                    talks[j]["cuts"].append(Cut(cut.reason, f"round {r + 1}: {cut.detail}"))
                talks[j]["answers"].append(reply)
                convs[j].append({"role": "assistant", "content": [_text(reply)]})
                if len(talks[j]["rounds"]) > r + 1:  # the next question, with every earlier turn in context
                    pid = talks[j]["rounds"][r + 1]
                    q = P[pid].format(classes=", ".join(talks[j]["asked"]), max_words=ec.max_label_words)
                    convs[j].append({"role": "user", "content": [_text(q)]})

        for r in range(3):
            ask(r)
        for j, t in enumerate(talks):
            answers = t["answers"] + [None] * (3 - len(t["answers"]))
            t["cols"] = {
                "mllm_model": spec.name,
                "prompt_ids": json.dumps(t["rounds"]),
                "asked_classes": json.dumps(t["asked"]),
                "answer_describe": answers[0],
                "answer_id_visible": answers[1],
                "answer_label": answers[2],
                "id_visible": parse_yes_no(answers[1]) if answers[1] is not None else None,
            }
            if len(t["rounds"]) == 3 and answers[2] is not None:
                labels, cut = answer_labels(answers[2], ec.max_label_words, spec.max_answer_labels)
                if cut:
                    t["cuts"].append(Cut(cut.reason, f"round 3: {cut.detail}"))
                label = labels[0] if labels else None
                t["elaborated_label"] = label
                if label is None:
                    t["cols"].update(label_status="rejected", label_reason="no_label_parsed")
            t["conversation"] = [
                {"role": m["role"], "text": " ".join(p["text"] for p in m["content"] if p["type"] == "text")}
                for m in convs[j]
            ]
        return talks

    def finalize(self, ctx: StageContext) -> dict:
        """Write the accepted outlier-label table and the cross-shard near-duplicates; return their counts."""
        table = outlier_label_rows(ctx)
        write_outlier_table(ctx, table)
        counts: dict[str, int] = {}
        for r in table:
            k = f"{r['origin']}:{r['status']}"
            counts[k] = counts.get(k, 0) + 1
        from ood_core.models import resolve_device

        dups = write_cross_shard_duplicates(ctx.store, ctx.cfg.elaborate.dedup_cosine,
                                            resolve_device(ctx.cfg.models.device))
        return {"outlier_labels": counts, **dups}


def outlier_label_rows(ctx: StageContext) -> list[dict]:
    """Sketched far/near labels + every elaborated label with its fate (origin, status, reason, leakage).

    Elaborated labels are deduplicated across shards and against the sketched labels; a label
    from an image that elaborate did not keep is rejected with reason ``image_rejected``.
    """
    rows: list[dict] = []
    seen: set[str] = set()
    for r in ctx.upstream_rows("sketch", status="kept"):
        if r["kind"] in T2I_KINDS:
            rows.append({"label": r["text"], "origin": "sketch", "kind": r["kind"], "status": "kept", "reason": "ok",
                         "leakage": bool(r["leakage"]), "image_key": None, "source_label": None})
            seen.add(r["text"])
    for r in ctx.store.read_manifest().to_pylist():
        if r["kind"] not in T2I_KINDS or r["answer_label"] is None:
            continue
        status, reason = r["label_status"] or "rejected", r["label_reason"] or "no_label_parsed"
        label = r["elaborated_label"]
        if status == "kept" and r["status"] != "kept":
            status, reason = "rejected", "image_rejected"
        elif status == "kept" and label in seen:
            status, reason = "rejected", "duplicate"
        if status == "kept":
            seen.add(label)
        rows.append({"label": label, "origin": "elaborate", "kind": r["kind"], "status": status, "reason": reason,
                     "leakage": bool(r["leakage"]), "image_key": r["key"], "source_label": r["label"]})
    return rows


def write_outlier_table(ctx: StageContext, rows: list[dict]) -> None:
    import pyarrow as pa

    from ood_core.storage import parquet_bytes

    schema = pa.schema([("label", pa.string()), ("origin", pa.string()), ("kind", pa.string()),
                        ("status", pa.string()), ("reason", pa.string()), ("leakage", pa.bool_()),
                        ("image_key", pa.string()), ("source_label", pa.string())])
    table = pa.Table.from_pylist(rows, schema=schema)
    ctx.store.write_bytes(ctx.store.path("artifacts", OUTLIER_TABLE), parquet_bytes(table))


def read_outlier_table(store) -> list[dict]:
    """The outlier-label table of a complete elaborate folder."""
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(store.read_bytes(store.path("artifacts", OUTLIER_TABLE)))).to_pylist()


DUPLICATES_ARTIFACT = "cross_shard_duplicates.json"


def kept_features(store, index: int) -> tuple[list[str], np.ndarray]:
    """One elaborate shard's kept keys and embeddings: its feature file (older shards: the tar's ``npy`` members)."""
    found = store.read_features(index)
    if found is not None:
        return found
    kept = [(k, npy_load(f["npy"])) for k, f in store.iter_samples(index, rejected=False) if "npy" in f]
    return [k for k, _ in kept], np.stack([f for _, f in kept]) if kept else np.zeros((0, 1), np.float32)


def write_cross_shard_duplicates(store, threshold: float, device=None) -> dict:
    from ood_core.dedup import cross_shard_duplicates

    shards = (kept_features(store, i) for i in store.shard_indices())
    dups = cross_shard_duplicates(shards, threshold, device)
    store.write_json(store.path("artifacts", DUPLICATES_ARTIFACT), {k: list(v) for k, v in dups.items()})
    return {"cross_shard_duplicates": len(dups)}


def read_cross_shard_duplicates(store) -> dict[str, list]:
    """Kept images that duplicate an earlier shard's: ``{key: [matched key, cosine]}``."""
    path = store.path("artifacts", DUPLICATES_ARTIFACT)
    return store.read_json(path) if store.exists(path) else {}


"""Stage 1, sketch: outlier labels and prompts.

Shards: far-OOD labels (one MLLM conversation over the whole ID label set), fine-grained labels
(EOE's third task: other kinds of the ID super-category, ``sketch.fine_labels``), near-OOD labels
(per class chunk, optionally showing the MLLM k ID images), negative labels mined from a lexicon
with CLIP (NegLabel NegMining), and SynOOD context prompts for the selected source images.
"""

from __future__ import annotations

import json
import math

import numpy as np

from ood_core.config import RunConfig
from ood_core.identity import content_spec, data_content, key_dump
from ood_core.leakage import context_index
from ood_core.leakage import key_slice as leakage_key
from ood_core.prompts import context_request, far_opening, far_request, fine_request, near_request  # noqa: E402
from ood_core.stages.base import (
    ID_PROMPT,
    STAGES,
    ShardOutput,
    ShardPlan,
    Stage,
    StageContext,
    check_not_all_failed,
    chunk,
    derive_seed,
    guarded,
    is_shard_error,
    row,
)
from schemas import SKETCH


def _text(*parts: str) -> dict:
    return {"type": "text", "text": " ".join(parts)}


def _files(r: dict) -> dict[str, bytes]:
    return {"json": json.dumps(r, sort_keys=True).encode()}


def _cut_rows(out: ShardOutput, key: str, cuts: list, **cols) -> None:
    """Each bound that cut an answer (:class:`ood_core.labels.Cut`) is a rejected row: the part cut off."""
    for c in cuts:
        if c is not None:
            out.add(row(f"{key}_{c.reason}", "rejected", c.reason, c.detail, **cols))


def _chat(ctx: StageContext, out: ShardOutput, messages: list[dict], seed: int, key: str, **cols) -> str:
    """One MLLM answer, cut to ``models.mllm.max_answer_bytes`` (a cut is a row)."""
    from ood_core.labels import bound_answer

    reply, cut = bound_answer(ctx.models.mllm().chat(messages, seed=seed), ctx.cfg.models.mllm.max_answer_bytes)
    _cut_rows(out, key, [cut], **cols)
    return reply


def _labels(ctx: StageContext, out: ShardOutput, reply: str, key: str, **cols) -> list[str]:
    """The answer's labels, at most ``models.mllm.max_answer_labels`` list items read (a cut is a row)."""
    from ood_core.labels import answer_labels

    sc = ctx.cfg.sketch
    labels, cut = answer_labels(reply, sc.max_label_words, ctx.cfg.models.mllm.max_answer_labels)
    _cut_rows(out, key, [cut], **cols)
    return labels


@STAGES.register("sketch")
class SketchStage(Stage):
    name = "sketch"
    schema = SKETCH
    models = ("clip", "mllm")

    def config_slice(self, cfg: RunConfig) -> dict:
        return {
            "seed": cfg.seed,
            "data": data_content(cfg.data, cfg.seed),
            "clip": cfg.models.clip.model_dump(mode="json"),
            "mllm": content_spec(cfg.models.mllm),
            "sketch": key_dump(cfg.sketch),
            # the names' matching rule (and the WordNet it reads) decides which labels are rejected
            "leakage": leakage_key(cfg.sketch.leakage_match),
        }

    def listed_bad_inputs(self, ctx: StageContext) -> list:
        return list(ctx.dataset.bad_inputs)

    # ------------------------------------------------------------ plan
    def plan(self, ctx: StageContext) -> list[ShardPlan]:
        from ood_core.data import select_sources

        sc = ctx.cfg.sketch
        plans: list[ShardPlan] = []
        if sc.far_labels > 0:
            plans.append(ShardPlan(len(plans), [{"kind": "far"}]))
            # EOE's further label sets: each its own conversation, shard and marker
            plans += [ShardPlan(len(plans) + k - 1, [{"kind": "far", "label_set": k}])
                      for k in range(1, sc.far_label_sets)]
        plans.append(ShardPlan(len(plans), [{"kind": "negative"}]))
        if sc.fine_labels > 0:
            plans.append(ShardPlan(len(plans), [{"kind": "fine"}]))
        if sc.near_per_class > 0:
            near = [{"kind": "near", "class_idx": i} for i in range(len(ctx.dataset.classnames))]
            plans += chunk(near, sc.shard_size, start=len(plans))
        sources = select_sources(ctx.dataset, sc.sources_per_class, ctx.cfg.data.empty_class)
        ctx_items = [{"kind": "context", "source_key": r.key, "class_idx": r.class_idx} for r in sources]
        plans += chunk(ctx_items, sc.shard_size, start=len(plans))
        return plans

    # ------------------------------------------------------------ run
    def run_shard(self, ctx: StageContext, shard: ShardPlan) -> ShardOutput:
        out = ShardOutput()
        kind = shard.items[0]["kind"]
        if kind == "far":
            self._far(ctx, out, shard.items[0].get("label_set", 0))
        elif kind == "negative":
            self._negatives(ctx, out)
        elif kind == "fine":
            self._fine(ctx, out)
        elif kind == "near":
            for item in shard.items:
                self._near(ctx, out, item["class_idx"])
        else:
            for item in shard.items:
                key = f"ctx_{item['source_key']}"
                guarded(
                    out,
                    key,
                    lambda item=item, key=key: self._context(ctx, out, item, key),
                    kind="context",
                    source_key=item["source_key"],
                    class_idx=item["class_idx"],
                )
        check_not_all_failed(self.name, shard, out)
        return out

    def _hygiene(self, ctx: StageContext, out: ShardOutput, labels: list[str], kind: str, prefix: str, **cols):
        from ood_core.labels import label_hygiene

        clip = ctx.models.clip()
        eval_names = context_index(ctx)
        classnames = ctx.dataset.classnames

        def text_cosine(cands: list[str], ids: list[str]) -> np.ndarray:
            # ids are always the ID class names, whose prompt features the context already holds
            return (clip.encode_texts([ID_PROMPT.format(c) for c in cands]) @ ctx.id_text_features.T).numpy()

        verdicts = label_hygiene(
            labels,
            classnames,
            eval_ood_names=eval_names,
            text_cosine=text_cosine,
            overlap_cosine=ctx.cfg.sketch.overlap_cosine,
        )
        keep_leaked = ctx.cfg.sketch.keep_leaked_labels
        for i, v in enumerate(verdicts):
            status, reason = v.status, v.reason
            if v.leakage and status == "kept" and not keep_leaked:
                # a label naming an evaluation OOD class would inflate every score that uses it
                status, reason = "rejected", "leaks_eval_ood"
            r = row(f"{prefix}_{i:05d}", status, reason, None, kind=kind, text=v.label, leakage=v.leakage, **cols)
            out.add(r, _files(r) if status == "kept" else None)

    def _far(self, ctx: StageContext, out: ShardOutput, label_set: int = 0) -> None:
        """One conversation: summarise the ID categories, then ask for labels turn by turn.

        Every turn resends the earlier answers as they were bounded (``models.mllm.max_answer_bytes``).
        ``label_set`` k > 0 is one of EOE's further label sets (``sketch.far_label_sets``): its own
        seed, row keys ``far<k>_...``, kind ``far_set`` and ``source_key`` its conversation's key.
        """
        sc = ctx.cfg.sketch
        name = "far" if label_set == 0 else f"far{label_set}"
        cols = {"kind": "far"} if label_set == 0 else {"kind": "far_set", "source_key": f"{name}_conversation"}
        seed = derive_seed(ctx.cfg.seed, "far") if label_set == 0 else derive_seed(ctx.cfg.seed, "far", label_set)
        classnames = ctx.dataset.classnames
        messages = [
            {
                "role": "user",
                "content": [
                    _text(far_opening(classnames))
                ],
            }
        ]
        labels: list[str] = []
        transcript: list[dict] = []
        max_turns = math.ceil(sc.far_labels / sc.far_per_turn) + 2
        try:
            for turn in range(max_turns + 1):
                key = f"{name}_turn{turn:02d}"
                reply = _chat(ctx, out, messages, seed + turn, key, **cols)
                transcript.append({"prompt": messages[-1]["content"][0]["text"], "reply": reply})
                messages.append({"role": "assistant", "content": [_text(reply)]})
                if turn > 0:
                    labels += [x for x in _labels(ctx, out, reply, key, **cols) if x not in labels]
                    if len(labels) >= sc.far_labels:
                        break
                messages.append(
                    {"role": "user", "content": [_text(far_request(sc.far_per_turn, turn > 0, sc.max_label_words))]}
                )
        except Exception as err:  # noqa: BLE001 - the failure is recorded as a row
            if is_shard_error(err):
                raise
            out.add(row(f"{name}_conversation", "failed", type(err).__name__, f"{type(err).__name__}: {err}", **cols))
        out.samples.append(_transcript_sample(f"{name}_conversation", transcript))
        if not labels and not any(r["status"] == "failed" for r in out.rows):
            out.add(row(f"{name}_conversation", "rejected", "no_labels_parsed", None, **cols))
        self._hygiene(ctx, out, labels[: sc.far_labels] + list(sc.far_extra_labels), cols["kind"], name,
                      **{k: v for k, v in cols.items() if k != "kind"})

    def _fine(self, ctx: StageContext, out: ShardOutput) -> None:
        """EOE's fine-grained task: other kinds of the ID super-category that are not ID classes."""
        sc = ctx.cfg.sketch
        classnames = ctx.dataset.classnames
        prompt = _text(fine_request(classnames, sc.fine_labels, sc.max_label_words))
        try:
            reply = _chat(ctx, out, [{"role": "user", "content": [prompt]}], derive_seed(ctx.cfg.seed, "fine"),
                          "fine_reply", kind="fine")
        except Exception as err:  # noqa: BLE001 - the failure is recorded as a row
            if is_shard_error(err):
                raise
            out.add(row("fine_reply", "failed", type(err).__name__, f"{type(err).__name__}: {err}", kind="fine"))
            return
        out.samples.append(_transcript_sample("fine_reply", [{"prompt": prompt["text"], "reply": reply}]))
        labels = _labels(ctx, out, reply, "fine_reply", kind="fine")[: sc.fine_labels]
        if not labels:
            out.add(row("fine_reply", "rejected", "no_labels_parsed", None, kind="fine"))
        self._hygiene(ctx, out, labels, "fine", "fine")

    def _near(self, ctx: StageContext, out: ShardOutput, class_idx: int) -> None:
        """Per class: labels that look similar but come from other domains (MM-OOD shows images)."""
        from ood_core.data import usable_images

        sc = ctx.cfg.sketch
        name = ctx.dataset.classnames[class_idx]
        records = train_by_class(ctx).get(class_idx, [])[: sc.near_images]
        images = usable_images(records, ctx.cfg.data.image_size)  # an undecodable one is left out
        content = [{"type": "image", "image": im} for im in images]
        content.append(_text(near_request(name, sc.near_per_class, sc.max_label_words, bool(images))))
        prefix = f"near_c{class_idx:04d}"
        try:
            reply = _chat(ctx, out, [{"role": "user", "content": content}], derive_seed(ctx.cfg.seed, "near", class_idx),
                          prefix, kind="near", class_idx=class_idx)
        except Exception as err:  # noqa: BLE001 - the failure is recorded as a row
            if is_shard_error(err):
                raise
            out.add(row(prefix, "failed", type(err).__name__, f"{type(err).__name__}: {err}", kind="near",
                        class_idx=class_idx))
            return
        out.samples.append(_transcript_sample(f"{prefix}_reply", [{"reply": reply}]))
        labels = _labels(ctx, out, reply, prefix, kind="near", class_idx=class_idx)[: sc.near_per_class]
        if not labels:
            out.add(row(prefix, "rejected", "no_labels_parsed", None, kind="near", class_idx=class_idx))
        self._hygiene(ctx, out, labels, "near", prefix, class_idx=class_idx)

    def _context(self, ctx: StageContext, out: ShardOutput, item: dict, key: str) -> None:
        """SynOOD: the MLLM describes the image's context without its main subject.

        An answer holding an instruction, a chat role marker or a URL is rejected (``injection``):
        it never becomes an inpainting prompt.
        """
        from ood_core.data import load_image
        from ood_core.labels import context_prompt, injection

        rec = ctx.records[item["source_key"]]
        image = load_image(rec, ctx.cfg.data.image_size)
        cols = {"kind": "context", "source_key": rec.key, "class_idx": rec.class_idx}
        reply = _chat(
            ctx,
            out,
            [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "image": image},
                        _text(context_request(rec.class_name)),
                    ],
                }
            ],
            derive_seed(ctx.cfg.seed, "context", rec.key),
            key,
            **cols,
        )
        found = injection(reply)
        if found:
            out.add(row(key, "rejected", "injection", f"the answer holds {found}: not used as a prompt", **cols))
            return
        prompt = context_prompt(reply, ctx.cfg.sketch.context_max_chars)
        r = row(key, "kept", "ok", None, text=prompt, **cols)
        out.add(r, {**_files(r), "txt": reply.encode()})

    def _negatives(self, ctx: StageContext, out: ShardOutput) -> None:
        """NegMining: keep the candidates least similar to the ID prompts (nouns, adjectives apart)."""
        from ood_core.labels import label_hygiene, normalize_label
        from ood_core.lexicon import ADJ_TEMPLATE, NOUN_TEMPLATE, load_lexicon

        sc = ctx.cfg.sketch
        lex = load_lexicon(sc.lexicon, sc.lexicon_limit)
        clip = ctx.models.clip()
        id_feats = ctx.text_features([sc.neg_id_template.format(c) for c in ctx.dataset.classnames])
        id_words = {normalize_label(c) for c in ctx.dataset.classnames}
        for pos, words, template in (("n", lex.nouns, NOUN_TEMPLATE), ("a", lex.adjectives, ADJ_TEMPLATE)):
            if not words:
                continue
            feats = clip.encode_texts([template.format(w) for w in words])
            score = neg_mining_scores((feats @ id_feats.T).numpy(), sc.neg_percentile)  # the matrix once
            keep = set(neg_mining_select(score, sc.neg_keep_fraction).tolist())
            # leakage is checked on the kept candidates only (a word-set test per evaluation name)
            kept_words = [words[i] for i in sorted(keep)]
            leaked = {v.raw for v in label_hygiene(kept_words, [], eval_ood_names=context_index(ctx)) if v.leakage}
            # rows in the order the negatives are used: the scores group them in that order
            for i in map(int, neg_row_order(score, sc.neg_order)):
                w = words[i]
                if w in id_words:
                    status, reason = "rejected", "equals_id_class"
                elif i not in keep:
                    status, reason = "rejected", "too_close_to_id"
                elif w in leaked and not sc.keep_leaked_labels:
                    status, reason = "rejected", "leaks_eval_ood"
                else:
                    status, reason = "kept", "ok"
                r = row(f"neg_{pos}{i:06d}", status, reason, None, kind="negative", text=w, score=float(score[i]),
                        leakage=w in leaked)
                out.add(r, _files(r) if status == "kept" else None)


def train_by_class(ctx: StageContext) -> dict[int, list]:
    """The ID train records per class index, in dataset order (built once per context, not per class)."""
    cache = ctx.__dict__.setdefault("_train_by_class", {})
    if "index" not in cache:
        index: dict[int, list] = {}
        for r in ctx.dataset.records:
            if r.split == "train":
                index.setdefault(r.class_idx, []).append(r)
        cache["index"] = index
    return cache["index"]


def neg_mining_scores(sim: np.ndarray, percentile: float) -> np.ndarray:
    """Each candidate's distance to ID: the ``percentile``-th percentile (linear) of its row of ``sim``."""
    return np.percentile(sim, percentile, axis=1)


def neg_mining_select(score: np.ndarray, keep_fraction: float) -> np.ndarray:
    """The ``floor(len * keep_fraction)`` least similar candidates' indices."""
    # stable sort: equal scores keep lexicon order, so the selection is reproducible
    return np.argsort(score, kind="stable")[: int(len(score) * keep_fraction)]


def neg_mining_keep(sim: np.ndarray, keep_fraction: float, percentile: float) -> np.ndarray:
    """NegLabel's NegMining (mmcls/models/classifiers/multi_modal.py@3253db6): indices kept.

    ``sim`` is (candidates x ID prompts) cosine; each candidate's distance to ID is its
    ``percentile``-th percentile similarity (``torch.quantile``, linear); the
    ``floor(len * keep_fraction)`` least similar are kept (``int(len(ind) * neg_topk)``).
    """
    return neg_mining_select(neg_mining_scores(sim, percentile), keep_fraction)


def neg_row_order(score: np.ndarray, order: str) -> np.ndarray:
    """Order of one part of speech's candidate rows, hence of its kept negatives downstream.

    ``"score"``: NegLabel's (``text_features_neg_noun[ind_noun[...]]``, ``ind = argsort(neg_sim)``):
    from the least to the most ID-like (stable on ties). ``"lexicon"``: lexicon order.
    """
    if order == "score":
        return np.argsort(score, kind="stable")
    if order == "lexicon":
        return np.arange(len(score))
    raise ValueError(f"unknown sketch.neg_order {order!r}: use 'score' or 'lexicon'")


def _transcript_sample(key: str, turns: list[dict]):
    from ood_core.storage import Sample

    return Sample(key, {"json": json.dumps(turns, indent=1).encode()})

"""Data contracts: one versioned Arrow schema per manifest kind.

Every manifest row is one candidate of one stage, also when it failed or was rejected:
``status`` is one of ``ok | kept | rejected | failed``, ``reason`` a short machine-readable word
and ``error`` the exception text of a failure. Bump a schema's version when its columns change:
the version is part of the stage key, so old folders are never read with a new schema.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

STATUSES = ("ok", "kept", "rejected", "failed")

_COMMON = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("shard", pa.int32(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("error", pa.string()),
]


@dataclass(frozen=True)
class ManifestSchema:
    stage: str
    version: int
    schema: pa.Schema

    def table(self, rows: list[dict]) -> pa.Table:
        """Rows -> a table of exactly this schema (missing optional columns become null)."""
        cols = {f.name: [r.get(f.name) for r in rows] for f in self.schema}
        return pa.Table.from_pydict(cols, schema=self.schema)


def _schema(stage: str, version: int, fields: list[pa.Field]) -> ManifestSchema:
    meta = {b"synth_ood.stage": stage.encode(), b"synth_ood.schema_version": str(version).encode()}
    return ManifestSchema(stage, version, pa.schema(_COMMON + fields, metadata=meta))


SKETCH = _schema(
    "sketch",
    1,
    [
        pa.field("kind", pa.string()),  # far | near | fine | negative | context
        pa.field("text", pa.string()),
        pa.field("class_idx", pa.int32()),
        pa.field("source_key", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("leakage", pa.bool_()),
    ],
)

GENERATE = _schema(
    "generate",
    # 3: no wall-clock "seconds" column (a recomputed shard is byte-identical; timings are in timings/);
    # 4: Multi-OS columns (origin, sources, blank-area score, image-text alignment)
    4,
    [
        pa.field("kind", pa.string()),  # boundary | far | near | multi_os
        pa.field("source_key", pa.string()),
        pa.field("class_idx", pa.int32()),
        pa.field("prompt", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("rounds", pa.int32()),
        pa.field("score_before", pa.float64()),
        pa.field("score_after", pa.float64()),
        # text-to-image samples (far / near): the sketched label they show and how they were made
        pa.field("label", pa.string()),
        pa.field("label_key", pa.string()),
        pa.field("prompt_id", pa.string()),
        pa.field("model_id", pa.string()),
        # the last round's score is nearer the OOD side (-ln K) than the first round's
        pa.field("moved_toward_ood", pa.bool_()),
        # multi_os (ood_core.multi_os): the concept text is ``label``; how it was made, how far it lies
        # from every known concept, and how well its image matches it
        pa.field("origin", pa.string()),  # blank | embed_interp | llm_interp | counterfactual
        pa.field("concept_sources", pa.string()),  # JSON list of the known concepts it came from
        pa.field("mllm_answer", pa.string()),  # the raw answer (llm_interp / counterfactual)
        pa.field("blank_score", pa.float64()),  # largest text cosine to an ID class or known label
        pa.field("blank_threshold", pa.float64()),  # below it the text lies in a blank area
        pa.field("nearest_known", pa.string()),  # the known concept of that largest cosine
        pa.field("alignment", pa.float64()),  # CLIP cosine of the image with its own text
        pa.field("alignment_id", pa.float64()),  # the image's largest cosine to an ID class prompt
    ],
)

ELABORATE = _schema(
    "elaborate",
    3,  # 2: MLLM elaboration fields; 3: kept samples carry their CLIP embedding (npy) for the cross-shard duplicate index
    [
        pa.field("source_key", pa.string()),
        pa.field("class_idx", pa.int32()),
        pa.field("id_confidence", pa.float64()),
        pa.field("energy", pa.float64()),
        pa.field("max_dup_cosine", pa.float64()),
        pa.field("neg_label", pa.string()),
        pa.field("neg_index", pa.int32()),
        # multi-round MLLM elaboration: raw answers, parsed fields, prompt ids, model id
        pa.field("kind", pa.string()),  # boundary | far | near | multi_os
        pa.field("label", pa.string()),  # the sketched label a far / near image was generated from (multi_os: its text)
        pa.field("mllm_model", pa.string()),
        pa.field("prompt_ids", pa.string()),  # JSON list, one id per round
        pa.field("asked_classes", pa.string()),  # JSON list of the ID classes asked about in round 2
        pa.field("answer_describe", pa.string()),
        pa.field("answer_id_visible", pa.string()),
        pa.field("answer_label", pa.string()),
        pa.field("id_visible", pa.string()),  # yes | no | unclear
        pa.field("elaborated_label", pa.string()),
        pa.field("label_status", pa.string()),  # kept | rejected (label hygiene of the round-3 label)
        pa.field("label_reason", pa.string()),
        pa.field("leakage", pa.bool_()),
    ],
)

FINETUNE = _schema(
    "finetune",
    1,
    [
        pa.field("role", pa.string()),  # id_train | id_test | ood:<set> | synthetic
        pa.field("class_idx", pa.int32()),
        pa.field("label_idx", pa.int32()),
    ],
)

MANIFESTS: dict[str, ManifestSchema] = {s.stage: s for s in (SKETCH, GENERATE, ELABORATE, FINETUNE)}

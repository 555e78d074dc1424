"""How a stage folder is published: self-describing samples and a dataset card per stage folder.

* every sample's JSON carries its ID class name and its label text (not only indices);
* ``shards/`` holds the published (kept) samples only; rejected and failed ones are in
  ``rejected/`` (see :data:`ood_core.storage.REJECTED_STATUSES`) for the report;
* ``README.md`` is a Hugging Face dataset card whose ``configs`` point ``datasets`` at the shards,
  so ``datasets.load_dataset(<stage folder>)`` and ``load_dataset("webdataset", data_files=...)`` work.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence

from ood_core.storage import Sample, StageStore

# Row columns that hold a sample's label text, in order of preference (elaborate's assigned
# negative label; sketch's label or prompt text).
LABEL_FIELDS = ("neg_label", "text")
CARD = "README.md"


def annotate_samples(
    samples: list[Sample], rows: list[dict], classnames: Sequence[str] | Callable[[], Sequence[str]]
) -> None:
    """Add ``class_name`` and ``label_text`` to every sample's JSON and drop its null fields (in place)."""
    with_json = [s for s in samples if "json" in s.files]
    if not with_json:
        return
    names = classnames() if callable(classnames) else classnames
    by_key = {r["key"]: r for r in rows}
    for s in with_json:
        meta = json.loads(s.files["json"])
        if not isinstance(meta, dict):
            continue
        # null is absence (the manifest has every column): `datasets` infers a field's type from the
        # first samples, and a null there (a boundary image's `label`) cannot take a later string
        meta = {k: v for k, v in meta.items() if v is not None}
        row = by_key.get(s.key, {})
        idx = meta.get("class_idx", row.get("class_idx"))
        if isinstance(idx, int) and 0 <= idx < len(names):
            meta.setdefault("class_name", names[idx])
        label = next((v for f in LABEL_FIELDS if (v := meta.get(f, row.get(f)))), None)
        if label is not None:
            meta.setdefault("label_text", label)
        s.files["json"] = json.dumps(meta, sort_keys=True).encode()


def dataset_card(store: StageStore, info: dict) -> str:
    """The ``README.md`` card: YAML ``configs`` for ``datasets`` plus how to load the stage."""
    # explicit file lists: an empty tar (every candidate of a shard rejected) would stop `datasets`
    stats = [store.shard_stats(i) for i in store.shard_indices()]
    kept = [f"shards/{s['shard']:06d}.tar" for s in stats if s["samples"]]
    rejected = [f"rejected/{s['shard']:06d}.tar" for s in stats if s.get("rejected_samples")]
    has_rejected = bool(rejected)
    configs = ["configs:"]
    for name, files in (("default", kept), ("rejected", rejected)):
        if files:
            configs += [f"- config_name: {name}", "  data_files:", "  - split: train", "    path:"]
            configs += [f'    - "{f}"' for f in files]
    if len(configs) == 1:
        configs = ["configs: []"]
    counts = ", ".join(
        f"{status} {sum(r.values())}" for status, r in sorted(info.get("counts", {}).items())
    )
    lines = [
        "---",
        *configs,
        "---",
        "",
        f"# synth-ood stage `{info['stage']}` ({info['key']})",
        "",
        f"Rows by status: {counts or 'none'}. `shards/` holds the published samples only"
        + (" (rejected and failed ones are in `rejected/`)" if has_rejected else "")
        + "; every candidate, failures included, has a row in `manifests/*.parquet`.",
        "Each sample's JSON has its ID `class_name` and its `label_text` where the stage assigns one.",
        "",
        "```python",
        "import datasets, webdataset as wds",
        'ds = datasets.load_dataset("<this folder>", split="train")   # uses this card',
        'ds = datasets.load_dataset("webdataset", data_files={"train": "<this folder>/shards/*.tar"}, split="train")',
        'for sample in wds.WebDataset("<this folder>/shards/{000000..N}.tar").decode("pil"):',
        "    ...",
        "```",
        "",
    ]
    return "\n".join(lines)


def write_dataset_card(store: StageStore, info: dict) -> None:
    """Write ``README.md`` unless it already holds these bytes (a repaired shard leaves it alone)."""
    data, path = dataset_card(store, info).encode(), store.path(CARD)
    if not (store.exists(path) and store.read_bytes(path) == data):
        store.write_bytes(path, data)


_IMAGE_LINK = re.compile(r"!\[([^\]]*)\]\(([^)\s]+\.png)\)")


def link_images(markdown: str, base_url: str) -> str:
    """Turn ``![alt](file.png)`` into a link to ``<base_url>/file.png`` (a Prefect artifact has no
    folder to show a relative image from, and inlining it would store the bytes in Prefect's database)."""
    return _IMAGE_LINK.sub(lambda m: f"[{m.group(1)} ({m.group(2)})]({base_url.rstrip('/')}/{m.group(2)})", markdown)

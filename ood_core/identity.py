"""What goes into stage keys: content, never infrastructure.

A stage key must change when the output would change (model ids, prompts, settings, the images
themselves) and must not change when only *where* things are served or stored changes: the MLLM
endpoint URL, the dataset's mount point, a cache directory. The data's identity is a hash of the
listing of the files the run reads (paths relative to their root, sizes), so a moved copy of the
same data reuses every stage and an added, removed or resized file gives new keys.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from pydantic import BaseModel

from ood_core.config import DataConfig, ElaborateConfig, FinetuneConfig, MLLMSpec, SketchConfig

# Fields that say where a thing lives or is served, not what it is.
INFRA_FIELDS = frozenset({"root", "ood_root", "base_url", "api_key_env", "cache_dir"})
# Fields left out of a key while at their default: they came after keys existed and, at their
# defaults, change no output (answer bounds that no model within max_new_tokens reaches).
# Settings added later whose default is the earlier behaviour keep the earlier keys the same way.
DEFAULT_FREE_FIELDS: dict[type, tuple[str, ...]] = {
    MLLMSpec: ("max_answer_bytes", "max_answer_labels"),
    SketchConfig: ("neg_order", "far_label_sets"),
    FinetuneConfig: ("id_names", "synood_text_data", "kind_sets"),
    ElaborateConfig: ("mllm_filter",),
}

_IDENTITY: dict[tuple, str] = {}


def key_dump(spec: BaseModel) -> dict[str, Any]:
    """``spec`` as JSON for a stage key: nested specs too, without DEFAULT_FREE_FIELDS at their default."""
    out = spec.model_dump(mode="json")
    for name, info in type(spec).model_fields.items():
        value = getattr(spec, name)
        if isinstance(value, BaseModel):
            out[name] = key_dump(value)
        elif name in DEFAULT_FREE_FIELDS.get(type(spec), ()) and value == info.default:
            del out[name]
    return out


def pin_model_ids(tree: Any) -> Any:
    """``tree`` with every ``world://<model>`` id suffixed by its build's digest (``@<hash>``): a model
    id names weights that a rebuild changes, so the keys that name it must change with them."""
    if isinstance(tree, dict):
        return {k: pin_model_ids(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [pin_model_ids(v) for v in tree]
    if isinstance(tree, str) and tree.startswith("world://"):
        from ood_core.world.weights import build_digest

        digest = build_digest(tree)
        return f"{tree}@{digest}" if digest else tree
    return tree


def content_spec(spec: BaseModel) -> dict[str, Any]:
    """``spec`` as JSON without its infrastructure fields (e.g. an MLLM spec without ``base_url``)."""
    return {k: v for k, v in key_dump(spec).items() if k not in INFRA_FIELDS}


def _source_entry(source: str) -> tuple[str, int | str]:
    """A bundled or rendered record's source and what names its pixels (file size, renderer version)."""
    from ood_core.data import pixel_source, skimage_path

    made = pixel_source(source)
    if made is not None:
        return source, made.version
    return source, os.path.getsize(skimage_path(source.split(":", 1)[1]))


def forget() -> None:
    """Drop the identities this process computed (a new run lists its data anew)."""
    _IDENTITY.clear()


def remembered(data: DataConfig, seed: int) -> str | None:
    """The identity this process computed or adopted for ``data``, if any."""
    return _IDENTITY.get((data.model_dump_json(), seed))


def remember(data: DataConfig, seed: int, identity: str) -> None:
    """Adopt ``identity`` (read from the run's keys: the run's first step listed the data)."""
    _IDENTITY[(data.model_dump_json(), seed)] = identity


def data_identity(data: DataConfig, seed: int) -> str:
    """Hash of what the run reads: the listings of its file trees (relative paths, sizes: see
    :mod:`ood_core.dataset_index`), or for bundled and rendered data its records (sources, crops, labels)."""
    memo_key = (data.model_dump_json(), seed)
    if memo_key in _IDENTITY:
        return _IDENTITY[memo_key]
    from ood_core.data import load_id_dataset, load_ood_set
    from ood_core.dataset_index import current, tree_digest

    listed = current(data).trees
    h = hashlib.sha256()
    if "train" in listed:
        for tree in ("train", "val"):
            h.update(f"{tree}:{tree_digest(listed[tree])}".encode())
    else:
        for r in load_id_dataset(data, seed).records:
            h.update(repr((r.key, r.class_idx, r.class_name, r.split, _source_entry(r.source), r.crop, r.flip)).encode())
    for name in data.ood_sets:
        h.update(f"ood:{name}".encode())
        if f"ood:{name}" in listed:
            h.update(tree_digest(listed[f"ood:{name}"]).encode())
            continue
        for r in load_ood_set(name, data, seed):
            h.update(repr((r.key, _source_entry(r.source), r.crop, r.flip)).encode())
    _IDENTITY[memo_key] = h.hexdigest()[:16]
    return _IDENTITY[memo_key]


def data_content(data: DataConfig, seed: int) -> dict[str, Any]:
    """The data part of a stage key: settings without roots, plus the listing hash."""
    return {**content_spec(data), "identity": data_identity(data, seed)}

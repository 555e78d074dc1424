"""What goes into stage keys: content, never infrastructure.

A stage key must change when the output would change (model ids, prompts, settings, the images
themselves) and must not change when only *where* things are served or stored changes: the MLLM
endpoint URL, the dataset's mount point, a cache directory. The data's identity is a hash of the
file listing the run uses (paths relative to their root, sizes, crops), so a moved copy of the same
data reuses every stage and an edited file gives new keys.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
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
    FinetuneConfig: ("id_names", "synood_text_data"),
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


def _source_entry(source: str, roots: list[Path]) -> tuple[str, int | str]:
    """A record's source as (path relative to its data root, size in bytes)."""
    from ood_core.data import pixel_source, skimage_path

    made = pixel_source(source)
    if made is not None:
        return source, made.version
    if source.startswith("skimage:"):
        return source, os.path.getsize(skimage_path(source.split(":", 1)[1]))
    path = Path(source)
    for root in roots:
        try:
            return path.relative_to(root).as_posix(), os.path.getsize(path)
        except ValueError:
            continue
    return path.name, os.path.getsize(path)


def data_identity(data: DataConfig, seed: int) -> str:
    """Hash of the ID and OOD file listings the run uses (relative paths, sizes, crops, labels)."""
    memo_key = (data.model_dump_json(), seed)
    if memo_key in _IDENTITY:
        return _IDENTITY[memo_key]
    from ood_core.data import _resolve_folder, load_id_dataset, load_ood_set

    h = hashlib.sha256()
    roots = [Path(data.root).expanduser()] if data.root else []
    for r in load_id_dataset(data, seed).records:
        h.update(repr((r.key, r.class_idx, r.class_name, r.split, _source_entry(r.source, roots), r.crop, r.flip)).encode())
    for name in data.ood_sets:
        folder = _resolve_folder(name, data)
        set_roots = [folder] if folder is not None else []
        h.update(f"ood:{name}".encode())
        for r in load_ood_set(name, data, seed):
            h.update(repr((r.key, _source_entry(r.source, set_roots), r.crop, r.flip)).encode())
    _IDENTITY[memo_key] = h.hexdigest()[:16]
    return _IDENTITY[memo_key]


def data_content(data: DataConfig, seed: int) -> dict[str, Any]:
    """The data part of a stage key: settings without roots, plus the listing hash."""
    return {**content_spec(data), "identity": data_identity(data, seed)}

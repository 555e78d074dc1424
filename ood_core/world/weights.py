"""The world's shipped weights: ``world://<model>`` ids, resolved to folders checked by hash.

Each model folder under ``ood_core/world/weights/`` holds the files the real loaders read
(open_clip, diffusers, transformers) and a ``BUILD.json`` record: how it was built (command,
seed, settings, code version, wall time), its competence figures, and the sha256 of every other
file. A folder whose files do not match their record is refused with a message naming the file
and the command that rebuilds it, so a damaged or half-written weight file is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

WORLD_PREFIX = "world://"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
RECORD = "BUILD.json"
# The world's models, in build order (the diffusion models are judged by the world CLIP).
MODELS = ("clip", "llava", "sd-inpaint", "sd-t2i")

_VERIFIED: dict[tuple, Path] = {}


class WorldWeightsError(RuntimeError):
    """Shipped world weights are missing or fail their recorded content hash."""


def is_world(name: str | None) -> bool:
    return bool(name) and str(name).startswith(WORLD_PREFIX)


def rebuild_hint(model: str) -> str:
    """What to run to get ``model``'s weights back (or that this version cannot build it yet)."""
    from .build import UNITS, _has_recipe, _unit_of

    if not _has_recipe(UNITS[_unit_of(model)][0]):
        return "this version has no training recipe for it yet (README, \"The world\")"
    hint = f"rebuild it with `synth-ood world build --only {model}`"
    return hint + (f" (or restore it: `git checkout -- {WEIGHTS_DIR / model}`)" if (WEIGHTS_DIR / model).exists() else "")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file below ``folder`` except the record, by relative POSIX path (sorted)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name != RECORD and not p.name.startswith("."):
            out[p.relative_to(folder).as_posix()] = sha256_file(p)
    return out


def read_record(folder: Path) -> dict:
    with open(folder / RECORD) as f:
        return json.load(f)


def verify(folder: Path, model: str) -> Path:
    """``folder`` if every file matches the sha256 its BUILD.json records; else WorldWeightsError."""
    record_path = folder / RECORD
    if not record_path.is_file():
        raise WorldWeightsError(f"world model '{model}': no {RECORD} in {folder} (not built, or a build was "
                                f"interrupted); {rebuild_hint(model)}")
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file())
    if _VERIFIED.get((str(folder), stamp)) is not None:
        return folder
    try:
        recorded: dict[str, str] = read_record(folder)["files"]
    except (OSError, ValueError, KeyError) as err:
        raise WorldWeightsError(f"world model '{model}': {record_path} is unreadable ({err}); {rebuild_hint(model)}") from None
    actual = file_hashes(folder)
    for rel, digest in recorded.items():
        if rel not in actual:
            raise WorldWeightsError(f"world model '{model}': {folder / rel} is missing; {rebuild_hint(model)}")
        if actual[rel] != digest:
            raise WorldWeightsError(f"world model '{model}': {folder / rel} does not match the sha256 recorded in "
                                    f"{record_path} (damaged or half-written); {rebuild_hint(model)}")
    extra = sorted(set(actual) - set(recorded))
    if extra:
        raise WorldWeightsError(f"world model '{model}': {folder / extra[0]} is not in {record_path} "
                                f"(left by another build?); {rebuild_hint(model)}")
    _VERIFIED[(str(folder), stamp)] = folder
    return folder


def weights_dir() -> Path:
    """Where ``world://`` ids point: ``$SYNTH_OOD_WORLD_DIR`` (a rebuilt world) or the shipped folder."""
    env = os.environ.get("SYNTH_OOD_WORLD_DIR")
    return Path(env).expanduser() if env else WEIGHTS_DIR


def resolve(uri: str) -> str:
    """``world://<model>`` -> its verified folder."""
    if not is_world(uri):
        raise ValueError(f"not a world model id: {uri!r} (expected {WORLD_PREFIX}<model>)")
    model = uri[len(WORLD_PREFIX):].strip("/")
    if model not in MODELS:
        raise WorldWeightsError(f"unknown world model '{uri}' (known: {', '.join(WORLD_PREFIX + m for m in MODELS)})")
    return str(verify(weights_dir() / model, model))


def build_digest(uri: str) -> str | None:
    """A short hash of the recorded file hashes of ``world://<model>``'s build (None when it has no
    record): what a stage key pins, so rebuilt weights behind the same id give new keys."""
    try:
        files = read_record(weights_dir() / uri[len(WORLD_PREFIX):].strip("/")).get("files", {})
    except (OSError, ValueError):
        return None  # the loader and the preflight name the missing or damaged record
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]

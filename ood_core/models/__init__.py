"""Model backends (CLIP, MLLM, diffusion inpainter) behind registries keyed on ``spec.backend``.

Importing this package is cheap: torch, open_clip, transformers and diffusers are only imported
when a model is loaded. Model names starting with ``tiny://`` are resolved to locally built tiny
models (see :mod:`ood_core.models.tiny`) and then loaded through the same calls as real checkpoints.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

from ood_core.registry import Registry

if TYPE_CHECKING:
    import torch

    from ood_core.config import ClipSpec, DiffusionSpec, MLLMSpec, TextToImageSpec
    from ood_core.models.clip import ClipModel
    from ood_core.models.diffusion import Inpainter, TextToImage
    from ood_core.models.mllm import MLLMClient

class RetryableError(RuntimeError):
    """A passing failure (endpoint down, timeout, rate limit): the shard fails and is retried,
    instead of recording the candidate as failed for good."""


CLIP_BACKENDS: Registry = Registry("clip backend")
MLLM_BACKENDS: Registry = Registry("mllm backend")
DIFFUSION_BACKENDS: Registry = Registry("diffusion backend")

# The backend modules register themselves on import; they are imported only when needed.
_BACKEND_MODULES = {
    "clip": "ood_core.models.clip",
    "mllm": "ood_core.models.mllm",
    "diffusion": "ood_core.models.diffusion",
}


def _ensure(role: str) -> None:
    importlib.import_module(_BACKEND_MODULES[role])


def resolve_device(name: str | Any = "auto") -> torch.device:
    """``"auto"`` -> the first GPU this process sees, else cpu; anything else -> ``torch.device(name)``.

    A process sees the GPUs ``CUDA_VISIBLE_DEVICES`` names (its worker's: one worker per GPU), so
    ``auto`` is ``cuda:0`` of that list, i.e. the worker's own GPU, never the host's GPU 0.
    """
    import torch

    if isinstance(name, torch.device):
        return name
    if name in (None, "auto"):
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """``cuda:0 (host GPU 3 of CUDA_VISIBLE_DEVICES=3,5)`` -- which physical GPU a run uses, for its log."""
    if device.type != "cuda":
        return str(device)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return f"{device} (no CUDA_VISIBLE_DEVICES: host GPU {device.index or 0})"
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    index = device.index or 0
    host = ids[index] if index < len(ids) else "?"
    return f"{device} (host GPU {host} of CUDA_VISIBLE_DEVICES={visible})"


def hub_cache_dir(cache_dir: str | None) -> str | None:
    """Where hub weights go: ``models.cache_dir`` when set, else None (Hugging Face's own cache)."""
    return os.path.expanduser(cache_dir) if cache_dir else None


def tiny_root(cache_dir: str | None) -> str:
    """Folder of the locally built tiny models: never the Hugging Face hub cache.

    ``models.cache_dir`` when set, else ``$SYNTH_OOD_TINY_DIR``, else ``$XDG_CACHE_HOME/synth-ood``.
    """
    if cache_dir:
        return os.path.expanduser(cache_dir)
    if os.environ.get("SYNTH_OOD_TINY_DIR"):
        return os.path.expanduser(os.environ["SYNTH_OOD_TINY_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "synth-ood")


# Ids of local models that resolve_name maps to folders (never a hub id).
MODEL_URI_PREFIXES = ("tiny://", "world://")


def is_model_uri(name: str | None) -> bool:
    """Whether ``name`` is a ``tiny://`` or ``world://`` id (a local model, not a hub id)."""
    return bool(name) and str(name).startswith(MODEL_URI_PREFIXES)


def resolve_name(name: str, cache_dir: str | None) -> str:
    """``tiny://kind`` -> the built tiny model's dir, ``world://model`` -> the shipped world model's
    verified dir; other names pass through unchanged."""
    from ood_core.models import tiny

    if tiny.is_tiny(name):
        return tiny.resolve(name, tiny_root(cache_dir))
    if is_model_uri(name):
        from ood_core.world.weights import resolve  # the world package, imported only for its ids

        return resolve(name)
    return name


def load_clip(
    spec: ClipSpec, device: Any = "auto", cache_dir: str | None = None
) -> ClipModel:
    """Load the CLIP model named by ``spec`` with the backend ``spec.backend``."""
    _ensure("clip")
    return CLIP_BACKENDS.get(spec.backend)(spec, resolve_device(device), hub_cache_dir(cache_dir))


def load_mllm(
    spec: MLLMSpec, device: Any = "auto", cache_dir: str | None = None, endpoint: Any = None
) -> MLLMClient:
    """Load the multimodal LLM client named by ``spec`` with the backend ``spec.backend``.

    ``endpoint`` (an ``EndpointConfig``) sets retries, timeouts and the key source of HTTP backends.
    """
    _ensure("mllm")
    extra = {"endpoint": endpoint} if endpoint is not None else {}
    return MLLM_BACKENDS.get(spec.backend)(spec, resolve_device(device), hub_cache_dir(cache_dir), **extra)


def load_inpainter(
    spec: DiffusionSpec, device: Any = "auto", cache_dir: str | None = None
) -> Inpainter:
    """Load the diffusion inpainting components named by ``spec`` with the backend ``spec.backend``."""
    _ensure("diffusion")
    return DIFFUSION_BACKENDS.get(spec.backend)(spec, resolve_device(device), hub_cache_dir(cache_dir))


def load_text_to_image(
    spec: TextToImageSpec, device: Any = "auto", cache_dir: str | None = None
) -> TextToImage:
    """Load the text-to-image pipeline named by ``spec`` with the backend ``spec.backend``."""
    _ensure("diffusion")
    return DIFFUSION_BACKENDS.get(spec.backend)(spec, resolve_device(device), hub_cache_dir(cache_dir))


__all__ = [
    "CLIP_BACKENDS",
    "MLLM_BACKENDS",
    "DIFFUSION_BACKENDS",
    "resolve_device",
    "resolve_name",
    "is_model_uri",
    "hub_cache_dir",
    "tiny_root",
    "load_clip",
    "load_mllm",
    "load_inpainter",
    "load_text_to_image",
]

"""open_clip backend: a CLIP model with batched and differentiable encoders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from ood_core.models import CLIP_BACKENDS, resolve_name

# Weight file names looked up when ``pretrained`` resolves to a directory (tiny kit or a local dir).
_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors")


class ClipModel:
    """An open_clip model in eval mode on ``device`` with its preprocess and tokenizer."""

    def __init__(self, model: torch.nn.Module, preprocess: Any, tokenizer: Any, device: torch.device):
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        # Gradients are only ever wanted w.r.t. inputs (guidance), never the CLIP weights.
        for p in self.model.parameters():
            p.requires_grad_(False)
        size = getattr(self.model.visual, "image_size", 224)
        self.image_size: int = int(size[0] if isinstance(size, (tuple, list)) else size)
        cfg = getattr(self.model.visual, "preprocess_cfg", {}) or {}
        mean = cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
        std = cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
        self._mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        with torch.no_grad():
            probe = self.model.encode_text(self.tokenizer(["a"]).to(self.device))
        self.embed_dim: int = int(probe.shape[-1])

    @property
    def logit_scale(self) -> float:
        """The model's learned logit scale (exp of the stored log value)."""
        return float(self.model.logit_scale.exp().item())

    @torch.no_grad()
    def encode_images(self, images: list[Image.Image], batch_size: int = 64, normalize: bool = True) -> torch.Tensor:
        """Image features [N, D], float32 on CPU; L2-normalised unless ``normalize=False`` (raw)."""
        out = []
        for i in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im.convert("RGB")) for im in images[i : i + batch_size]])
            feats = self.model.encode_image(batch.to(self.device)).float()
            out.append((F.normalize(feats, dim=-1) if normalize else feats).cpu())
        if not out:
            return torch.empty(0, self.embed_dim)
        return torch.cat(out)

    @torch.no_grad()
    def encode_texts(self, texts: list[str], batch_size: int = 256, normalize: bool = True) -> torch.Tensor:
        """Text features [N, D], float32 on CPU; L2-normalised unless ``normalize=False`` (raw)."""
        out = []
        for i in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            feats = self.model.encode_text(tokens).float()
            out.append((F.normalize(feats, dim=-1) if normalize else feats).cpu())
        if not out:
            return torch.empty(0, self.embed_dim)
        return torch.cat(out)

    def encode_pixels(self, pixels: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Differentiable image features for pixels in [0, 1], shape [B, 3, H, W] of any size.

        Mirrors the eval transform (resize the short side, centre crop, CLIP mean/std) with
        differentiable ops, and returns L2-normalised features (raw ones with ``normalize=False``:
        what SynOOD's adapter takes) on ``pixels.device`` with the graph.
        """
        x = pixels.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        s = self.image_size
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
            top, left = (nh - s) // 2, (nw - s) // 2
            x = x[..., top : top + s, left : left + s]
        x = (x - self._mean) / self._std
        f = self.model.encode_image(x).float()
        return F.normalize(f, dim=-1) if normalize else f


def _weights_path(pretrained: str) -> str:
    path = Path(pretrained)
    if path.is_dir():
        for name in _WEIGHT_FILES:
            if (path / name).is_file():
                return str(path / name)
        raise FileNotFoundError(f"no open_clip weights ({', '.join(_WEIGHT_FILES)}) in {path}")
    return pretrained


@CLIP_BACKENDS.register("open_clip")
def load_open_clip(spec, device: torch.device, cache_dir: str | None) -> ClipModel:
    """Create ``spec.name`` with ``spec.pretrained`` (tag, file, dir or ``tiny://clip``)."""
    import open_clip

    from ood_core.models import is_model_uri, tiny

    tiny.register_clip_configs()
    pretrained = spec.pretrained
    if is_model_uri(pretrained):
        pretrained = resolve_name(pretrained, cache_dir)
    folder = Path(pretrained).expanduser() if pretrained else None
    if folder is not None and (folder / "open_clip_config.json").is_file():
        # a checkpoint folder with its own config (and tokenizer): open_clip's local-dir schema
        # reads all three, as for a folder downloaded from the hub; spec.name only names it
        name = f"local-dir:{folder}"
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device, cache_dir=cache_dir)
        return ClipModel(model, preprocess, open_clip.get_tokenizer(name, cache_dir=cache_dir), device)
    if folder is not None and folder.is_dir():
        pretrained = _weights_path(str(folder))
    model, _, preprocess = open_clip.create_model_and_transforms(
        spec.name, pretrained=pretrained, device=device, cache_dir=cache_dir
    )
    tokenizer = open_clip.get_tokenizer(spec.name, cache_dir=cache_dir)
    return ClipModel(model, preprocess, tokenizer, device)

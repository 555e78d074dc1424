"""SynOOD fine-tuning on cached CLIP features: an image-side residual adapter and trainable
negative-label text embeddings, both trained with cross-entropy.

Reference (Jarvisgivemeasuit/SynOOD@e13114e): ``ind_ood_projection.py`` (adapter: raw CLIP image
features ``f``, ``normalize(f + ReLU(LayerNorm(Linear(f))))`` with PyTorch's default init, Adam
1e-3 / wd 1e-5, ``CosineAnnealingLR(T_max=epochs, eta_min=1e-5)`` stepped per epoch, CE at
``logit_scale`` over [ID "a nice {}" + the assigned negative labels]) and ``ood_label_finetuning.py``
(text side: :func:`train_negative_text_released`).

Labels index into that concatenation: an ID image carries its class ``c`` (``0 <= c < num_id``), a
synthetic OOD image carries ``num_id + k`` for its assigned negative label ``k``.
Everything is seeded through explicit ``torch.Generator`` objects, so the same seed on the same
inputs gives bit-identical adapters, tuned features and loss histories.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ood_core.config import FinetuneConfig

LOSSES = ("ce", "ce+contrastive")
ETA_MIN = 1e-5
# Initial LayerNorm gain: keeps the residual branch ~1e-3 * sqrt(dim / 2) in norm (a near-identity
# start) while leaving every ReLU input non-zero so gradients flow.
ADAPTER_INIT_GAIN = 1e-3

Progress = Callable[[int, float], None] | None


def _tensor(x: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


class ResidualAdapter(nn.Module):
    """``f' = normalize(f + ReLU(LayerNorm(Linear(f))))``, starting close to the identity.

    Near-identity start: the adapter begins as zero-shot CLIP, so fine-tuning can only move away
    from a known-good detector instead of from a random projection. A zero Linear weight (the obvious
    way) would not work here: LayerNorm of an all-zero vector is zero, ReLU's gradient at 0 is 0, and
    the branch would never receive a gradient. LayerNorm also removes the Linear's scale, so a
    small Linear init would not make the branch small either. Hence the Linear keeps a normal
    (seeded) Kaiming init and the LayerNorm gain starts at ``init_gain``: the residual is tiny but
    half of the ReLUs are active and all parameters get gradients.
    """

    def __init__(
        self, dim: int, init_gain: float = ADAPTER_INIT_GAIN, generator: torch.Generator | None = None
    ):
        super().__init__()
        self.linear = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.linear.weight, a=math.sqrt(5), generator=generator)
            bound = 1.0 / math.sqrt(dim)
            nn.init.uniform_(self.linear.bias, -bound, bound, generator=generator)
            self.norm.weight.fill_(init_gain)
            self.norm.bias.zero_()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f + F.relu(self.norm(self.linear(f))), dim=-1)


def load_adapter(data: bytes) -> ResidualAdapter:
    """A :class:`ResidualAdapter` from the bytes of a finetune folder's ``artifacts/adapter.safetensors``."""
    from safetensors.torch import load as load_safetensors

    state = load_safetensors(data)
    adapter = ResidualAdapter(state["linear.weight"].shape[1])
    adapter.load_state_dict(state)
    return adapter.eval()


@torch.no_grad()
def apply_adapter(adapter: nn.Module, feats: Any, batch_size: int = 8192) -> np.ndarray:
    """Adapted, L2-normalised features as float32 numpy (evaluation mode, batched)."""
    adapter.eval()
    x = _tensor(feats)
    out = [adapter(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]
    return (torch.cat(out) if out else x.new_zeros((0, x.shape[1]))).numpy()


def contrastive_loss(
    image_feats: torch.Tensor,
    labels: torch.Tensor,
    id_text_feats: torch.Tensor,
    num_id: int,
    logit_scale: float = 100.0,
) -> torch.Tensor:
    """Multi-OS image-text contrastive loss with synthetic OOD images as extra negatives.

    With ``s_ic = logit_scale * cos(f_i, t_c)`` over the ID texts only, ``I`` the ID images of the
    batch (class ``y_i``) and ``O`` its synthetic OOD images (``labels >= num_id``)::

        L_i2t = mean_{i in I} -log( exp(s_{i,y_i}) / sum_c exp(s_{i,c}) )
        L_t2i = mean_{i in I} -log( exp(s_{i,y_i}) / (exp(s_{i,y_i}) + sum_{j in O} exp(s_{j,y_i})) )
        L     = (L_i2t + L_t2i) / 2

    ``L_i2t`` pulls each ID image toward its class text (away from other ID texts); ``L_t2i`` makes
    each ID class text prefer its own image over every synthetic OOD image, pushing OOD features
    away from the ID texts. A batch without ID images contributes 0; one without OOD images gets
    ``L_t2i = 0``.
    """
    is_id = labels < num_id
    if not bool(is_id.any()):
        return image_feats.sum() * 0.0
    sims = logit_scale * image_feats @ id_text_feats.T
    y = labels[is_id]
    sims_id = sims[is_id]
    l_i2t = F.cross_entropy(sims_id, y)
    pos = sims_id.gather(1, y[:, None]).squeeze(1)
    ood_sims = sims[~is_id][:, y]  # (n_ood, n_id_in_batch): OOD image j vs the text of ID image i
    if ood_sims.shape[0] == 0:
        l_t2i = pos.sum() * 0.0
    else:
        all_logits = torch.cat([pos[None, :], ood_sims], dim=0)
        l_t2i = (torch.logsumexp(all_logits, dim=0) - pos).mean()
    return 0.5 * (l_i2t + l_t2i)


def _check_labels(labels: torch.Tensor, n_texts: int, n_images: int) -> None:
    if labels.ndim != 1 or labels.shape[0] != n_images:
        raise ValueError(f"labels must have shape ({n_images},), got {tuple(labels.shape)}")
    if n_images == 0:
        raise ValueError("no training images")
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= n_texts:
        raise ValueError(f"labels must index the {n_texts} texts [ID + negatives]; got range [{lo}, {hi}]")


def _run_epochs(
    n: int,
    epochs: int,
    batch_size: int,
    gen: torch.Generator,
    step: Callable[[torch.Tensor], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: Progress,
) -> list[float]:
    history: list[float] = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        total = 0.0
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            loss = step(idx)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * idx.numel()
        history.append(total / n)
        if progress is not None:
            progress(epoch, history[-1])
        # the reference steps its cosine schedule once per epoch (T_max = epochs)
        scheduler.step()
    return history


def _cosine(
    optimizer: torch.optim.Optimizer, lr: float, epochs: int, eta_min: float = ETA_MIN
) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(1, epochs), eta_min=min(eta_min, lr)
    )


def train_image_adapter(
    image_feats: Any,
    labels: Any,
    text_feats: Any,
    cfg: FinetuneConfig,
    seed: int,
    progress: Progress = None,
    loss: str = "ce",
    num_id: int | None = None,
    contrastive_weight: float = 1.0,
    device: str | torch.device = "cpu",
) -> tuple[ResidualAdapter, list[float]]:
    """Train a :class:`ResidualAdapter` with CE at ``cfg.logit_scale`` over ``text_feats``.

    ``text_feats`` = [ID prompts + negative labels] (fixed). Adam(lr, weight_decay), cosine
    annealing to 1e-5 stepped per epoch, ``cfg.epochs`` x batches of ``cfg.batch_size``, shuffled by a
    generator seeded with ``seed``; trains on ``device``, returns the adapter on the CPU.
    ``loss="ce+contrastive"`` adds ``contrastive_weight *``
    :func:`contrastive_loss` and needs ``num_id``. Returns ``(adapter, per-epoch mean losses)``.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown adapter loss {loss!r}: use one of {', '.join(LOSSES)}")
    if loss == "ce+contrastive" and num_id is None:
        raise ValueError("loss='ce+contrastive' needs num_id (the number of ID prompts in text_feats)")
    x = _tensor(image_feats)
    y = _tensor(labels, torch.long).reshape(-1)
    t = _tensor(text_feats)
    if x.ndim != 2 or t.ndim != 2 or x.shape[1] != t.shape[1]:
        raise ValueError(f"feature shapes do not match: images {tuple(x.shape)}, texts {tuple(t.shape)}")
    _check_labels(y, t.shape[0], x.shape[0])
    x, y, t = x.to(device), y.to(device), t.to(device)

    gen = torch.Generator().manual_seed(int(seed))
    adapter = ResidualAdapter(x.shape[1], init_gain=cfg.adapter_init_gain, generator=gen).to(device)
    adapter.train()
    opt = torch.optim.Adam(adapter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = _cosine(opt, cfg.lr, cfg.epochs)
    scale = float(cfg.logit_scale)

    def step(idx: torch.Tensor) -> torch.Tensor:
        f = adapter(x[idx])
        out = F.cross_entropy(scale * f @ t.T, y[idx])
        if loss == "ce+contrastive":
            out = out + contrastive_weight * contrastive_loss(f, y[idx], t[:num_id], int(num_id), scale)
        return out

    history = _run_epochs(x.shape[0], cfg.epochs, cfg.batch_size, gen, step, opt, sched, progress)
    adapter.eval()
    return adapter.cpu(), history


def train_negative_text(
    image_feats: Any,
    labels: Any,
    id_text_feats: Any,
    neg_text_feats: Any,
    cfg: FinetuneConfig,
    seed: int,
    progress: Progress = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, list[float]]:
    """Tune the negative labels' text embeddings (ID text and images fixed) with the same CE.

    SGD(``cfg.text_lr``, momentum 0.9, weight decay 1e-5), cosine annealing stepped per epoch,
    ``cfg.text_epochs`` epochs. Pass adapted image features to tune against the adapter.
    Returns ``(L2-normalised tuned negatives, per-epoch mean losses)``; the negatives are a float32
    ``torch.Tensor`` if ``neg_text_feats`` was one, else a float32 numpy array.
    """
    x = _tensor(image_feats)
    y = _tensor(labels, torch.long).reshape(-1)
    idt = _tensor(id_text_feats)
    neg0 = _tensor(neg_text_feats)
    if not (x.ndim == idt.ndim == neg0.ndim == 2) or not (x.shape[1] == idt.shape[1] == neg0.shape[1]):
        raise ValueError(
            f"feature shapes do not match: images {tuple(x.shape)}, ID texts {tuple(idt.shape)}, "
            f"negatives {tuple(neg0.shape)}"
        )
    _check_labels(y, idt.shape[0] + neg0.shape[0], x.shape[0])
    as_input = (lambda t: t) if isinstance(neg_text_feats, torch.Tensor) else (lambda t: t.numpy())
    if cfg.text_epochs == 0:
        return as_input(F.normalize(neg0, dim=-1)), []

    x, y, idt = x.to(device), y.to(device), idt.to(device)
    gen = torch.Generator().manual_seed(int(seed))
    neg = nn.Parameter(neg0.clone().to(device))
    opt = torch.optim.SGD([neg], lr=cfg.text_lr, momentum=0.9, weight_decay=1e-5)
    sched = _cosine(opt, cfg.text_lr, cfg.text_epochs)
    scale = float(cfg.logit_scale)

    def step(idx: torch.Tensor) -> torch.Tensor:
        # Re-normalise in the forward so the trained parameters stay comparable with CLIP texts.
        t = torch.cat([idt, F.normalize(neg, dim=-1)])
        return F.cross_entropy(scale * x[idx] @ t.T, y[idx])

    history = _run_epochs(x.shape[0], cfg.text_epochs, cfg.batch_size, gen, step, opt, sched, progress)
    with torch.no_grad():
        tuned = F.normalize(neg.detach(), dim=-1).cpu().clone()
    return as_input(tuned), history


def train_negative_text_released(
    synthetic_feats: Any,
    neg_index: Any,
    neg_text_raw: Any,
    cfg: FinetuneConfig,
    seed: int,
    progress: Progress = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """SynOOD's text side as released (``ood_label_finetuning.py`` + ``models/custom_clip.py``).

    Only the negatives assigned to kept synthetic images (``used = sorted(set(neg_index))``) are
    classes and trainable; each starts at its RAW (unnormalised) CLIP text embedding. For a batch
    of raw synthetic image features ``f``: ``logits = logit_scale * norm(f) @ norm(e_used).T`` and
    CE with the image's assigned label (softmax over the used negatives only). SGD(text_lr,
    momentum 0.9, wd 1e-5) on the raw embeddings, ``CosineAnnealingLR(T_max=text_epochs)``
    (eta_min 0) stepped per epoch, ``cfg.text_epochs`` epochs of ``cfg.batch_size``.

    Returns ``(all negatives L2-normalised with the used ones tuned, used indices, per-epoch loss)``.
    """
    x = _tensor(synthetic_feats)
    idx = _tensor(neg_index, torch.long).reshape(-1)
    raw = _tensor(neg_text_raw)
    if x.ndim != 2 or raw.ndim != 2 or x.shape[1] != raw.shape[1]:
        raise ValueError(f"feature shapes do not match: images {tuple(x.shape)}, negatives {tuple(raw.shape)}")
    _check_labels(idx, raw.shape[0], x.shape[0])
    used = torch.unique(idx)  # sorted
    y = torch.searchsorted(used, idx)
    out = F.normalize(raw, dim=-1).clone()
    if cfg.text_epochs == 0:
        return out.numpy(), used.numpy(), []
    x, y = x.to(device), y.to(device)
    gen = torch.Generator().manual_seed(int(seed))
    emb = nn.Parameter(raw[used].clone().to(device))
    opt = torch.optim.SGD([emb], lr=cfg.text_lr, momentum=0.9, weight_decay=1e-5)
    sched = _cosine(opt, cfg.text_lr, cfg.text_epochs, eta_min=0.0)
    scale = float(cfg.logit_scale)

    def step(b: torch.Tensor) -> torch.Tensor:
        logits = scale * F.normalize(x[b], dim=-1) @ F.normalize(emb, dim=-1).T
        return F.cross_entropy(logits, y[b])

    history = _run_epochs(x.shape[0], cfg.text_epochs, cfg.batch_size, gen, step, opt, sched, progress)
    with torch.no_grad():
        out[used] = F.normalize(emb.detach(), dim=-1).cpu()
    return out.numpy(), used.numpy(), history

"""OOD scores on cached, L2-normalised CLIP features. Higher score = more in-distribution.

Every score has a plain function (explicit arguments) and a registry entry in :data:`SCORES`
with the uniform signature ``fn(ctx: ScoreContext) -> np.ndarray`` so that the evaluate step can
loop over score names from the config instead of branching on them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ood_core.config import FinetuneConfig
from ood_core.registry import Registry

# Rows per chunk when an (images x labels) similarity matrix could be large
# (ImageNet: 50k images x 10k negative labels would be 2 GB in float32).
_CHUNK = 1024

EOE_BETA = 0.25


def _np(x: Any, name: str, dtype: type = np.float32) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=dtype)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, dim) feature array, got shape {arr.shape}")
    return arr


def _check_dims(image_feats: np.ndarray, **texts: np.ndarray) -> None:
    for name, t in texts.items():
        if t.shape[1] != image_feats.shape[1]:
            raise ValueError(f"{name} has dim {t.shape[1]} but image_feats has dim {image_feats.shape[1]}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is empty: need at least one label")


def _logsumexp(x: np.ndarray, axis: int = -1) -> np.ndarray:
    m = np.max(x, axis=axis, keepdims=True)
    return (m + np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True))).squeeze(axis)


def _softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _chunked(image_feats: np.ndarray, fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    if image_feats.shape[0] == 0:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([fn(image_feats[i : i + _CHUNK]) for i in range(0, image_feats.shape[0], _CHUNK)])


# ----------------------------------------------------------------- plain functions
def zero_shot_logits(image_feats: Any, text_feats: Any, logit_scale: float = 100.0) -> np.ndarray:
    """CLIP logits ``logit_scale * cos(image, text)``, shape (n_images, n_texts)."""
    img = _np(image_feats, "image_feats")
    txt = _np(text_feats, "text_feats")
    _check_dims(img, text_feats=txt)
    return float(logit_scale) * (img.astype(np.float64) @ txt.astype(np.float64).T)


def mcm(image_feats: Any, id_text_feats: Any, temperature: float = 1.0) -> np.ndarray:
    """MCM: max softmax over ID labels of ``cos / T`` (plain cosine, not scaled by 100)."""
    # float() guards against the reference code's fault of parsing T as an integer.
    t = float(temperature)
    if t <= 0:
        raise ValueError(f"mcm temperature must be > 0, got {temperature!r}")
    img = _np(image_feats, "image_feats")
    txt = _np(id_text_feats, "id_text_feats").astype(np.float64)
    _check_dims(img, id_text_feats=txt)
    return _chunked(img, lambda x: _softmax((x.astype(np.float64) @ txt.T) / t).max(axis=1))


def energy(logits: Any) -> np.ndarray:
    """Negative free energy ``logsumexp(logits)`` over ID labels."""
    return _logsumexp(_np(logits, "logits", np.float64), axis=1)


def energy_score(image_feats: Any, id_text_feats: Any, temperature: float = 0.01) -> np.ndarray:
    """EOE's energy baseline: ``T * logsumexp(cos / T)`` over the ID labels (eval.sh: ``--T 0.01``)."""
    t = float(temperature)
    if t <= 0:
        raise ValueError(f"energy temperature must be > 0, got {temperature!r}")
    return t * energy(zero_shot_logits(image_feats, id_text_feats, 1.0 / t))


def max_logit(logits: Any) -> np.ndarray:
    """Maximum logit over ID labels."""
    return _np(logits, "logits", np.float64).max(axis=1)


def id_softmax_mass(
    image_feats: Any, id_text_feats: Any, other_text_feats: Any, logit_scale: float
) -> np.ndarray:
    """Total softmax probability of the ID labels among ``[ID + other]`` at ``logit_scale * cos``."""
    img = _np(image_feats, "image_feats")
    idt = _np(id_text_feats, "id_text_feats").astype(np.float64)
    oth = _np(other_text_feats, "other_text_feats").astype(np.float64)
    _check_dims(img, id_text_feats=idt, other_text_feats=oth)
    s = float(logit_scale)

    def chunk(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        lse_id = _logsumexp(s * (x @ idt.T), axis=1)
        lse_o = _logsumexp(s * (x @ oth.T), axis=1)
        # ID mass = e^a / (e^a + e^b) = sigmoid(a - b): stable even at tau = 0.01.
        return 1.0 / (1.0 + np.exp(lse_o - lse_id))

    return _chunked(img, chunk)


def neglabel_groups(n_neg: int, groups: int, seed: int = 0) -> list[np.ndarray]:
    """NegLabel's grouping (``ScalableClassifier.grouping``): indices of each negative group.

    As the reference: the last ``n_neg % groups`` negatives are dropped, the rest permuted with
    ``torch.randperm`` after ``torch.manual_seed(seed)`` (here a CPU generator; the reference draws
    on CUDA, whose permutation differs) and cut into ``groups`` contiguous blocks of equal size.
    With more groups than negatives each negative is its own group (the reference would fail).
    """
    import torch

    g = min(int(groups), int(n_neg))
    usable = n_neg - n_neg % g
    perm = torch.randperm(usable, generator=torch.Generator().manual_seed(int(seed))).numpy()
    return list(perm.reshape(g, -1))


def neglabel(
    image_feats: Any,
    id_text_feats: Any,
    neg_text_feats: Any,
    tau: float = 0.01,
    groups: int = 100,
    seed: int = 0,
) -> np.ndarray:
    """NegLabel score: mean over negative-label groups of the ID softmax mass.

    Groups come from :func:`neglabel_groups` (remainder dropped, seeded permutation); for each
    group the score is ``sum_ID softmax([cos_ID, cos_group] / tau)``. ``groups=1`` is the softmax
    mass over all negatives (the reference code's ungrouped path lacked the softmax).
    """
    if int(groups) < 1:
        raise ValueError(f"neglabel groups must be >= 1, got {groups}")
    if float(tau) <= 0:
        raise ValueError(f"neglabel tau must be > 0, got {tau}")
    img = _np(image_feats, "image_feats")
    idt = _np(id_text_feats, "id_text_feats")
    neg = _np(neg_text_feats, "neg_text_feats")
    _check_dims(img, id_text_feats=idt, neg_text_feats=neg)
    parts = neglabel_groups(neg.shape[0], groups, seed) if int(groups) > 1 else [np.arange(neg.shape[0])]
    s = 1.0 / float(tau)
    idt64 = idt.astype(np.float64)
    neg64 = neg.astype(np.float64)

    def chunk(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        lse_id = _logsumexp(s * (x @ idt64.T), axis=1)
        neg_logits = s * (x @ neg64.T)
        total = np.zeros(x.shape[0], dtype=np.float64)
        for part in parts:
            lse_g = _logsumexp(neg_logits[:, part], axis=1)
            total += 1.0 / (1.0 + np.exp(lse_g - lse_id))
        return total / len(parts)

    return _chunked(img, chunk)


def eoe(
    image_feats: Any,
    id_text_feats: Any,
    outlier_text_feats: Any,
    beta: float = EOE_BETA,
    temperature: float = 1.0,
) -> np.ndarray:
    """EOE: softmax over ``[ID + outlier]`` of ``cos / T``; ``max ID prob - beta * max outlier prob``.

    EOE's code (utils/detection_util.py, ``--T`` default 1) takes the softmax of raw cosines.
    """
    img = _np(image_feats, "image_feats")
    idt = _np(id_text_feats, "id_text_feats").astype(np.float64)
    out = _np(outlier_text_feats, "outlier_text_feats").astype(np.float64)
    _check_dims(img, id_text_feats=idt, outlier_text_feats=out)
    both = np.concatenate([idt, out])
    n_id = idt.shape[0]

    def chunk(x: np.ndarray) -> np.ndarray:
        p = _softmax((x.astype(np.float64) @ both.T) / float(temperature))
        return p[:, :n_id].max(axis=1) - float(beta) * p[:, n_id:].max(axis=1)

    return _chunked(img, chunk)


def eoe_averaged(
    image_feats: Any,
    id_text_feats: Any,
    outlier_sets: list[Any],
    beta: float = EOE_BETA,
    temperature: float = 1.0,
) -> np.ndarray:
    """EOE over N independently generated outlier label sets (EOE's eval.sh: 4 label files):
    the mean of the N single-set :func:`eoe` scores."""
    if not outlier_sets:
        raise ValueError("eoe_averaged needs at least one outlier label set")
    return np.mean([eoe(image_feats, id_text_feats, o, beta, temperature) for o in outlier_sets], axis=0)


def mm_ood(
    image_feats: Any,
    id_text_feats: Any,
    outlier_text_feats: Any,
    logit_scale: float = 100.0,
) -> np.ndarray:
    """MM-OOD training-free score: the ID softmax mass among ``[ID + outlier labels]``.

    ``outlier_text_feats`` are the sketched (near + far) and elaborated outlier labels' text
    features; the score is ``sum_ID softmax(logit_scale * cos(image, [ID, outliers]))``, so an
    image that matches any outlier label better than every ID label gets a low score.
    """
    return id_softmax_mass(image_feats, id_text_feats, outlier_text_feats, logit_scale)


# ----------------------------------------------------------------- registry
@dataclass
class ScoreContext:
    """Everything a registered score may need; scores read only the fields they use."""

    image_feats: Any
    id_text_feats: Any
    neg_text_feats: Any | None = None
    outlier_text_feats: Any | None = None
    # EOE's further label sets (sketch.far_label_sets); EOE averages over [outlier_text_feats, *these]
    outlier_sets: list[Any] = field(default_factory=list)
    cfg: FinetuneConfig = field(default_factory=FinetuneConfig)
    seed: int = 0

    def need(self, *names: str, score: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"score '{score}' needs {', '.join(missing)} but the ScoreContext has none")


ScoreFn = Callable[[ScoreContext], np.ndarray]
SCORES: Registry[ScoreFn] = Registry("score")


@SCORES.register("mcm")
def _mcm(ctx: ScoreContext) -> np.ndarray:
    ctx.need("image_feats", "id_text_feats", score="mcm")
    return mcm(ctx.image_feats, ctx.id_text_feats, ctx.cfg.mcm_temperature)


@SCORES.register("energy")
def _energy(ctx: ScoreContext) -> np.ndarray:
    ctx.need("image_feats", "id_text_feats", score="energy")
    return energy_score(ctx.image_feats, ctx.id_text_feats, ctx.cfg.energy_temperature)


@SCORES.register("max_logit")
def _max_logit(ctx: ScoreContext) -> np.ndarray:
    ctx.need("image_feats", "id_text_feats", score="max_logit")
    return max_logit(zero_shot_logits(ctx.image_feats, ctx.id_text_feats, 1.0 / ctx.cfg.max_logit_temperature))


@SCORES.register("neglabel")
def _neglabel(ctx: ScoreContext) -> np.ndarray:
    ctx.need("image_feats", "id_text_feats", "neg_text_feats", score="neglabel")
    return neglabel(
        ctx.image_feats,
        ctx.id_text_feats,
        ctx.neg_text_feats,
        tau=ctx.cfg.neglabel_tau,
        groups=ctx.cfg.neglabel_groups,
        seed=ctx.seed,
    )


@SCORES.register("eoe")
def _eoe(ctx: ScoreContext) -> np.ndarray:
    ctx.need("image_feats", "id_text_feats", "outlier_text_feats", score="eoe")
    if not ctx.outlier_sets:
        return eoe(ctx.image_feats, ctx.id_text_feats, ctx.outlier_text_feats, ctx.cfg.eoe_beta, ctx.cfg.eoe_temperature)
    return eoe_averaged(ctx.image_feats, ctx.id_text_feats, [ctx.outlier_text_feats, *ctx.outlier_sets],
                        ctx.cfg.eoe_beta, ctx.cfg.eoe_temperature)


@SCORES.register("mm_ood")
def _mm_ood(ctx: ScoreContext) -> np.ndarray:
    ctx.need("image_feats", "id_text_feats", "outlier_text_feats", score="mm_ood")
    return mm_ood(ctx.image_feats, ctx.id_text_feats, ctx.outlier_text_feats, 1.0 / ctx.cfg.mm_ood_temperature)


# The config field holding each method's temperature (printed with every metrics row).
TEMPERATURE_FIELDS = {
    "mcm": "mcm_temperature",
    "energy": "energy_temperature",
    "max_logit": "max_logit_temperature",
    "neglabel": "neglabel_tau",
    "eoe": "eoe_temperature",
    "mm_ood": "mm_ood_temperature",
    "synood": "neglabel_tau",
    "multi_os": "mm_ood_temperature",
}


def score_temperature(method: str, cfg: FinetuneConfig) -> float | None:
    """The temperature ``method`` scores with under ``cfg`` (None for an unknown method)."""
    name = TEMPERATURE_FIELDS.get(method)
    return None if name is None else float(getattr(cfg, name))


def compute_score(name: str, ctx: ScoreContext) -> np.ndarray:
    """Look up ``name`` in :data:`SCORES` and apply it to ``ctx``."""
    return SCORES.get(name)(ctx)

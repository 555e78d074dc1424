"""OOD scores on cached, L2-normalised CLIP features. Higher score = more in-distribution.

Every score has a plain function (explicit arguments) and a registry entry in :data:`SCORES`
with the uniform signature ``fn(ctx: ScoreContext) -> np.ndarray`` so that the evaluate step can
loop over score names from the config instead of branching on them.

Scores run in torch float64 on ``device`` (the stage's: a GPU worker scores on its GPU), one
chunk of images at a time so that an (images x labels) block stays under ``_CHUNK_ELEMS``
(ImageNet: 86k images x 10k negative labels would be 6.9 GB in float64 unchunked). Not float32:
at NegLabel's and MM-OOD's tau = 0.01 the ID softmax mass of most ID images rounds to exactly 1.0
in float32, and the ties make FPR95 meaningless (the world: NegLabel 100 % FPR95 on a set where
float64 gives 31 %).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ood_core.config import FinetuneConfig
from ood_core.registry import Registry

# Elements of one (chunk x labels) float64 block: 2^24 = 128 MiB, whatever the label count.
_CHUNK_ELEMS = 1 << 24
_MAX_ROWS = 8192

EOE_BETA = 0.25


def _t(x: Any, name: str, device: Any = None):
    """``x`` as a 2-D float64 tensor on ``device`` (default: where it is, numpy -> cpu)."""
    import torch

    t = x.detach() if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float64))
    if t.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, dim) feature array, got shape {tuple(t.shape)}")
    return t.to(device=device if device is not None else t.device, dtype=torch.float64)


def _check_dims(image_feats, **texts) -> None:
    for name, t in texts.items():
        if t.shape[1] != image_feats.shape[1]:
            raise ValueError(f"{name} has dim {t.shape[1]} but image_feats has dim {image_feats.shape[1]}")
        if t.shape[0] == 0:
            raise ValueError(f"{name} is empty: need at least one label")


def _chunked(image_feats, n_cols: int, fn: Callable) -> np.ndarray:
    """``fn`` over row chunks of ``image_feats`` whose (rows x ``n_cols``) blocks stay bounded."""
    import torch

    n = image_feats.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    rows = max(1, min(_MAX_ROWS, _CHUNK_ELEMS // max(1, n_cols)))
    with torch.no_grad():
        return torch.cat([fn(image_feats[i : i + rows]) for i in range(0, n, rows)]).cpu().numpy()


def _prepare(image_feats: Any, device: Any, **texts: Any):
    """Image and text features as float64 tensors on one device, dimensions checked."""
    img = _t(image_feats, "image_feats", device)
    out = {name: _t(t, name, img.device) for name, t in texts.items()}
    _check_dims(img, **out)
    return img, *out.values()


# ----------------------------------------------------------------- plain functions
def zero_shot_logits(image_feats: Any, text_feats: Any, logit_scale: float = 100.0) -> np.ndarray:
    """CLIP logits ``logit_scale * cos(image, text)``, shape (n_images, n_texts) (the whole matrix)."""
    img, txt = _prepare(image_feats, None, text_feats=text_feats)
    return (float(logit_scale) * (img @ txt.T)).cpu().numpy()


def mcm(image_feats: Any, id_text_feats: Any, temperature: float = 1.0, device: Any = None) -> np.ndarray:
    """MCM: max softmax over ID labels of ``cos / T`` (plain cosine, not scaled by 100)."""
    # float() guards against the reference code's fault of parsing T as an integer.
    t = float(temperature)
    if t <= 0:
        raise ValueError(f"mcm temperature must be > 0, got {temperature!r}")
    img, txt = _prepare(image_feats, device, id_text_feats=id_text_feats)
    return _chunked(img, txt.shape[0], lambda x: ((x @ txt.T) / t).softmax(-1).max(-1).values)


def energy(logits: Any) -> np.ndarray:
    """Negative free energy ``logsumexp(logits)`` over ID labels."""
    return _t(logits, "logits").logsumexp(-1).cpu().numpy()


def energy_score(image_feats: Any, id_text_feats: Any, temperature: float = 0.01, device: Any = None) -> np.ndarray:
    """EOE's energy baseline: ``T * logsumexp(cos / T)`` over the ID labels (eval.sh: ``--T 0.01``)."""
    t = float(temperature)
    if t <= 0:
        raise ValueError(f"energy temperature must be > 0, got {temperature!r}")
    img, txt = _prepare(image_feats, device, id_text_feats=id_text_feats)
    return _chunked(img, txt.shape[0], lambda x: t * ((x @ txt.T) / t).logsumexp(-1))


def max_logit(logits: Any) -> np.ndarray:
    """Maximum logit over ID labels."""
    return _t(logits, "logits").max(-1).values.cpu().numpy()


def max_logit_score(image_feats: Any, id_text_feats: Any, temperature: float = 1.0, device: Any = None) -> np.ndarray:
    """Maximum over ID labels of ``cos / T`` (chunked: the n x C logits are never whole)."""
    t = float(temperature)
    img, txt = _prepare(image_feats, device, id_text_feats=id_text_feats)
    return _chunked(img, txt.shape[0], lambda x: ((x @ txt.T) / t).max(-1).values)


def id_softmax_mass(
    image_feats: Any, id_text_feats: Any, other_text_feats: Any, logit_scale: float, device: Any = None
) -> np.ndarray:
    """Total softmax probability of the ID labels among ``[ID + other]`` at ``logit_scale * cos``."""
    img, idt, oth = _prepare(image_feats, device, id_text_feats=id_text_feats, other_text_feats=other_text_feats)
    s = float(logit_scale)

    def chunk(x):
        lse_id = (s * (x @ idt.T)).logsumexp(-1)
        lse_o = (s * (x @ oth.T)).logsumexp(-1)
        # ID mass = e^a / (e^a + e^b) = sigmoid(a - b): stable even at tau = 0.01.
        return (lse_id - lse_o).sigmoid()

    return _chunked(img, idt.shape[0] + oth.shape[0], chunk)


@functools.lru_cache(maxsize=16)
def _group_index(n_neg: int, groups: int, seed: int) -> np.ndarray:
    """(groups, size) negative indices; cached: NegLabel and SynOOD (and every role) share one grouping."""
    import torch

    g = min(int(groups), int(n_neg))
    usable = n_neg - n_neg % g
    perm = torch.randperm(usable, generator=torch.Generator().manual_seed(int(seed))).numpy()
    out = perm.reshape(g, -1)
    out.flags.writeable = False
    return out


def neglabel_groups(n_neg: int, groups: int, seed: int = 0) -> list[np.ndarray]:
    """NegLabel's grouping (``ScalableClassifier.grouping``): indices of each negative group.

    As the reference: the last ``n_neg % groups`` negatives are dropped, the rest permuted with
    ``torch.randperm`` after ``torch.manual_seed(seed)`` (here a CPU generator; the reference draws
    on CUDA, whose permutation differs) and cut into ``groups`` contiguous blocks of equal size.
    With more groups than negatives each negative is its own group (the reference would fail).
    """
    return list(_group_index(int(n_neg), int(groups), int(seed)))


def neglabel(
    image_feats: Any,
    id_text_feats: Any,
    neg_text_feats: Any,
    tau: float = 0.01,
    groups: int = 100,
    seed: int = 0,
    device: Any = None,
) -> np.ndarray:
    """NegLabel score: mean over negative-label groups of the ID softmax mass.

    Groups come from :func:`neglabel_groups` (remainder dropped, seeded permutation); for each
    group the score is ``sum_ID softmax([cos_ID, cos_group] / tau)``. ``groups=1`` is the softmax
    mass over all negatives (the reference code's ungrouped path lacked the softmax).
    """
    import torch

    if int(groups) < 1:
        raise ValueError(f"neglabel groups must be >= 1, got {groups}")
    if float(tau) <= 0:
        raise ValueError(f"neglabel tau must be > 0, got {tau}")
    img, idt, neg = _prepare(image_feats, device, id_text_feats=id_text_feats, neg_text_feats=neg_text_feats)
    n_neg = neg.shape[0]
    parts = _group_index(n_neg, int(groups), int(seed)) if int(groups) > 1 else np.arange(n_neg)[None]
    # the negatives reordered once so that each group is a contiguous block of the product's columns
    neg = neg[torch.from_numpy(parts.reshape(-1).astype(np.int64)).to(neg.device)]
    g = parts.shape[0]
    s = 1.0 / float(tau)

    def chunk(x):
        lse_id = (s * (x @ idt.T)).logsumexp(-1)
        lse_g = (s * (x @ neg.T)).view(x.shape[0], g, -1).logsumexp(-1)
        return (lse_id[:, None] - lse_g).sigmoid().mean(-1)

    return _chunked(img, idt.shape[0] + neg.shape[0], chunk)


def eoe(
    image_feats: Any,
    id_text_feats: Any,
    outlier_text_feats: Any,
    beta: float = EOE_BETA,
    temperature: float = 1.0,
    device: Any = None,
) -> np.ndarray:
    """EOE: softmax over ``[ID + outlier]`` of ``cos / T``; ``max ID prob - beta * max outlier prob``.

    EOE's code (utils/detection_util.py, ``--T`` default 1) takes the softmax of raw cosines.
    """
    import torch

    img, idt, out = _prepare(image_feats, device, id_text_feats=id_text_feats, outlier_text_feats=outlier_text_feats)
    both = torch.cat([idt, out])
    n_id = idt.shape[0]

    def chunk(x):
        p = ((x @ both.T) / float(temperature)).softmax(-1)
        return p[:, :n_id].max(-1).values - float(beta) * p[:, n_id:].max(-1).values

    return _chunked(img, both.shape[0], chunk)


def eoe_averaged(
    image_feats: Any,
    id_text_feats: Any,
    outlier_sets: list[Any],
    beta: float = EOE_BETA,
    temperature: float = 1.0,
    device: Any = None,
) -> np.ndarray:
    """EOE over N independently generated outlier label sets (EOE's eval.sh: 4 label files):
    the mean of the N single-set :func:`eoe` scores."""
    if not outlier_sets:
        raise ValueError("eoe_averaged needs at least one outlier label set")
    return np.mean([eoe(image_feats, id_text_feats, o, beta, temperature, device) for o in outlier_sets], axis=0)


def mm_ood(
    image_feats: Any,
    id_text_feats: Any,
    outlier_text_feats: Any,
    logit_scale: float = 100.0,
    device: Any = None,
) -> np.ndarray:
    """MM-OOD training-free score: the ID softmax mass among ``[ID + outlier labels]``.

    ``outlier_text_feats`` are the sketched (near + far) and elaborated outlier labels' text
    features; the score is ``sum_ID softmax(logit_scale * cos(image, [ID, outliers]))``, so an
    image that matches any outlier label better than every ID label gets a low score.
    """
    return id_softmax_mass(image_feats, id_text_feats, outlier_text_feats, logit_scale, device)


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
    # where the scores run (the stage's device); None: where the image features are
    device: Any = None

    def need(self, *names: str, score: str) -> None:
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"score '{score}' needs {', '.join(missing)} but the ScoreContext has none")


ScoreFn = Callable[[ScoreContext], np.ndarray]
SCORES: Registry[ScoreFn] = Registry("score")


@SCORES.register("mcm")
def _mcm(ctx: ScoreContext) -> np.ndarray:
    ctx.need("image_feats", "id_text_feats", score="mcm")
    return mcm(ctx.image_feats, ctx.id_text_feats, ctx.cfg.mcm_temperature, ctx.device)


@SCORES.register("energy")
def _energy(ctx: ScoreContext) -> np.ndarray:
    ctx.need("image_feats", "id_text_feats", score="energy")
    return energy_score(ctx.image_feats, ctx.id_text_feats, ctx.cfg.energy_temperature, ctx.device)


@SCORES.register("max_logit")
def _max_logit(ctx: ScoreContext) -> np.ndarray:
    ctx.need("image_feats", "id_text_feats", score="max_logit")
    return max_logit_score(ctx.image_feats, ctx.id_text_feats, ctx.cfg.max_logit_temperature, ctx.device)


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
        device=ctx.device,
    )


@SCORES.register("eoe")
def _eoe(ctx: ScoreContext) -> np.ndarray:
    ctx.need("image_feats", "id_text_feats", "outlier_text_feats", score="eoe")
    if not ctx.outlier_sets:
        return eoe(ctx.image_feats, ctx.id_text_feats, ctx.outlier_text_feats, ctx.cfg.eoe_beta,
                   ctx.cfg.eoe_temperature, ctx.device)
    return eoe_averaged(ctx.image_feats, ctx.id_text_feats, [ctx.outlier_text_feats, *ctx.outlier_sets],
                        ctx.cfg.eoe_beta, ctx.cfg.eoe_temperature, ctx.device)


@SCORES.register("mm_ood")
def _mm_ood(ctx: ScoreContext) -> np.ndarray:
    ctx.need("image_feats", "id_text_feats", "outlier_text_feats", score="mm_ood")
    return mm_ood(ctx.image_feats, ctx.id_text_feats, ctx.outlier_text_feats, 1.0 / ctx.cfg.mm_ood_temperature,
                  ctx.device)


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
    """The temperature ``method`` scores with under ``cfg`` (None for an unknown method); a variant
    row ``method[set]`` (e.g. ``synood[t2i]``, finetune.kind_sets) scores as ``method``."""
    name = TEMPERATURE_FIELDS.get(method.split("[", 1)[0])
    return None if name is None else float(getattr(cfg, name))


def compute_score(name: str, ctx: ScoreContext) -> np.ndarray:
    """Look up ``name`` in :data:`SCORES` and apply it to ``ctx``."""
    return SCORES.get(name)(ctx)

"""Behavioural tests of the OOD scores on small seeded feature sets."""

import numpy as np
import pytest

from ood_core.config import FinetuneConfig
from ood_core.scores import (
    SCORES,
    ScoreContext,
    compute_score,
    energy,
    eoe,
    max_logit,
    mcm,
    mm_ood,
    neglabel,
    zero_shot_logits,
)


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def feats():
    rng = np.random.default_rng(123)
    return {
        "img": _unit(rng.normal(size=(30, 16))).astype(np.float32),
        "idt": _unit(rng.normal(size=(5, 16))).astype(np.float32),
        "neg": _unit(rng.normal(size=(37, 16))).astype(np.float32),
        "out": _unit(rng.normal(size=(6, 16))).astype(np.float32),
    }


# Scores run in float32: at tau = 0.01 the logits are ~100, whose float32 ulp is ~8e-6, so a
# softmax mass carries a relative error of a few 1e-6 (the float64 references are exact).
F32 = {"rtol": 2e-5, "atol": 1e-9}


def _softmax(x):
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_mcm_uses_plain_cosine_and_float_temperature(feats):
    cos = feats["img"].astype(np.float64) @ feats["idt"].T.astype(np.float64)
    np.testing.assert_allclose(mcm(feats["img"], feats["idt"], 1.0), _softmax(cos).max(1), rtol=1e-6)
    # T = 0.5 must not be truncated to an integer (a fault of the reference code).
    np.testing.assert_allclose(mcm(feats["img"], feats["idt"], 0.5), _softmax(cos / 0.5).max(1), rtol=1e-6)
    # Plain cosine over 5 labels keeps MCM close to uniform (1/5), unlike a x100 scale.
    assert mcm(feats["img"], feats["idt"]).max() < 0.5


def test_energy_and_max_logit(feats):
    logits = zero_shot_logits(feats["img"], feats["idt"], 100)
    assert logits.shape == (30, 5)
    np.testing.assert_allclose(max_logit(logits), logits.max(1))
    e = energy(logits)
    assert np.all(e >= logits.max(1)) and np.all(e <= logits.max(1) + np.log(5) + 1e-9)


def test_neglabel_ungrouped_is_softmax_mass(feats):
    s = neglabel(feats["img"], feats["idt"], feats["neg"], tau=0.01, groups=1)
    both = np.concatenate([feats["idt"], feats["neg"]]).astype(np.float64)
    p = _softmax(feats["img"].astype(np.float64) @ both.T / 0.01)
    np.testing.assert_allclose(s, p[:, :5].sum(1), **F32)
    assert np.all((s >= 0) & (s <= 1))


def test_neglabel_grouped_is_mean_of_group_masses(feats):
    groups = 4
    s = neglabel(feats["img"], feats["idt"], feats["neg"], tau=0.05, groups=groups, seed=3)
    # NegLabel's grouping: the 37 % 4 = 1 last negative is dropped, the rest permuted
    # (torch.randperm after manual_seed) and cut into 4 equal contiguous groups
    import torch

    perm = torch.randperm(36, generator=torch.Generator().manual_seed(3)).numpy()
    expected = np.zeros(30)
    for part in perm.reshape(groups, -1):
        both = np.concatenate([feats["idt"], feats["neg"][part]]).astype(np.float64)
        expected += _softmax(feats["img"].astype(np.float64) @ both.T / 0.05)[:, :5].sum(1)
    np.testing.assert_allclose(s, expected / groups, **F32)


def test_neglabel_seeded_shuffle(feats):
    args = (feats["img"], feats["idt"], feats["neg"])
    a = neglabel(*args, tau=0.05, groups=5, seed=0)
    np.testing.assert_array_equal(a, neglabel(*args, tau=0.05, groups=5, seed=0))
    assert not np.allclose(a, neglabel(*args, tau=0.05, groups=5, seed=1))
    # The shuffle cannot matter with one group or one negative per group.
    np.testing.assert_allclose(
        neglabel(*args, groups=1, seed=0), neglabel(*args, groups=1, seed=7), rtol=1e-12
    )
    # More groups than negatives falls back to one negative per group.
    np.testing.assert_allclose(neglabel(*args, groups=1000), neglabel(*args, groups=37), rtol=1e-12)


def test_eoe_and_mm_ood(feats):
    both = np.concatenate([feats["idt"], feats["out"]]).astype(np.float64)
    p = _softmax(100 * feats["img"].astype(np.float64) @ both.T)
    # EOE's default temperature is 1 (softmax over raw cosines, as its code)
    p1 = _softmax(feats["img"].astype(np.float64) @ both.T)
    np.testing.assert_allclose(
        eoe(feats["img"], feats["idt"], feats["out"]),
        p1[:, :5].max(1) - 0.25 * p1[:, 5:].max(1),
        **F32,
    )
    np.testing.assert_allclose(
        eoe(feats["img"], feats["idt"], feats["out"], temperature=0.01),
        p[:, :5].max(1) - 0.25 * p[:, 5:].max(1),
        **F32,
    )
    np.testing.assert_allclose(
        mm_ood(feats["img"], feats["idt"], feats["out"]), p[:, :5].sum(1), **F32
    )


def test_scores_rank_id_above_ood():
    rng = np.random.default_rng(0)
    idt = np.eye(8, dtype=np.float32)[:3]
    neg = np.eye(8, dtype=np.float32)[3:6]
    id_img = _unit(idt[rng.integers(0, 3, 40)] + 0.2 * rng.normal(size=(40, 8))).astype(np.float32)
    ood_img = _unit(neg[rng.integers(0, 3, 40)] + 0.2 * rng.normal(size=(40, 8))).astype(np.float32)
    for name in SCORES.names():
        s_id = compute_score(name, ScoreContext(id_img, idt, neg, neg))
        s_ood = compute_score(name, ScoreContext(ood_img, idt, neg, neg))
        assert s_id.shape == (40,) and np.all(np.isfinite(s_id))
        assert s_id.mean() > s_ood.mean(), name


def test_registry_uses_config_and_reports_missing_inputs(feats):
    assert SCORES.names() == sorted(["mcm", "energy", "max_logit", "neglabel", "eoe", "mm_ood"])
    cfg = FinetuneConfig(neglabel_groups=3, neglabel_tau=0.05, mcm_temperature=0.5)
    ctx = ScoreContext(feats["img"], feats["idt"], feats["neg"], cfg=cfg, seed=2)
    np.testing.assert_array_equal(
        compute_score("neglabel", ctx), neglabel(feats["img"], feats["idt"], feats["neg"], 0.05, 3, seed=2)
    )
    np.testing.assert_array_equal(compute_score("mcm", ctx), mcm(feats["img"], feats["idt"], 0.5))
    with pytest.raises(ValueError, match="outlier_text_feats"):
        compute_score("eoe", ctx)
    with pytest.raises(ValueError, match="neg_text_feats"):
        compute_score("neglabel", ScoreContext(feats["img"], feats["idt"]))
    with pytest.raises(KeyError, match="known score"):
        compute_score("nope", ctx)

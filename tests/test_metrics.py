"""Behavioural tests of the OOD metrics against hand-computed (sklearn-equivalent) values."""

import numpy as np
import pytest

from ood_core.metrics import auroc, average_precision, id_accuracy, ood_metrics, roc_curve

# ID scores and OOD scores with ties across the two sets (0.5 appears in both).
TIE_ID = [0.9, 0.5, 0.5, 0.2]
TIE_OOD = [0.5, 0.1, 0.5]


@pytest.mark.parametrize("convention", ["openood", "mcm"])
def test_perfect_separation(convention):
    m = ood_metrics([0.9, 0.8, 0.7], [0.1, 0.2], convention)
    assert m == {"fpr95": 0.0, "fpr95_openood": 0.0, "fpr95_mcm": 0.0, "auroc": 1.0, "aupr_in": 1.0,
                 "aupr_out": 1.0, "ap_in": 1.0, "ap_out": 1.0}


@pytest.mark.parametrize("convention", ["openood", "mcm"])
def test_reversed_scores(convention):
    m = ood_metrics([0.1, 0.2], [0.9, 0.8, 0.7], convention)
    assert m["auroc"] == 0.0
    assert m["fpr95"] == 1.0


def test_ties_match_hand_computed_sklearn_values():
    # roc_auc_score([1]*4+[0]*3, id+ood): 12 pairs, 0.9 beats 3, each 0.5 beats 1 and ties 2
    # (2 x 2.0), 0.2 beats 1 -> 8/12.
    m = ood_metrics(TIE_ID, TIE_OOD)
    assert m["auroc"] == pytest.approx(8 / 12)
    # average_precision_score with ID positive: thresholds 0.9 (P=1, R=.25), 0.5 (P=3/5, R=.75),
    # 0.2 (P=4/6, R=1) -> .25*1 + .5*.6 + .25*(2/3).
    assert m["ap_in"] == pytest.approx(0.25 + 0.3 + 0.25 * 2 / 3)
    # OpenOOD's AUPR: trapezoid over (R, P) = (0, 1), (.25, 1), (.75, .6), (1, 2/3).
    assert m["aupr_in"] == pytest.approx(0.25 * 1 + 0.5 * (1 + 0.6) / 2 + 0.25 * (0.6 + 2 / 3) / 2)
    # OOD positive on -score: -0.1 (P=1, R=1/3), -0.2 (P=1/2, R=1/3), -0.5 (P=3/6, R=1).
    assert m["ap_out"] == pytest.approx(1 / 3 + 2 / 3 * 0.5)
    # OpenOOD: the first threshold reaching TPR >= .95 is the tied 0.5 block: 3 of 4 ID flagged.
    assert m["fpr95"] == pytest.approx(0.75)


def test_auroc_equals_pairwise_probability_and_roc_area():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a = rng.integers(0, 5, size=rng.integers(1, 15)).astype(float)
        b = rng.integers(0, 5, size=rng.integers(1, 15)).astype(float)
        brute = ((a[:, None] > b).sum() + 0.5 * (a[:, None] == b).sum()) / (a.size * b.size)
        assert auroc(a, b) == pytest.approx(brute)
        for conv in ("openood", "mcm"):
            fpr, tpr = roc_curve(a, b, conv)
            assert fpr[0] == tpr[0] == 0.0 and fpr[-1] == tpr[-1] == 1.0
            assert np.trapezoid(tpr, fpr) == pytest.approx(brute)


def test_fpr_conventions_differ_on_the_same_scores():
    id_s = np.arange(1, 21, dtype=float)
    ood_s = [0.5, 1.5, 10.5]
    # OpenOOD: all 3 OOD flagged needs threshold 10.5 -> 10 of 20 ID flagged.
    assert ood_metrics(id_s, ood_s, "openood")["fpr95"] == pytest.approx(0.5)
    # MCM: ID recall is exactly .95 at thresholds 2 and 1.5; the MCM code takes 1.5 -> 2 of 3 OOD.
    assert ood_metrics(id_s, ood_s, "mcm")["fpr95"] == pytest.approx(2 / 3)
    # both are carried whichever is configured
    for convention in ("openood", "mcm"):
        m = ood_metrics(id_s, ood_s, convention)
        assert (m["fpr95_openood"], m["fpr95_mcm"]) == (pytest.approx(0.5), pytest.approx(2 / 3))
    with pytest.raises(ValueError, match="convention"):
        ood_metrics(id_s, ood_s, "sklearn")
    # MCM's nearest-recall rule may stop below 95%: with 10 ID, recall .9 is nearer to .95 than 1.0
    # in floating point, so the OOD sample tied with the lowest ID score is never counted.
    assert ood_metrics(np.arange(1, 11.0), [1.0], "mcm")["fpr95"] == 0.0
    assert ood_metrics(np.arange(1, 11.0), [1.0], "openood")["fpr95"] == pytest.approx(0.1)


def test_average_precision_is_not_symmetric_in_classes():
    assert average_precision([3.0, 1.0], [2.0]) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="NaN"):
        ood_metrics([0.1, np.nan], [0.2])
    with pytest.raises(ValueError, match="empty"):
        ood_metrics([], [0.2])
    with pytest.raises(ValueError, match="convention"):
        ood_metrics([0.1], [0.2], "sklearn")


def test_id_accuracy_from_logits_and_predictions():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    assert id_accuracy(logits, [0, 1, 1]) == pytest.approx(2 / 3)
    assert id_accuracy(np.array([0, 1, 1]), np.array([0, 1, 1])) == 1.0


def _openood_aupr_reference(pos, neg):
    """OpenOOD (openood/evaluators/metrics.py@3c35632): metrics.auc(recall, precision) of
    precision_recall_curve, written out: one point per distinct threshold, reversed, plus (0, 1)."""
    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    thr = np.unique(np.r_[pos, neg])[::-1]
    tp = np.array([(pos >= t).sum() for t in thr], float)
    fp = np.array([(neg >= t).sum() for t in thr], float)
    precision = np.r_[(tp / (tp + fp))[::-1], 1.0]
    recall = np.r_[(tp / pos.size)[::-1], 0.0]
    return abs(float(np.trapezoid(precision, recall)))


def test_aupr_is_openood_trapezoid_on_tied_scores():
    rng = np.random.default_rng(1)
    for _ in range(30):
        id_s = rng.integers(0, 6, size=rng.integers(2, 20)).astype(float)
        ood_s = rng.integers(0, 6, size=rng.integers(2, 20)).astype(float)
        m = ood_metrics(id_s, ood_s)
        assert abs(m["aupr_in"] - _openood_aupr_reference(id_s, ood_s)) < 1e-6
        assert abs(m["aupr_out"] - _openood_aupr_reference(-ood_s, -id_s)) < 1e-6
        assert abs(m["ap_in"] - average_precision(id_s, ood_s)) < 1e-12

"""OOD detection metrics: FPR@95TPR, AUROC, AUPR-In, AUPR-Out and ID accuracy (numpy only).

Score convention everywhere in this project: a HIGHER score means MORE in-distribution.

Two FPR95 conventions exist in the literature and they give different numbers on the same
scores, so every table names the one it uses:

* ``"openood"`` (OpenOOD v1.5, the default): OOD is the positive class (ranked by ``-score``).
  Thresholds are scanned from the most-OOD score; FPR95 is the fraction of ID samples flagged as
  OOD at the first threshold where at least 95% of the OOD samples are flagged.
* ``"mcm"`` (MCM/EOE code, inherited from ODIN's ``fpr_and_fdr_at_recall``): ID is the positive
  class; FPR95 is the fraction of OOD samples accepted as ID at the threshold whose ID recall is
  *nearest* to 0.95 (it may be below 0.95).

Example: ID = 1..20, OOD = {0.5, 1.5, 10.5} gives 0.5 under "openood" (flagging all OOD needs the
threshold at 10.5, which flags 10 of 20 ID) and 2/3 under "mcm" (ID recall is exactly 0.95 at the
thresholds 2 and 1.5; like the MCM code we take the lower one, which accepts the OOD samples 10.5
and 1.5).

AUROC does not depend on the convention. AUPR is computed as OpenOOD v1.5 does
(``openood/evaluators/metrics.py`` at Jingkang50/OpenOOD@3c35632: ``auc(recall, precision)`` of
sklearn's ``precision_recall_curve``, i.e. the trapezoid rule over the PR points plus the (0, 1)
end point). sklearn's step-wise ``average_precision_score`` is reported beside it as ``ap_in`` /
``ap_out`` (named as such; it differs from AUPR on ties and small sets).
"""

from __future__ import annotations

from typing import Any

import numpy as np

CONVENTIONS = ("openood", "mcm")
RECALL_LEVEL = 0.95


def _as_scores(x: Any, name: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor without importing torch
        x = x.detach().cpu().numpy()
    arr = np.asarray(x, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError(f"{name} is empty: need at least one score")
    if not np.all(np.isfinite(arr)):
        raise ValueError(
            f"{name} contains NaN or inf scores ({int((~np.isfinite(arr)).sum())} of {arr.size})"
        )
    return arr


def _binary_clf_curve(y_true: np.ndarray, y_score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (fps, tps, thresholds) at each distinct score, highest score first (as sklearn)."""
    order = np.argsort(y_score, kind="mergesort")[::-1]
    y_score = y_score[order]
    y_true = y_true[order]
    distinct = np.where(np.diff(y_score))[0]
    idx = np.r_[distinct, y_true.size - 1]
    tps = np.cumsum(y_true, dtype=np.float64)[idx]
    fps = 1.0 + idx - tps
    return fps, tps, y_score[idx]


def auroc(pos_scores: Any, neg_scores: Any) -> float:
    """P(pos > neg) + 0.5 P(pos == neg): the Mann-Whitney form of sklearn's roc_auc_score."""
    pos = _as_scores(pos_scores, "pos_scores")
    neg = _as_scores(neg_scores, "neg_scores")
    allv = np.concatenate([pos, neg])
    # Average ranks give ties half credit, which is exactly the trapezoid over tied thresholds.
    order = np.argsort(allv, kind="mergesort")
    sorted_v = allv[order]
    ranks = np.empty(allv.size, dtype=np.float64)
    starts = np.r_[0, np.where(np.diff(sorted_v))[0] + 1]
    ends = np.r_[starts[1:], allv.size]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie block
    ranks[order] = np.repeat(avg, ends - starts)
    r_pos = ranks[: pos.size].sum()
    u = r_pos - pos.size * (pos.size + 1) / 2.0
    return float(u / (pos.size * neg.size))


def average_precision(pos_scores: Any, neg_scores: Any) -> float:
    """sklearn's average_precision_score with the ``pos`` samples as the positive class."""
    pos = _as_scores(pos_scores, "pos_scores")
    neg = _as_scores(neg_scores, "neg_scores")
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    fps, tps, _ = _binary_clf_curve(y, np.r_[pos, neg])
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    recall_prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - recall_prev) * precision))


def aupr_trapezoid(pos_scores: Any, neg_scores: Any) -> float:
    """OpenOOD's AUPR: trapezoid area under sklearn's PR curve with the ``pos`` samples positive.

    The curve has one point per distinct score (precision = tp / (tp + fp), recall = tp / P) plus
    sklearn's final (recall 0, precision 1) point; ``sklearn.metrics.auc`` integrates it with the
    trapezoid rule.
    """
    pos = _as_scores(pos_scores, "pos_scores")
    neg = _as_scores(neg_scores, "neg_scores")
    y = np.r_[np.ones(pos.size), np.zeros(neg.size)]
    fps, tps, _ = _binary_clf_curve(y, np.r_[pos, neg])
    precision = np.r_[1.0, tps / (tps + fps)]
    recall = np.r_[0.0, tps / tps[-1]]
    return float(np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2.0))


def _fpr95_openood(id_s: np.ndarray, ood_s: np.ndarray) -> float:
    y = np.r_[np.zeros(id_s.size), np.ones(ood_s.size)]
    fps, tps, _ = _binary_clf_curve(y, -np.r_[id_s, ood_s])
    tpr = tps / ood_s.size
    fpr = fps / id_s.size
    # tpr is non-decreasing and reaches 1 at the last threshold, so argmax finds the first hit.
    return float(fpr[np.argmax(tpr >= RECALL_LEVEL)])


def _fpr95_mcm(id_s: np.ndarray, ood_s: np.ndarray) -> float:
    # Mirrors ODIN/MCM fpr_and_fdr_at_recall so numbers are comparable with their tables,
    # including which of two equally near recalls wins (the higher recall, i.e. first after reversal).
    y = np.r_[np.ones(id_s.size), np.zeros(ood_s.size)]
    fps, tps, _ = _binary_clf_curve(y, np.r_[id_s, ood_s])
    recall = tps / tps[-1]
    last = tps.searchsorted(tps[-1])
    sl = slice(last, None, -1)
    recall, fps = recall[sl], fps[sl]
    cutoff = int(np.argmin(np.abs(recall - RECALL_LEVEL)))
    return float(fps[cutoff] / ood_s.size)


def fpr_at_95_tpr(id_scores: Any, ood_scores: Any, convention: str = "openood") -> float:
    """FPR at 95% TPR under the named convention (see the module docstring)."""
    id_s = _as_scores(id_scores, "id_scores")
    ood_s = _as_scores(ood_scores, "ood_scores")
    if convention == "openood":
        return _fpr95_openood(id_s, ood_s)
    if convention == "mcm":
        return _fpr95_mcm(id_s, ood_s)
    raise ValueError(f"unknown FPR convention {convention!r}: use one of {', '.join(CONVENTIONS)}")


def ood_metrics(id_scores: Any, ood_scores: Any, convention: str = "openood") -> dict[str, float]:
    """``{fpr95, fpr95_openood, fpr95_mcm, auroc, aupr_in, aupr_out, ap_in, ap_out}`` as fractions;
    higher score = more ID.

    ``convention`` only chooses which FPR95 is ``fpr95`` ("openood": OOD positive, first threshold
    with TPR >= 0.95; "mcm": ID positive, recall nearest 0.95); both are always given as
    ``fpr95_<convention>``, since papers report either (MCM and EOE the "mcm" one) and they differ.
    ``aupr_in`` takes ID as positive (ranked by score), ``aupr_out`` OOD (ranked by -score), both
    OpenOOD's trapezoid :func:`aupr_trapezoid`; ``ap_in`` / ``ap_out`` are the step-wise average
    precision of the same rankings.
    """
    id_s = _as_scores(id_scores, "id_scores")
    ood_s = _as_scores(ood_scores, "ood_scores")
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown FPR convention {convention!r}: use one of {', '.join(CONVENTIONS)}")
    both = {f"fpr95_{c}": fpr_at_95_tpr(id_s, ood_s, c) for c in CONVENTIONS}
    return {
        "fpr95": both[f"fpr95_{convention}"],
        **both,
        "auroc": auroc(id_s, ood_s),
        "aupr_in": aupr_trapezoid(id_s, ood_s),
        "aupr_out": aupr_trapezoid(-ood_s, -id_s),
        "ap_in": average_precision(id_s, ood_s),
        "ap_out": average_precision(-ood_s, -id_s),
    }


def roc_curve(id_scores: Any, ood_scores: Any, convention: str = "openood") -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) from (0, 0) to (1, 1) for plotting, one point per distinct score.

    "openood": OOD positive (fpr = ID flagged as OOD, tpr = OOD flagged); "mcm": ID positive.
    The area under either curve equals ``auroc``.
    """
    id_s = _as_scores(id_scores, "id_scores")
    ood_s = _as_scores(ood_scores, "ood_scores")
    if convention == "openood":
        y = np.r_[np.zeros(id_s.size), np.ones(ood_s.size)]
        fps, tps, _ = _binary_clf_curve(y, -np.r_[id_s, ood_s])
        n_neg, n_pos = id_s.size, ood_s.size
    elif convention == "mcm":
        y = np.r_[np.ones(id_s.size), np.zeros(ood_s.size)]
        fps, tps, _ = _binary_clf_curve(y, np.r_[id_s, ood_s])
        n_neg, n_pos = ood_s.size, id_s.size
    else:
        raise ValueError(f"unknown FPR convention {convention!r}: use one of {', '.join(CONVENTIONS)}")
    return np.r_[0.0, fps / n_neg], np.r_[0.0, tps / n_pos]


def id_accuracy(logits_or_pred: Any, labels: Any) -> float:
    """Top-1 accuracy; accepts (N, C) logits (argmax taken) or (N,) predicted class indices."""
    if hasattr(logits_or_pred, "detach"):
        logits_or_pred = logits_or_pred.detach().cpu().numpy()
    if hasattr(labels, "detach"):
        labels = labels.detach().cpu().numpy()
    x = np.asarray(logits_or_pred)
    y = np.asarray(labels).reshape(-1)
    pred = x.argmax(axis=1) if x.ndim == 2 else x.reshape(-1)
    if pred.shape[0] != y.shape[0]:
        raise ValueError(f"id_accuracy: {pred.shape[0]} predictions but {y.shape[0]} labels")
    if y.size == 0:
        raise ValueError("id_accuracy: no samples")
    return float(np.mean(pred.astype(np.int64) == y.astype(np.int64)))

"""Report artefacts: a Markdown metrics table, ROC curves, score histograms, an image grid.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas (no pyplot, so no global
state and no display needed); matplotlib is imported inside the functions so that importing this
module stays cheap. Each PNG is written under a temporary name and renamed into place, so a killed
process never leaves a half-written picture.
"""

from __future__ import annotations

import math
import os
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

AVERAGE = "average"
CONVENTION_TEXT = {
    "openood": "OpenOOD v1.5: OOD positive, FPR at the first threshold with TPR >= 95%",
    "mcm": "MCM/EOE: ID positive, FPR at the threshold with ID recall nearest 95%",
}


def _ordered_sets(results: Mapping[str, Mapping[str, Any]]) -> list[str]:
    # First-seen order, never set(): the column order must be stable between runs.
    seen: dict[str, None] = {}
    for per_set in results.values():
        for name in per_set:
            if name != AVERAGE:
                seen.setdefault(name, None)
    return list(seen)


def _pct(v: float | None) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{100.0 * float(v):.2f}"


def _fpr_columns(results: Mapping[str, Mapping[str, Mapping[str, float]]], convention: str) -> list[tuple[str, str]]:
    """(metric key, label) of the FPR95 columns: both conventions, the configured one first, when
    every entry carries both (``ood_metrics`` does); else the configured one alone."""
    entries = [m for per_set in results.values() for s, m in per_set.items() if s != AVERAGE]
    others = [c for c in CONVENTION_TEXT if c != convention]
    if entries and all(f"fpr95_{c}" in m for m in entries for c in CONVENTION_TEXT):
        return [(f"fpr95_{c}", f"FPR95↓ [{c}]") for c in (convention, *others)]
    return [("fpr95", "FPR95↓")]


def metrics_table_markdown(
    results: Mapping[str, Mapping[str, Mapping[str, float]]],
    convention: str,
    id_accuracy: Mapping[str, float] | None = None,
    temperatures: Mapping[str, float | None] | None = None,
) -> str:
    """Markdown table: one row per method, FPR95 / AUROC / AUPR-In (in %) per OOD set plus their average.

    ``results[method][ood_set]`` is an :func:`ood_core.metrics.ood_metrics` dict. The first line is
    a caption naming the FPR95 convention(s). When the entries carry both FPR95s (``fpr95_openood``,
    ``fpr95_mcm``) each group has both columns, labelled ``[openood]`` / ``[mcm]``, the configured
    ``convention`` first, so a number can be set beside a paper of either kind; otherwise one
    ``FPR95↓`` column in ``convention``. ``id_accuracy[method]`` (fraction) adds an "ID acc." column.
    ``temperatures[method]`` adds a "T" column (the temperature the score was computed at).
    A method missing an OOD set shows "–" there and averages over the sets it has. An entry named
    "average" in ``results[method]`` is ignored: the average columns are recomputed from the sets.
    """
    if convention not in CONVENTION_TEXT:
        raise ValueError(f"unknown FPR convention {convention!r}: use one of {', '.join(CONVENTION_TEXT)}")
    sets = _ordered_sets(results)
    groups = [*sets, AVERAGE]
    fpr_cols = _fpr_columns(results, convention)
    named = [c for c in CONVENTION_TEXT if any(label.endswith(f"[{c}]") for _, label in fpr_cols)] or [convention]
    conventions = "; ".join(f"{c} ({CONVENTION_TEXT[c]})" for c in named)
    caption = (
        f"FPR95 (lower is better), AUROC and AUPR (AUPR-In: ID as the positive class; higher is better) in %; "
        f"FPR95 convention{'s' if len(named) > 1 else ''}: {conventions}."
    )
    metric_cols = [*fpr_cols, ("auroc", "AUROC↑"), ("aupr_in", "AUPR↑")]
    head = ["method"] + (["T"] if temperatures is not None else [])
    for g in groups:
        head += [f"{g} {label}" for _, label in metric_cols]
    if id_accuracy is not None:
        head.append("ID acc.")
    lines = [
        caption,
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for method, per_set in results.items():
        row = [str(method)]
        if temperatures is not None:
            t = temperatures.get(method)
            row.append("–" if t is None else f"{t:g}")
        values: dict[str, list[float]] = {k: [] for k, _ in metric_cols}
        for s in sets:
            m = per_set.get(s)
            if m is None:
                row += ["–"] * len(metric_cols)
                continue
            for k, _ in metric_cols:
                values[k].append(float(m[k]))
                row.append(_pct(m[k]))
        row += [_pct(np.mean(values[k]) if values[k] else None) for k, _ in metric_cols]
        if id_accuracy is not None:
            row.append(_pct(id_accuracy.get(method)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def leaked_labels_markdown(rows: Sequence[Mapping[str, Any]], kept: bool, why: Callable[[str], Any] | None = None,
                           rule: str = "") -> str:
    """A section with a table of the labels flagged as naming an evaluation OOD class (label leakage):
    per label its kind and, from ``why(label)`` (an :class:`ood_core.leakage.LeakMatch` or None), the
    OOD set and class it names, how (equal / synonym / hypernym / word) and through what."""
    head = "## Leaked labels (name an evaluation OOD class)"
    if not rows:
        return f"{head}\n\nNone found.\n"
    fate = "KEPT in the label sets (sketch.keep_leaked_labels: true)" if kept else "excluded from every label set"
    lines = [head, "", f"{len(rows)} label(s), {fate}" + (f"; rule `{rule}`" if rule else "") + ":", "",
             "| label | kind | OOD set | class | how | via |", "|---|---|---|---|---|---|"]
    for r in rows:
        m = why(r["text"]) if why is not None else None
        cells = [m.ood_set, m.name, m.how, m.via or "-"] if m is not None else ["?"] * 4
        lines.append("| " + " | ".join([f"`{r['text']}`", str(r["kind"]), *(_cell(c) for c in cells)]) + " |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def plot_roc(
    curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    path: str | os.PathLike,
) -> Path:
    """One ROC panel per OOD set with a line per method; ``curves[method][ood_set] = (fpr, tpr)``."""
    sets = _ordered_sets(curves)
    n = max(1, len(sets))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _new_figure(4.0 * cols, 3.6 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, s in zip(axes, sets, strict=False):
        for method, per_set in curves.items():
            if s in per_set:
                fpr, tpr = per_set[s]
                ax.plot(np.asarray(fpr), np.asarray(tpr), label=str(method), lw=1.4)
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=0.8)
        ax.set(title=str(s), xlabel="FPR", ylabel="TPR", xlim=(0, 1), ylim=(0, 1.01))
        ax.legend(fontsize=7, loc="lower right")
    for ax in axes[len(sets) :]:
        ax.axis("off")
    if not sets:
        axes[0].text(0.5, 0.5, "no curves", ha="center", va="center")
    return _save(fig, path)


def plot_rounds(rounds: Sequence[Mapping[str, Any]], path: str | os.PathLike,
                methods: Sequence[str] = ("mcm", "neglabel", "synood", "mm_ood")) -> Path:
    """FPR95 and AUROC (average over the OOD sets) per generation round, one line per method."""
    fig = _new_figure(10, 3.5)
    axes = fig.subplots(1, 2)
    names = [r["round"] for r in rounds]
    for method in methods:
        if not any(method in r["metrics"] for r in rounds):
            continue
        for ax, key in zip(axes, ("fpr95", "auroc"), strict=True):
            ys = [100 * r["metrics"][method][key] if method in r["metrics"] else np.nan for r in rounds]
            ax.plot(range(len(names)), ys, marker="o", label=method)
    for ax, title in zip(axes, ("FPR95 % (lower is better)", "AUROC % (higher is better)"), strict=True):
        ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    return _save(fig, path)


def histogram_view(arrays: Mapping[str, np.ndarray], n_bins: int = 40) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """Values, bin edges and x label that show the separation of one method's score histograms.

    Probability-like scores crowd just below 1 (NegLabel, SynOOD): on a linear axis every set falls
    into the last bin. They are shown as ``-log10(1 - score)`` (monotone: higher is still more ID).
    Bins span the 0.5-99.5 percentiles so that a few outliers do not squash the rest.
    """
    allv = np.concatenate(list(arrays.values())) if arrays else np.zeros(0)
    label = "score (higher = more ID)"
    if allv.size and allv.min() >= 0.0 and allv.max() <= 1.0 and np.median(allv) > 0.9:
        arrays = {k: -np.log10(np.clip(1.0 - v, 1e-12, None)) for k, v in arrays.items()}
        allv = np.concatenate(list(arrays.values()))
        label = "-log10(1 - score) (higher = more ID)"
    if not allv.size:
        return dict(arrays), np.linspace(0.0, 1.0, n_bins + 1), label
    lo, hi = np.percentile(allv, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(allv.min()), float(allv.max())
    hi = hi if hi > lo else lo + 1.0
    clipped = {k: np.clip(v, lo, hi) for k, v in arrays.items()}
    return clipped, np.linspace(lo, hi, n_bins + 1), label


def plot_score_histograms(scores: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """One panel per method overlaying score histograms; ``scores[method] = {"id": arr, set: arr}``."""
    methods = list(scores)
    n = max(1, len(methods))
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = _new_figure(4.0 * cols, 3.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, method in zip(axes, methods, strict=False):
        arrays = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in scores[method].items()}
        arrays = {k: v[np.isfinite(v)] for k, v in arrays.items() if v.size}
        xlabel = "score (higher = more ID)"
        if arrays:
            shown, bins, xlabel = histogram_view(arrays)
            for name, v in shown.items():
                ax.hist(v, bins=bins, density=True, alpha=0.45 if name != "id" else 0.6, label=str(name))
            ax.legend(fontsize=7)
        ax.set(title=str(method), xlabel=xlabel, ylabel="density")
    for ax in axes[len(methods) :]:
        ax.axis("off")
    if not methods:
        axes[0].text(0.5, 0.5, "no scores", ha="center", va="center")
    return _save(fig, path)


def image_grid(
    images: Sequence[Any], captions: Sequence[str], path: str | os.PathLike, cols: int = 8
) -> Path:
    """A grid of PIL images with a (wrapped) caption under each; ``captions`` pairs with ``images``."""
    if len(captions) != len(images):
        raise ValueError(f"image_grid: {len(images)} images but {len(captions)} captions")
    n = len(images)
    cols = max(1, min(int(cols), max(n, 1)))
    rows = max(1, math.ceil(n / cols))
    fig = _new_figure(1.8 * cols, 2.2 * rows)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i < n:
            ax.imshow(np.asarray(images[i].convert("RGB")))
            ax.set_title("\n".join(textwrap.wrap(str(captions[i]), 22)[:3]), fontsize=6)
    if n == 0:
        axes[0].text(0.5, 0.5, "no images", ha="center", va="center")
    return _save(fig, path)

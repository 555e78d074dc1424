"""World benchmark (issue 20): every method and its controls on the world's evaluation OOD sets,
FPR95 / AUROC / AUPR-In as mean ± std over seeds, in one command.

    make world-bench                                   # seeds 0 1 2, every variant
    .venv/bin/python benchmarks/world_bench.py --seeds 0 --variants base lr0

Each seed has its own output root under ``--out``, shared by its variants, so content addressing
reuses what a variant does not change (``finetune.*`` variants rerun finetune only, ``generate.*``
ones generate, elaborate and finetune; a second invocation reuses everything). The seed changes
the world's rendered data and split, generation and training; the world models are the shipped ones.
Writes ``<out>/world_bench.json``, ``<out>/world_bench.md`` (the table) and ``<out>/world_bench.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (what it controls, overrides on the world preset, the rows it reports)
SYNTHETIC_ROWS = ["synood", "mm_ood", "multi_os"]
VARIANTS: dict[str, tuple[str, dict, list[str] | None]] = {
    # base also reports the training sets by kind (the preset's finetune.kind_sets: synood[boundary],
    # synood[t2i] = far + near, synood[both]), trained in its one finetune run
    "base": ("the world preset as shipped (every method, and SynOOD per training set by kind)", {}, None),
    "lr0": ("SynOOD without the energy-gradient step (lr 0: plain inpainting)", {"generate.lr": 0.0}, SYNTHETIC_ROWS),
    "noise": ("SynOOD trained on noise images in place of generated ones (1 per boundary source)",
              {"generate.noise_per_source": 1, "finetune.synthetic_kinds": ["noise"]}, SYNTHETIC_ROWS),
    "filters_off": ("elaborate's CLIP filters off (ID confidence, dedup; unclear answers kept)",
                    {"elaborate.max_id_confidence": 1.0, "elaborate.dedup_cosine": 1.0, "elaborate.unclear": "keep"},
                    ["mm_ood", "synood", "multi_os"]),
    "mllm_filter_off": ("elaborate's MLLM filter off (its id_visible verdicts recorded, not applied)",
                        {"elaborate.mllm_filter": False}, ["mm_ood", "synood", "multi_os"]),
    "all_filters_off": ("elaborate's MLLM and CLIP filters off (every generated image trains)",
                        {"elaborate.mllm_filter": False, "elaborate.max_id_confidence": 1.0,
                         "elaborate.dedup_cosine": 1.0}, ["mm_ood", "synood", "multi_os"]),
    "mos_stand_in": ("Multi-OS on the former stand-in (SynOOD's images, nearest outlier label), not its own pairs",
                     {"finetune.multi_os_data": "boundary_nearest"}, ["multi_os"]),
    "sources_1x": ("SynOOD with 2 boundary sources per class", {"sketch.sources_per_class": 2}, SYNTHETIC_ROWS),
    "sources_4x": ("SynOOD with 8 boundary sources per class (= base)", {"sketch.sources_per_class": 8},
                   SYNTHETIC_ROWS),
    "sources_15x": ("SynOOD with 30 boundary sources per class (every train image)", {"sketch.sources_per_class": 30},
                    SYNTHETIC_ROWS),
}  # fmt: skip
# the controls, the sweep and the rounds compare the main SynOOD row: the sets by kind are base's
NO_KIND_SETS = {"finetune.kind_sets": {}}
METRICS = ("fpr95", "auroc", "aupr_in")
# --sweep: one setting at a time around the preset, scored on the validation OOD split only
# (world-val: the leakage filter and every score see it, no evaluation set does)
VAL_SETS = ["world-val"]
SWEEPS: dict[str, list] = {
    "finetune.epochs": [1, 3, 10, 30],
    "finetune.lr": [1e-4, 1e-3, 1e-2],
    "finetune.text_epochs": [0, 5, 20],
    "generate.lr": [0.0, 10.0, 30.0],
    # the released text side's softmax runs over the used negatives only: one used negative = no signal
    "finetune.synood_text": ["released", "joint"],
}
SWEEP_ROWS = ("synood", "neglabel", "mcm")


def run_variant(seed: int, name: str, out: Path, log) -> dict:
    """One variant of one seed: its finetune summary (metrics per method and set) and wall time."""
    from ood_core.config import load_config
    from ood_core.pipeline import run_local

    _, overrides, _ = VARIANTS[name]
    cfg = load_config("world", {"seed": seed, **({} if name == "base" else NO_KIND_SETS), **overrides})
    t0 = time.perf_counter()
    results = run_local(cfg, str(out / f"seed{seed}"), log=log)
    summary = results["finetune"]["summary"]
    elaborate = results["elaborate"]["counts"]
    return {"seed": seed, "variant": name, "seconds": round(time.perf_counter() - t0, 1),
            "metrics": summary["metrics"], "train_samples": summary["train"]["samples"],
            "synthetic_samples": summary["train"].get("synthetic"),
            # finetune.kind_sets (base): per set its kinds, synthetic count, trained or skipped (why)
            "kind_sets": summary["train"].get("kind_sets", {}),
            "elaborate_counts": elaborate}  # fmt: skip


def aggregate(runs: list[dict]) -> dict:
    """``{variant: {method: {set: {metric: (mean, std, n)}}}}`` over the seeds present."""
    out: dict = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rows = VARIANTS[variant][2]
        per = [r for r in runs if r["variant"] == variant]
        methods = rows or list(per[0]["metrics"])
        for method in methods:
            for s in per[0]["metrics"].get(method, {}):
                for m in METRICS:
                    vals = [r["metrics"][method][s][m] for r in per if method in r["metrics"]]
                    out.setdefault(variant, {}).setdefault(method, {}).setdefault(s, {})[m] = (
                        float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals))
    return out


def table(agg: dict) -> str:
    """Markdown: one row per (variant, method); FPR95 / AUROC / AUPR-In mean ± std in % per set."""
    sets = [s for s in next(iter(next(iter(agg.values())).values())) if s != "average"] + ["average"]
    head = ["variant", "method", "n"] + [f"{s} {m}" for s in sets for m in ("FPR95↓", "AUROC↑", "AUPR↑")]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for variant, methods in agg.items():
        for method, per_set in methods.items():
            n = next(iter(per_set.values()))["fpr95"][2]
            cells = [f"{100 * per_set[s][m][0]:.1f} ± {100 * per_set[s][m][1]:.1f}" if s in per_set else "–"
                     for s in sets for m in METRICS]  # fmt: skip
            lines.append("| " + " | ".join([variant, method, str(n), *cells]) + " |")
    return "\n".join(lines) + "\n"


def compact_table(agg: dict, runs: list[dict]) -> str:
    """Markdown: averages over the evaluation sets plus near-OOD AUROC, and the synthetic training set size."""
    lines = ["| variant | method | seeds | FPR95↓ (avg) | AUROC↑ (avg) | AUPR↑ (avg) | AUROC↑ world-near | synthetic train images |",
             "|:---|:---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for variant, methods in agg.items():
        per = [r for r in runs if r["variant"] == variant]
        for method, per_set in methods.items():
            samples = [synthetic_count(r, method) for r in per]
            size = f"{np.mean([n for n in samples if n]):.0f}" if any(samples) else "–"
            avg, near = per_set["average"], per_set.get("world-near")
            cell = lambda v: f"{100 * v[0]:.1f} ± {100 * v[1]:.1f}"  # noqa: E731
            lines.append(f"| {variant} | {method} | {avg['fpr95'][2]} | {cell(avg['fpr95'])} | {cell(avg['auroc'])} | "
                         f"{cell(avg['aupr_in'])} | {cell(near['auroc']) if near else '–'} | {size} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def synthetic_count(run: dict, method: str) -> int | None:
    """The synthetic images ``method``'s adapter trained on in ``run``: a ``synood[set]`` row's own set's."""
    if method.startswith("synood[") and method.endswith("]"):
        return run.get("kind_sets", {}).get(method[len("synood["):-1], {}).get("synthetic")
    return run.get("synthetic_samples")


def skipped_sets(runs: list[dict]) -> str:
    """Markdown lines naming the training sets by kind that a run skipped, and why (none: empty)."""
    lines = [f"- seed {r['seed']} {r['variant']}: `synood[{name}]` skipped: {s['reason']}"
             for r in runs for name, s in r.get("kind_sets", {}).items() if s["status"] == "skipped"]
    return "\nTraining sets by kind left out:\n\n" + "\n".join(lines) + "\n" if lines else ""


def plot(agg: dict, path: Path) -> None:
    """Average FPR95 and AUROC per (variant, method), error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, fpr, fpr_sd, auroc, auroc_sd = [], [], [], [], []
    for variant, methods in agg.items():
        for method, per_set in methods.items():
            labels.append(f"{method}" if variant == "base" else f"{method} [{variant}]")
            (f, fs, _), (a, as_, _) = per_set["average"]["fpr95"], per_set["average"]["auroc"]
            fpr.append(100 * f), fpr_sd.append(100 * fs), auroc.append(100 * a), auroc_sd.append(100 * as_)
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.32 * len(labels) + 1.5), sharey=True)
    y = np.arange(len(labels))
    axes[0].barh(y, fpr, xerr=fpr_sd, color="tab:red", alpha=0.7)
    axes[0].set_xlabel("FPR95 % (lower is better), average of the evaluation sets")
    axes[1].barh(y, auroc, xerr=auroc_sd, color="tab:blue", alpha=0.7)
    axes[1].set_xlabel("AUROC % (higher is better)")
    axes[1].set_xlim(max(0.0, min(auroc) - 5), 100)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_rounds(seed: int, n_rounds: int, out: Path, log) -> dict:
    """Nightly rounds, open loop (frozen CLIP guides the noise) vs closed loop (the previous round's
    detector does), each training on every round so far; ``{loop: [per-round metrics]}``."""
    from ood_core.config import load_config
    from ood_core.pipeline import run_local
    from ood_core.rounds import round_metrics

    curves = {}
    for loop, scorer in (("open", "frozen"), ("closed", "latest_round")):
        root = out / f"rounds-{loop}-seed{seed}"
        for i in range(1, n_rounds + 1):
            cfg = load_config("world", {"seed": seed, "generate.round": f"night{i}", "generate.scorer": scorer,
                                        "finetune.rounds_window": n_rounds, **NO_KIND_SETS})  # fmt: skip
            run_local(cfg, str(root), log=log)
        curves[loop] = round_metrics(str(root))
    return curves


def rounds_table(curves_by_seed: dict[int, dict]) -> str:
    """Markdown: SynOOD and MCM average FPR95 / AUROC per round, open vs closed loop, mean ± std."""
    loops = next(iter(curves_by_seed.values()))
    n = len(next(iter(loops.values())))
    lines = ["| round | " + " | ".join(f"{loop} loop synood FPR95↓ | {loop} loop synood AUROC↑" for loop in loops) + " |",
             "|---:|" + "---:|" * (2 * len(loops))]  # fmt: skip
    for i in range(n):
        cells = []
        for loop in loops:
            for k in ("fpr95", "auroc"):
                v = [100 * c[loop][i]["metrics"]["synood"][k] for c in curves_by_seed.values()]
                cells.append(f"{np.mean(v):.1f} ± {np.std(v, ddof=1) if len(v) > 1 else 0.0:.1f}")
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(seed: int, out: Path, log) -> list[dict]:
    """Every value of every :data:`SWEEPS` axis on ``world-val``: ``[{axis, value, seed, metrics}]``,
    metrics of :data:`SWEEP_ROWS` on the validation split (the preset's value of an axis included)."""
    from ood_core.config import load_config
    from ood_core.pipeline import run_local

    rows = []
    for axis, values in SWEEPS.items():
        for value in values:
            cfg = load_config("world", {"seed": seed, "data.ood_sets": VAL_SETS, **NO_KIND_SETS, axis: value})
            summary = run_local(cfg, str(out / f"val-seed{seed}"), log=log)["finetune"]["summary"]
            rows.append({"axis": axis, "value": value, "seed": seed,
                         "metrics": {m: summary["metrics"][m]["average"] for m in SWEEP_ROWS}})
            # one line per finished setting: a long sweep that is stopped keeps what it measured
            with open(out / "world_sweep.partial.jsonl", "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
    return rows


def _fmt_value(v) -> str:
    return f"{v:g}" if isinstance(v, int | float) else str(v)


def sweep_summary(rows: list[dict]) -> tuple[str, dict]:
    """Markdown (per axis and value: each row's val FPR95 / AUROC, mean ± std over seeds) and the value
    of each axis with SynOOD's lowest mean val FPR95 (ties: higher AUROC)."""
    lines = ["| setting | value | " + " | ".join(f"{m} FPR95↓ | {m} AUROC↑" for m in SWEEP_ROWS) + " |",
             "|:---|---:|" + "---:|" * (2 * len(SWEEP_ROWS))]  # fmt: skip
    best: dict = {}
    for axis, values in SWEEPS.items():
        for value in values:
            per = [r["metrics"] for r in rows if r["axis"] == axis and r["value"] == value]
            if not per:
                continue
            cells, stat = [], {}
            for m in SWEEP_ROWS:
                for k in ("fpr95", "auroc"):
                    v = 100 * np.array([p[m][k] for p in per])
                    stat[(m, k)] = v.mean()
                    cells.append(f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}")
            lines.append(f"| {axis} | {_fmt_value(value)} | " + " | ".join(cells) + " |")
            score = (stat[("synood", "fpr95")], -stat[("synood", "auroc")])
            if axis not in best or score < best[axis][1]:
                best[axis] = (value, score)
    return "\n".join(lines) + "\n", {a: v for a, (v, _) in best.items()}


def plot_sweep(rows: list[dict], path: Path) -> None:
    """One panel per setting: val FPR95 of each row against the value, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SWEEPS), figsize=(4 * len(SWEEPS), 3.2), sharey=True)
    for ax, (axis, values) in zip(np.atleast_1d(axes), SWEEPS.items(), strict=True):
        for m in SWEEP_ROWS:
            v = [[100 * r["metrics"][m]["fpr95"] for r in rows if r["axis"] == axis and r["value"] == x]
                 for x in values]
            ax.errorbar(range(len(values)), [np.mean(x) for x in v], yerr=[np.std(x) for x in v], marker="o",
                        capsize=3, label=m)
        ax.set_xticks(range(len(values)), [_fmt_value(x) for x in values])
        ax.set_xlabel(axis)
    np.atleast_1d(axes)[0].set_ylabel("FPR95 % on world-val (lower is better)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--out", default=str(ROOT / "runs" / "world-bench"))
    p.add_argument("--quiet", action="store_true", help="only one line per variant")
    p.add_argument("--rounds", type=int, default=0, help="instead: N nightly rounds, open vs closed loop")
    p.add_argument("--sweep", action="store_true", help="instead: one setting at a time, on world-val only")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        t0 = time.perf_counter()
        (out / "world_sweep.partial.jsonl").unlink(missing_ok=True)  # this sweep's lines only
        rows = [r for s in args.seeds for r in run_sweep(s, out, (lambda m: None) if args.quiet else print)]
        md, best = sweep_summary(rows)
        md = (f"`benchmarks/world_bench.py --sweep --seeds {' '.join(map(str, args.seeds))}` "
              f"({(time.perf_counter() - t0) / 60:.1f} min)\n\n" + md
              + "\nSynOOD's best value per setting on world-val: " + json.dumps(best) + "\n")  # fmt: skip
        (out / "world_sweep.json").write_text(json.dumps({"rows": rows, "best": best}, indent=1))
        (out / "world_sweep.md").write_text(md)
        plot_sweep(rows, out / "world_sweep.png")
        print(md)
        return 0
    if args.rounds:
        t0 = time.perf_counter()
        curves = {s: run_rounds(s, args.rounds, out, (lambda m: None) if args.quiet else print) for s in args.seeds}
        md = (f"`benchmarks/world_bench.py --rounds {args.rounds} --seeds {' '.join(map(str, args.seeds))}` "
              f"({(time.perf_counter() - t0) / 60:.1f} min)\n\n" + rounds_table(curves))  # fmt: skip
        (out / "world_rounds.json").write_text(json.dumps(curves, indent=1))
        (out / "world_rounds.md").write_text(md)
        print(md)
        return 0
    runs, t0 = [], time.perf_counter()
    for seed in args.seeds:
        for name in args.variants:
            print(f"[world-bench] seed {seed} {name}: {VARIANTS[name][0]}", flush=True)
            r = run_variant(seed, name, out, (lambda m: None) if args.quiet else print)
            avg = r["metrics"].get("synood", {}).get("average", {})
            print(f"[world-bench] seed {seed} {name}: {r['seconds']} s, synood FPR95 {100 * avg.get('fpr95', np.nan):.1f} "
                  f"AUROC {100 * avg.get('auroc', np.nan):.1f}, {r['train_samples']} training samples", flush=True)  # fmt: skip
            runs.append(r)
    agg = aggregate(runs)
    wall = time.perf_counter() - t0
    md = (f"`benchmarks/world_bench.py --seeds {' '.join(map(str, args.seeds))}` "
          f"({len(runs)} runs, {wall / 60:.1f} min)\n\n" + compact_table(agg, runs) + skipped_sets(runs)
          + "\nPer evaluation set:\n\n"
          + table(agg))  # fmt: skip
    (out / "world_bench.json").write_text(json.dumps({"runs": runs, "aggregate": agg, "wall_s": wall}, indent=1))
    (out / "world_bench.md").write_text(md)
    plot(agg, out / "world_bench.png")
    print(md)
    print(f"[world-bench] {out / 'world_bench.md'}, {out / 'world_bench.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

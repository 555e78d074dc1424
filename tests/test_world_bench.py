"""The world benchmark's bookkeeping (the runs themselves are `make world-bench`, not a test)."""

from __future__ import annotations

import pytest

from benchmarks.world_bench import VARIANTS, aggregate, compact_table, table


def _run(seed, variant, auroc):
    m = {"fpr95": 1 - auroc, "auroc": auroc, "aupr_in": auroc}
    methods = ["mcm", "synood"] if variant == "base" else ["synood", "mm_ood", "multi_os"]
    return {"seed": seed, "variant": variant,
            "metrics": {k: {"world-near": m, "average": m} for k in methods}}  # fmt: skip


def test_mean_and_sample_std_over_seeds_per_variant_and_method():
    runs = [_run(0, "base", 0.8), _run(1, "base", 0.9), _run(0, "lr0", 0.7), _run(1, "lr0", 0.5)]
    agg = aggregate(runs)
    mean, std, n = agg["base"]["synood"]["world-near"]["auroc"]
    assert (mean, n) == (pytest.approx(0.85), 2) and std == pytest.approx(0.0707107, rel=1e-5)
    assert set(agg["base"]) == {"mcm", "synood"}  # base reports every method
    assert set(agg["lr0"]) == set(VARIANTS["lr0"][2])  # a control reports the rows it controls
    md = table(agg)
    assert "| lr0 | synood | 2 | 40.0 ± 14.1 | 60.0 ± 14.1 |" in md
    compact = compact_table(agg, [{**r, "synthetic_samples": 10} for r in runs])
    assert "| lr0 | synood | 2 | 40.0 ± 14.1 | 60.0 ± 14.1 | 60.0 ± 14.1 | 60.0 ± 14.1 | 10 |" in compact


def test_sweep_picks_the_value_with_synood_s_lowest_validation_fpr(monkeypatch):
    import benchmarks.world_bench as wb

    monkeypatch.setattr(wb, "SWEEPS", {"finetune.epochs": [1, 3]})

    def r(value, seed, fpr):
        m = {"fpr95": fpr, "auroc": 1 - fpr}
        return {"axis": "finetune.epochs", "value": value, "seed": seed,
                "metrics": {"synood": m, "neglabel": {"fpr95": 0.5, "auroc": 0.5}, "mcm": {"fpr95": 0.5, "auroc": 0.5}}}

    rows = [r(1, 0, 0.30), r(1, 1, 0.10), r(3, 0, 0.25), r(3, 1, 0.20)]  # means 0.20 vs 0.225
    md, best = wb.sweep_summary(rows)
    assert best == {"finetune.epochs": 1}
    assert "| finetune.epochs | 1 | 20.0 ± 14.1 | 80.0 ± 14.1 | 50.0 ± 0.0 |" in md


def test_kind_set_rows_come_from_base_with_their_own_training_set_sizes():
    from benchmarks.world_bench import skipped_sets

    m = {"fpr95": 0.2, "auroc": 0.9, "aupr_in": 0.9}
    sets = {"boundary": {"status": "trained", "synthetic": 40}, "t2i": {"status": "trained", "synthetic": 15},
            "both": {"status": "skipped", "reason": "no kept synthetic image of kind near"}}
    runs = [{"seed": s, "variant": "base", "synthetic_samples": 40, "kind_sets": sets,
             "metrics": {k: {"world-near": m, "average": m} for k in ("synood", "synood[boundary]", "synood[t2i]")}}
            for s in (0, 1)]
    agg = aggregate(runs)
    assert set(agg["base"]) == {"synood", "synood[boundary]", "synood[t2i]"}
    compact = compact_table(agg, runs)
    assert "| base | synood[t2i] | 2 | 20.0 ± 0.0 | 90.0 ± 0.0 | 90.0 ± 0.0 | 90.0 ± 0.0 | 15 |" in compact
    assert "| base | synood[boundary] | 2 | 20.0 ± 0.0 | 90.0 ± 0.0 | 90.0 ± 0.0 | 90.0 ± 0.0 | 40 |" in compact
    note = skipped_sets(runs)
    assert "`synood[both]` skipped: no kept synthetic image of kind near" in note and "synood[t2i]" not in note

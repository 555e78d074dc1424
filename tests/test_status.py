"""`status` keeps a run history; a changed setting is named when an upstream stage is missing."""

from __future__ import annotations

import pytest

from flows.cli import main
from ood_core.config import load_config
from ood_core.pipeline import StageNotReady, resolve_keys, run_local
from ood_core.stages.sketch import SketchStage


def test_failed_run_does_not_hide_finished_stages_and_the_changed_setting_is_named(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    good = load_config("tiny", {"models.cache_dir": str(tmp_path / "m")})
    run_local(good, out, only=["sketch"], log=lambda m: None)
    changed = load_config("tiny", {"models.cache_dir": str(tmp_path / "m"), "sketch.far_labels": "5"})

    def boom(self, ctx, shard):
        raise RuntimeError("GPU fell over")

    monkeypatch.setattr(SketchStage, "run_shard", boom)
    with pytest.raises(RuntimeError, match="GPU fell over"):
        run_local(changed, out, only=["sketch"], log=lambda m: None)
    monkeypatch.undo()

    capsys.readouterr()
    assert main(["status", out]) == 0
    text = capsys.readouterr().out
    sketch_line = next(ln for ln in text.splitlines() if ln.strip().startswith("sketch"))
    assert "partial" in sketch_line and resolve_keys(changed)["sketch"] in sketch_line
    assert f"last complete: {resolve_keys(good)['sketch']}" in text
    assert "run history (2 run(s)" in text and "complete: sketch" in text

    with pytest.raises(StageNotReady) as err:
        run_local(changed, out, only=["generate"], log=lambda m: None)
    msg = str(err.value)
    assert "'generate' needs 'sketch'" in msg and "sketch.far_labels (20 -> 5)" in msg
    assert resolve_keys(good)["sketch"] in msg and "include 'sketch' in --only" in msg

"""A failed shard or sample is named in the log: stage, shard index, sample keys and their errors."""

from __future__ import annotations

import pytest

from ood_core.config import load_config
from ood_core.pipeline import make_context, plan_stage, resolve_keys, run_shard, shard_failure
from ood_core.stages.base import ShardOutput, row
from ood_core.stages.sketch import SketchStage


@pytest.fixture
def sketch(tmp_path):
    cfg = load_config("tiny", {"models.cache_dir": str(tmp_path / "models")})
    keys = resolve_keys(cfg)
    lines: list[str] = []
    ctx = make_context(cfg, str(tmp_path / "run"), "sketch", keys, lines.append)
    plan_stage(ctx, "sketch", keys)  # no model loads: planning only lists classes
    return cfg, keys, ctx, lines


def test_failed_samples_are_named_with_their_errors(sketch, monkeypatch):
    _, _, ctx, lines = sketch

    def two_fail(self, ctx, shard):
        return ShardOutput(rows=[
            row("far-0", "kept", "ok", kind="far", text="volcano"),
            row("far-1", "failed", "mllm_error", "HTTP 500 from the endpoint", kind="far"),
            row("far-2", "failed", "mllm_error", "timed out after 60 s", kind="far"),
        ])

    monkeypatch.setattr(SketchStage, "run_shard", two_fail)
    stats = run_shard(ctx, "sketch", 0)
    assert stats["counts"]["failed"] == {"mllm_error": 2}
    [line] = [ln for ln in lines if "failed" in ln]
    assert line.startswith("[sketch] shard 0: 2 sample(s) failed")
    assert "far-1 (mllm_error): HTTP 500 from the endpoint" in line and "far-2 (mllm_error): timed out" in line
    assert "far-0" not in line


def test_a_raising_shard_keeps_its_exception_and_is_named_in_the_prefect_log(sketch, monkeypatch):
    import tasks.stage_tasks as stage_tasks

    cfg, keys, ctx, _ = sketch

    def boom(self, ctx, shard):
        raise MemoryError("CUDA out of memory")

    monkeypatch.setattr(SketchStage, "run_shard", boom)
    with pytest.raises(MemoryError) as err:  # the type is kept: it decides Prefect's retries
        run_shard(ctx, "sketch", 1)
    note = shard_failure(err.value)
    assert note.startswith("sketch shard 1 (") and "failed on samples" in note
    assert "MemoryError: CUDA out of memory" in note
    assert not ctx.store.shard_done(1)

    # the Prefect task logs that note as an error (the task's own logger, not a run's, in this test)
    logged: list[tuple[str, str]] = []

    class Logger:
        def info(self, msg):
            logged.append(("info", msg))

        def error(self, msg):
            logged.append(("error", msg))

    monkeypatch.setattr(stage_tasks, "get_run_logger", lambda: Logger())
    with pytest.raises(MemoryError):
        stage_tasks.shard_task.fn("sketch", cfg.to_dict(), ctx.store.root, keys, 2, 4)
    errors = [m for level, m in logged if level == "error"]
    assert errors and errors[0].startswith("sketch shard 2 (") and "CUDA out of memory" in errors[0]

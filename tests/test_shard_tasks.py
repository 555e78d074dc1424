"""The flow's shard loop under real Prefect (local API): task runs for pending shards only (issue 17,
point 5: a task run costs API calls and state updates, a reused shard needs none)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("per_task", [1, 2])
def test_a_resumed_stage_creates_task_runs_for_its_pending_shards_only(tmp_path, one_row_stage, monkeypatch, per_task):
    from prefect import flow

    import flows.synth_ood as F
    from ood_core.config import load_config
    from ood_core.pipeline import make_context, plan_stage, run_shard
    from ood_core.storage import stage_key

    root, cfg = str(tmp_path / "run"), load_config("tiny")
    keys = {one_row_stage: stage_key(one_row_stage, 1, {}, {})}
    ctx = make_context(cfg, root, one_row_stage, keys, log=lambda m: None)
    assert plan_stage(ctx, one_row_stage, keys) == 6
    for i in (0, 1, 3):
        run_shard(ctx, one_row_stage, i)
    (Path(ctx.store.path("stats", "000001.json"))).unlink()  # a deleted marker: that shard runs again
    finished = {i: os.stat(ctx.store.shard_paths(i)["tar"]).st_mtime_ns for i in (0, 3)}

    ran: list = []  # the shards (per_task 1) or groups of shards (2) that got a task run
    name = "shard_task" if per_task == 1 else "shard_group_task"
    real = getattr(F, name)

    def recorded(stage, cfg, out, keys, shards, n_shards):
        ran.append(shards)
        return real(stage, cfg, out, keys, shards, n_shards)

    monkeypatch.setattr(F, name, recorded)

    @flow(name="shard-loop")
    def loop() -> None:
        F.run_stage_shards(one_row_stage, cfg.to_dict(), root, keys, 6, per_task)

    loop()
    # the shards 0 and 3 were reused without a task run
    assert ran == ([1, 2, 4, 5] if per_task == 1 else [[1, 2], [4, 5]])
    assert ctx.store.shard_indices() == list(range(6))
    assert {i: os.stat(ctx.store.shard_paths(i)["tar"]).st_mtime_ns for i in (0, 3)} == finished

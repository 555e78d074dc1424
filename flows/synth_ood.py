"""The top flow ``synth-ood``: sketch -> generate -> elaborate -> finetune."""

from __future__ import annotations

import time
from typing import Any

from flows.local_api import configure_local_api

configure_local_api()  # before Prefect reads its settings

from prefect import flow, tags  # noqa: E402

from ood_core.config import load_config  # noqa: E402
from tasks import finalize_task, plan_task, prepare_run_task, prune_rounds_task, shard_task  # noqa: E402


@flow(name="synth-ood", log_prints=True)
def synth_ood(
    preset: str = "tiny",
    out: str = "runs/tiny",
    only: list[str] | None = None,
    force: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    round: str = "",
    keep_last: int | None = None,
) -> dict[str, dict]:
    """Run (or resume) the pipeline; finished stages and shards are reused, never recomputed.

    ``round`` (``@date``: the scheduled run's UTC date) makes a new generation round while sketch is
    reused; ``keep_last`` then prunes all but the newest rounds' folders.
    """
    if round:
        from prefect.runtime import flow_run

        from ood_core.rounds import resolve_round

        overrides = {**(overrides or {}), "generate.round": resolve_round(round, flow_run.scheduled_start_time)}
    cfg = load_config(preset, overrides).to_dict()
    keys, stages, forced = prepare_run_task(cfg, out, only, force)
    results = {}
    for stage in stages:
        # tag per stage, so a concurrency limit can bound e.g. `stage-generate` on a GPU pool
        with tags("synth-ood", f"stage-{stage}"):
            started = time.time()
            n_shards = plan_task(stage, cfg, out, keys, force=stage in forced)
            for index in range(n_shards):
                shard_task(stage, cfg, out, keys, index, n_shards)
            results[stage] = finalize_task(stage, cfg, out, keys, n_shards, started)
    if keep_last and cfg["generate"]["round"]:
        prune_rounds_task(out, keep_last, cfg["generate"]["round"])
    return results

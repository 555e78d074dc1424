"""The top flow ``synth-ood``: sketch -> generate -> elaborate -> finetune."""

from __future__ import annotations

import time
from typing import Any

from flows.local_api import configure_local_api

configure_local_api()  # before Prefect reads its settings

from prefect import flow, tags  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402

from flows.fanout import FAN_OUT_STAGES, chunked, run_chunks  # noqa: E402
from ood_core.config import load_config  # noqa: E402
from ood_core.dataset_index import forget as forget_listings  # noqa: E402
from ood_core.pipeline import check_upstream_ready  # noqa: E402
from ood_core.rounds import check_keep_last  # noqa: E402
from tasks import (  # noqa: E402
    finalize_task,
    pending_shards_task,
    plan_task,
    preflight_task,
    prepare_run_task,
    prune_rounds_task,
    shard_group_task,
    shard_task,
    slot_check_task,
)


@flow(name="synth-ood", log_prints=True)
def synth_ood(
    preset: str = "tiny",
    out: str = "runs/tiny",
    only: list[str] | None = None,
    force: list[str] | None = None,
    overrides: dict[str, Any] | None = None,
    round: str = "",
    keep_last: int | None = None,
    fan_out: str | None = None,
    chunk_size: int = 8,
    max_in_flight: int = 8,
    stale_after: float = 600.0,
    shards_per_task: int = 1,
) -> dict[str, dict]:
    """Run (or resume) the pipeline; finished stages and shards are reused, never recomputed.

    ``round`` (``@date``: the scheduled run's UTC date) makes a new generation round while sketch is
    reused; ``keep_last`` then prunes all but the newest rounds' folders. ``fan_out`` names the
    ``synth-ood-shards`` deployment (e.g. ``synth-ood-shards/imagenet-shards``) that runs the GPU
    stages in chunks of ``chunk_size`` shards, at most ``max_in_flight`` chunk runs at a time; this
    flow then only plans and waits (no GPU). Without it every shard runs in this flow run.
    A chunk run that crashed, or sent no heartbeat for ``stale_after`` seconds (its worker was
    killed; 0 turns the check off), is submitted once more after a delay. ``shards_per_task`` > 1
    groups the pending shards of a stage that runs in place (not fanned out), that many per task run:
    a task run per shard costs about 0.02 s of Prefect's bookkeeping (BENCHMARKS.md), which counts
    only for shards of well under a second; a failure then retries the group, whose finished
    shards are reused.
    """
    if shards_per_task < 1:
        raise ValueError(f"shards_per_task must be at least 1 (got {shards_per_task})")
    if round:
        from prefect.runtime import flow_run

        from ood_core.rounds import resolve_round

        overrides = {**(overrides or {}), "generate.round": resolve_round(round, flow_run.scheduled_start_time)}
    if "{{" in out:
        raise ValueError(f"out is {out!r}: the deployment was registered without its output root set; deploy "
                         f"with deploy/deploy.sh (SYNTH_OOD_OUT / SYNTH_OOD_LOCAL_OUT) or pass -p out=<root>")  # fmt: skip
    config = load_config(preset, overrides)
    forget_listings()  # this run lists its data once (its first step), even in a long-lived process
    check_keep_last(config.finetune.rounds_window, keep_last)  # before any work, not at the end
    # `only` on missing upstream outputs fails now, naming the stage (not after preflight and retries)
    check_upstream_ready(config, out, only, force)
    cfg = config.to_dict()
    preflight_task(cfg, out)
    keys, stages, forced = prepare_run_task(cfg, out, only, force)
    results = {}
    for stage in stages:
        slot_check_task(stage)  # untagged: it must not wait on the limit it looks at
        # tag per stage, so a concurrency limit can bound e.g. `stage-generate` on a GPU pool
        with tags("synth-ood", f"stage-{stage}"):
            started = time.time()
            fanned = bool(fan_out) and stage in FAN_OUT_STAGES
            n_shards = plan_task(stage, cfg, out, keys, force=stage in forced, load_models=not fanned)
            if fanned:
                results[stage] = _fan_out_stage(
                    fan_out, stage, cfg, out, keys, n_shards, started, chunk_size, max_in_flight, stale_after
                )
                continue
            run_stage_shards(stage, cfg, out, keys, n_shards, shards_per_task)
            results[stage] = finalize_task(stage, cfg, out, keys, n_shards, started)
    if keep_last and cfg["generate"]["round"]:
        prune_rounds_task(out, keep_last, cfg["generate"]["round"])
    return results


def run_stage_shards(
    stage: str, cfg: dict, out: str, keys: dict[str, str], n_shards: int, shards_per_task: int = 1
) -> None:
    """A stage's pending shards in this flow run, one task run per ``shards_per_task`` of them;
    finished shards get none (a task run costs API calls and state updates: their reuse is decided
    by the one pending check)."""
    pending = pending_shards_task(stage, out, keys, n_shards)["pending"]
    # quoted: Prefect would walk the whole config looking for futures, for every task run
    if shards_per_task == 1:
        for index in pending:
            shard_task(stage, quote(cfg), out, quote(keys), index, n_shards)
        return
    for group in chunked(pending, shards_per_task):
        shard_group_task(stage, quote(cfg), out, quote(keys), group, n_shards)


def _fan_out_stage(
    deployment: str, stage: str, cfg: dict, out: str, keys: dict[str, str], n_shards: int, started: float,
    chunk_size: int, max_in_flight: int, stale_after: float = 0.0,
) -> dict:
    """Pending shards in chunks on the pool, then the stage-level step as one more run there."""
    from prefect import get_run_logger

    log = get_run_logger().info
    params = {"stage": stage, "cfg": cfg, "root": out, "keys": keys, "n_shards": n_shards}
    state = pending_shards_task(stage, out, keys, n_shards)
    if state["pending"]:
        run_chunks(deployment, stage, params, chunked(state["pending"], chunk_size), max_in_flight, log,
                   stale_seconds=stale_after or None)
        state = pending_shards_task(stage, out, keys, n_shards)
    if not state["complete"]:
        # training (finetune) needs the GPU: the stage-level step runs on the pool as well
        run_chunks(deployment, stage, {**params, "finalize_started": started}, [[]], 1, log,
                   stale_seconds=stale_after or None)
    # cheap when a chunk run finished the stage; publishes the stage's summary either way
    return finalize_task(stage, cfg, out, keys, n_shards, started)

"""``synth-ood-shards``: one chunk of one stage's shards, run by any worker of the GPU pool.

The parent flow (``synth-ood``) plans a stage, then starts its pending shards in chunks as runs of
this flow's deployment with ``run_deployment`` and waits for them: N workers share one stage.
A chunk is idempotent (a shard whose marker exists and checks is skipped; equal inputs give
equal bytes and the marker is written last), so a retried or duplicated chunk is harmless.
"""

from __future__ import annotations

import os
from contextlib import nullcontext

from flows.local_api import configure_local_api

configure_local_api()  # before Prefect reads its settings

from prefect import flow, tags  # noqa: E402
from prefect.utilities.annotations import quote  # noqa: E402

from tasks import finalize_task, shard_task  # noqa: E402


@flow(name="synth-ood-shards", log_prints=True, retries=1, retry_delay_seconds=30)
def synth_ood_shards(
    stage: str,
    cfg: dict,
    root: str,
    keys: dict[str, str],
    indices: list[int],
    n_shards: int,
    finalize_started: float | None = None,
) -> dict:
    """Run the shards ``indices`` of ``stage`` (and, with ``finalize_started``, its stage-level step)."""
    done = {}
    with gpu_slot(), tags("synth-ood", f"stage-{stage}", "chunk"):
        for index in indices:
            # quoted: Prefect would walk the whole config looking for futures, for every task run
            stats = shard_task(stage, quote(cfg), root, quote(keys), index, n_shards)
            done[index] = "reused" if stats["reused"] else "done"
        info = finalize_task(stage, cfg, root, keys, n_shards, finalize_started) if finalize_started else None
    return {"stage": stage, "shards": done, "finalized": info is not None}


GPU_LIMIT_ENV = "SYNTH_OOD_GPU_LIMIT"


def gpu_slot():
    """Hold one slot of the global concurrency limit named by ``$SYNTH_OOD_GPU_LIMIT`` (if set).

    Start each GPU's worker with its own name, e.g. ``SYNTH_OOD_GPU_LIMIT=gpu-node1-0`` next to
    ``CUDA_VISIBLE_DEVICES=0``, after ``prefect gcl create gpu-node1-0 --limit 1``: chunk runs on one
    GPU then run one at a time, counted by the server (a worker's ``--limit`` is counted by the
    worker). A chunk whose process is killed gives its slot back when its lease runs out.
    """
    name = os.environ.get(GPU_LIMIT_ENV)
    if not name:
        return nullcontext()
    from prefect.concurrency.sync import concurrency

    # strict: a missing limit is an error (a typo must not silently mean "unbounded")
    return concurrency(name, occupy=1, strict=True, lease_duration=300)

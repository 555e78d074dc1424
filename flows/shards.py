"""``synth-ood-shards``: one chunk of one stage's shards, run by any worker of the GPU pool.

The parent flow (``synth-ood``) plans a stage, then starts its pending shards in chunks as runs of
this flow's deployment with ``run_deployment`` and waits for them: N workers share one stage.
A chunk is idempotent (a shard whose marker exists and checks is skipped; equal inputs give
equal bytes and the marker is written last), so a retried or duplicated chunk is harmless.
"""

from __future__ import annotations

from flows.local_api import configure_local_api

configure_local_api()  # before Prefect reads its settings

from prefect import flow, tags  # noqa: E402

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
    with tags("synth-ood", f"stage-{stage}", "chunk"):
        for index in indices:
            stats = shard_task(stage, cfg, root, keys, index, n_shards)
            done[index] = "reused" if stats["reused"] else "done"
        info = finalize_task(stage, cfg, root, keys, n_shards, finalize_started) if finalize_started else None
    return {"stage": stage, "shards": done, "finalized": info is not None}

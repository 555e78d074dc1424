"""Fan a stage's pending shards out over the work pool as runs of the ``synth-ood-shards`` deployment.

Prefect is the scheduler: each chunk is a flow run that any worker of the pool picks up; the
parent only keeps at most ``max_in_flight`` chunk runs scheduled and waits for them to finish.
"""

from __future__ import annotations

import time

# the stages worth spreading over GPU workers (sketch is a few MLLM calls per class, run in place)
FAN_OUT_STAGES = ("generate", "elaborate", "finetune")


def chunked(indices: list[int], size: int) -> list[list[int]]:
    if size < 1:
        raise ValueError(f"chunk_size must be at least 1 (got {size})")
    return [indices[i : i + size] for i in range(0, len(indices), size)]


def run_chunks(
    deployment: str,
    stage: str,
    params: dict,
    chunks: list[list[int]],
    max_in_flight: int,
    log=print,
    poll_seconds: float = 2.0,
) -> dict[str, list[int]]:
    """Start each chunk of shard indices as a deployment run, ``max_in_flight`` at a time; wait.

    An empty chunk runs only the stage-level step (``params`` carries ``finalize_started``).
    Returns ``{flow_run_name: indices}``; raises naming every chunk that did not complete.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1 (got {max_in_flight})")
    queue = list(chunks)
    in_flight: dict = {}
    ran: dict[str, list[int]] = {}
    failed: list[str] = []
    with get_client(sync_client=True) as client:
        while queue or in_flight:
            while queue and len(in_flight) < max_in_flight:
                indices = queue.pop(0)
                name = f"{stage}-{indices[0]:06d}-{indices[-1]:06d}" if indices else f"{stage}-finalize"
                run = run_deployment(
                    deployment, parameters={**params, "indices": indices}, timeout=0,
                    flow_run_name=name, tags=["synth-ood", f"stage-{stage}", "chunk"],
                )
                in_flight[run.id] = (name, indices)
                log(f"{stage}: chunk {name} ({len(indices)} shards) -> flow run {run.id}")
            time.sleep(poll_seconds)
            for run_id, (name, indices) in list(in_flight.items()):
                state = client.read_flow_run(run_id).state
                if state is not None and state.is_final():
                    del in_flight[run_id]
                    ran[name] = indices
                    if not state.is_completed():
                        failed.append(f"{name}: {state.name}")
    if failed:
        raise RuntimeError(
            f"{stage}: {len(failed)} chunk run(s) did not complete: {'; '.join(failed)}. Finished shards "
            f"are kept; run the deployment again to finish the rest"
        )
    return ran

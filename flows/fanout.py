"""Fan a stage's pending shards out over the work pool as runs of the ``synth-ood-shards`` deployment.

Prefect is the scheduler: each chunk is a flow run that any worker of the pool picks up; the
parent only keeps at most ``max_in_flight`` chunk runs scheduled and waits for them to finish.
"""

from __future__ import annotations

import time

from tasks.prefect_api import api_call

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
    resubmits: int = 1,
    resubmit_delay: float = 10.0,
    stale_seconds: float | None = None,
    api_backoff: float = 1.0,
) -> dict[str, list[int]]:
    """Start each chunk of shard indices as a deployment run, ``max_in_flight`` at a time; wait.

    An empty chunk runs only the stage-level step (``params`` carries ``finalize_started``).
    A chunk run that crashed (its process or worker died: a flow's own ``retries`` never see it)
    is submitted again up to ``resubmits`` times, after ``resubmit_delay`` seconds doubled per
    attempt. With ``stale_seconds``, a chunk run still Running whose last Prefect heartbeat
    (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` in the chunk's environment) is older than that, or
    Pending for longer than that, is marked Crashed first, so a SIGKILLed worker never leaves this run waiting forever.
    Every API call is retried with backoff (``api_backoff`` seconds, doubled per attempt) on a
    transient error; one that keeps failing fails the run naming the call.
    Returns ``{flow_run_name: indices}``; raises naming every chunk that did not complete.
    """
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be at least 1 (got {max_in_flight})")
    if resubmits < 0:
        raise ValueError(f"resubmits must be 0 or more (got {resubmits})")
    # (indices, attempt, not before this time)
    queue: list[tuple[list[int], int, float]] = [(c, 0, 0.0) for c in chunks]
    # a create retried after a lost response must not start the chunk twice: one key per chunk name
    # and attempt of this (parent) flow run; a retry of the parent (a new run_count) starts new runs
    parent = _parent_run()
    in_flight: dict = {}
    ran: dict[str, list[int]] = {}
    failed: list[str] = []
    with get_client(sync_client=True) as client:
        while queue or in_flight:
            now = time.time()
            for item in [q for q in queue if q[2] <= now]:
                if len(in_flight) >= max_in_flight:
                    break
                queue.remove(item)
                indices, attempt, _ = item
                name = f"{stage}-{indices[0]:06d}-{indices[-1]:06d}" if indices else f"{stage}-finalize"
                if attempt:
                    name += f"-resubmit{attempt}"
                run = api_call(
                    f"creating chunk run {name} of deployment {deployment}", run_deployment,
                    deployment, parameters={**params, "indices": indices}, timeout=0, flow_run_name=name,
                    tags=["synth-ood", f"stage-{stage}", "chunk"],
                    idempotency_key=f"{parent}:{name}" if parent else None, log=log, backoff=api_backoff,
                )  # fmt: skip
                in_flight[run.id] = (name, indices, attempt)
                log(f"{stage}: chunk {name} ({len(indices)} shards) -> flow run {run.id}")
            time.sleep(poll_seconds)
            for run_id, (name, indices, attempt) in list(in_flight.items()):
                flow_run = api_call(f"reading the state of chunk run {name} ({run_id})", client.read_flow_run,
                                    run_id, log=log, backoff=api_backoff)  # fmt: skip
                state = flow_run.state
                if stale_seconds and state is not None and (state.is_running() or state.is_pending()):
                    quiet = _quiet_seconds(client, flow_run)
                    if quiet > stale_seconds:
                        log(f"{stage}: chunk {name} ({run_id}) sent no heartbeat for {quiet:.0f}s "
                            f"(> {stale_seconds:.0f}s; its worker died?): marking it Crashed")
                        state = api_call(f"marking chunk run {name} ({run_id}) Crashed", _mark_crashed, client,
                                         run_id, f"no heartbeat for {quiet:.0f}s; its worker died?", log=log,
                                         backoff=api_backoff)  # fmt: skip
                if state is None or not state.is_final():
                    continue
                del in_flight[run_id]
                ran[name] = indices
                if state.is_completed():
                    continue
                if state.is_crashed() and attempt < resubmits:
                    delay = resubmit_delay * 2**attempt
                    log(f"{stage}: chunk {name} crashed ({state.message or state.name}); submitting it "
                        f"again in {delay:.0f}s (attempt {attempt + 1} of {resubmits})")
                    queue.append((indices, attempt + 1, time.time() + delay))
                    continue
                failed.append(f"{name}: {state.name}")
    if failed:
        raise RuntimeError(
            f"{stage}: {len(failed)} chunk run(s) did not complete: {'; '.join(failed)}. Finished shards "
            f"are kept; run the deployment again to finish the rest"
        )
    return ran


def _parent_run() -> str | None:
    """``<flow run id>:<attempt>`` of the calling flow run, None outside one."""
    from prefect.runtime import flow_run

    return f"{flow_run.id}:{flow_run.run_count}" if flow_run.id else None


def _quiet_seconds(client, flow_run) -> float:
    """Seconds since the run last showed life: its last ``prefect.flow-run.heartbeat`` event (or its
    start, before the first) when Running; when Pending (a worker took it and died before starting
    it), since it became Pending."""
    from datetime import UTC, datetime

    if flow_run.state.is_pending():
        return (datetime.now(UTC) - flow_run.state.timestamp).total_seconds()
    started = flow_run.start_time or flow_run.state.timestamp
    body = {
        "filter": {
            "occurred": {"since": started.isoformat(), "until": datetime.now(UTC).isoformat()},
            "event": {"name": ["prefect.flow-run.heartbeat"]},
            "resource": {"id": [f"prefect.flow-run.{flow_run.id}"]},
            "order": "DESC",
        },
        "limit": 1,
    }
    last = started
    try:
        response = client.request("POST", "/events/filter", json=body)
        response.raise_for_status()
        events = response.json().get("events") or []
        if events:
            last = datetime.fromisoformat(events[0]["occurred"].replace("Z", "+00:00"))
    except Exception:  # noqa: BLE001 - an unanswered query never declares a run dead
        return 0.0
    return (datetime.now(UTC) - last).total_seconds()


def _mark_crashed(client, run_id, message: str):
    from prefect.states import Crashed

    client.set_flow_run_state(run_id, Crashed(message=message), force=True)
    return client.read_flow_run(run_id).state

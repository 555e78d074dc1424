"""Prefect's per-shard overhead: the same N trivial shards through the flow's shard loop and the plain loop.

    .venv/bin/python benchmarks/prefect_overhead.py --shards 200

A stage of ``--shards`` one-row shards (the work is a few bytes: what is left is bookkeeping) runs
in one process, side by side: the plain loop (``pipeline.run_shards``, what ``run_local`` runs)
and the flow's shard loop (``flows.synth_ood.run_stage_shards``, what ``synth_ood`` runs for a
stage that is not fanned out) as one Prefect flow run on the local API; each fresh (every shard
computed) and on a resume (every shard finished, the stage not: each is reused). The Prefect
figure is the flow run's wall time until the API has recorded every task run it ran in a final
state (the state events reach the server after the flow run returns); ``_flow_s`` and
``_recorded_s`` are its two parts. It includes the flow run's own start and end (``empty_flow_run_s``,
about 1 s, once per flow run), so the per-shard figure is an upper bound. ``--s3`` puts the stage folders on moto's S3 server (127.0.0.1) and counts the
requests each loop sends. Per-shard overhead
= (prefect - plain) / N. The local API's start-up is not counted (an empty flow run starts it first).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

_TMP = tempfile.mkdtemp(prefix="prefect-overhead-")
# before Prefect is imported: a throw-away home and result store, the ephemeral local API
os.environ.setdefault("PREFECT_HOME", os.path.join(_TMP, "home"))
os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", os.path.join(_TMP, "results"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "300")

STAGE = "overhead-bench"


def register_stage(n_shards: int) -> None:
    """A stage whose shards hold one row and one 5-byte sample each (registered in this process only)."""
    from ood_core.stages.base import STAGES, ShardOutput, ShardPlan, Stage, row
    from schemas import SKETCH

    class OverheadBench(Stage):
        name = STAGE
        schema = SKETCH

        def config_slice(self, cfg):
            return {"shards": n_shards}

        def plan(self, ctx):
            return [ShardPlan(i, [{"key": f"s{i:06d}"}]) for i in range(n_shards)]

        def run_shard(self, ctx, shard):
            out = ShardOutput()
            key = shard.items[0]["key"]
            out.add(row(key, "kept", "ok", kind="far", text=key), {"txt": b"hello"})
            return out

    STAGES.register(STAGE, OverheadBench)


def _keys(cfg) -> dict[str, str]:
    from ood_core.stages import STAGES
    from ood_core.storage import stage_key

    stage = STAGES.get(STAGE)()
    return {STAGE: stage_key(STAGE, stage.schema.version, stage.config_slice(cfg), {})}


# requests sent to S3 (with --s3): every s3fs request goes through S3FileSystem._call_s3
REQUESTS: list[str] = []


def count_s3_requests() -> None:
    import s3fs

    real = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        REQUESTS.append(method)
        return await real(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = counted


def _plain(cfg, root: str, keys: dict[str, str], n: int) -> tuple[float, int]:
    from ood_core.pipeline import make_context, plan_stage, run_shards

    ctx = make_context(cfg, root, STAGE, keys, log=lambda m: None)
    assert plan_stage(ctx, STAGE, keys) == n
    t0, r0 = time.perf_counter(), len(REQUESTS)
    run_shards(ctx, STAGE, n, log=lambda m: None)
    return time.perf_counter() - t0, len(REQUESTS) - r0


def _prefect(cfg, root: str, keys: dict[str, str], n: int, per_task: int = 1) -> tuple[float, int]:
    from prefect import flow

    from flows.synth_ood import run_stage_shards
    from ood_core.pipeline import make_context, plan_stage

    assert plan_stage(make_context(cfg, root, STAGE, keys, log=lambda m: None), STAGE, keys) == n

    @flow(name="prefect-overhead-bench")
    def bench() -> str:
        from prefect.runtime import flow_run

        # the keyword only when grouping: the code before `shards_per_task` runs the benchmark too
        run_stage_shards(STAGE, cfg.to_dict(), root, keys, n, **({"shards_per_task": per_task} if per_task > 1 else {}))
        return flow_run.id

    # the flow run until the API has recorded every task run it ran as final (the state events reach
    # the server after the flow run returns); its own start and end (an empty flow run's) included
    finished = _TaskRunsFinished()
    t0, r0 = time.perf_counter(), len(REQUESTS)
    with finished:
        run_id = bench()
    t_flow = time.perf_counter() - t0
    _wait_recorded(run_id, finished.count)
    total = time.perf_counter() - t0
    LAST["flow_s"], LAST["recorded_s"], LAST["task_runs"] = round(t_flow, 3), round(total - t_flow, 3), finished.count
    return total, len(REQUESTS) - r0


LAST: dict = {}  # the last Prefect measurement's parts


class _TaskRunsFinished(logging.Handler):
    """Counts the task runs that ended in this process (Prefect logs one line each)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Finished in state"):
            self.count += 1

    def __enter__(self):
        logging.getLogger("prefect.task_runs").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("prefect.task_runs").removeHandler(self)


def _wait_recorded(flow_run_id: str, task_runs: int, timeout: float = 600.0) -> None:
    """Until the API holds ``task_runs`` task runs of the flow run in a final state."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        TaskRunFilter,
        TaskRunFilterState,
        TaskRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    final = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while True:
            body = {
                "flow_runs": FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])).model_dump(mode="json"),
                "task_runs": TaskRunFilter(state=TaskRunFilterState(type=TaskRunFilterStateType(any_=final)))
                .model_dump(mode="json"),
            }  # fmt: skip
            response = client.request("POST", "/task_runs/count", json=body)
            response.raise_for_status()
            done = int(response.json())
            if done >= task_runs:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the API recorded {done} of {task_runs} task runs in {timeout:.0f}s")
            time.sleep(0.1)


def _empty_flow_s() -> float:
    from prefect import flow

    @flow(name="prefect-overhead-empty")
    def empty() -> None:
        return None

    t0 = time.perf_counter()
    empty()
    return time.perf_counter() - t0


def _count_done(root: str, keys: dict[str, str], n: int) -> int:
    from ood_core.pipeline import stage_store

    store = stage_store(root, STAGE, keys)
    assert not store.is_complete()
    return len(store.shard_indices())


def measure(n: int, workdir: str | None = None, s3: str | None = None, per_task: int = 1) -> dict:
    """Seconds of the plain and the Prefect shard loop, fresh and on a resume, in one process; with
    ``s3`` (an ``s3://`` root) the stage folders go there and the requests are counted too."""
    from ood_core.config import load_config

    register_stage(n)
    cfg = load_config("tiny")
    keys = _keys(cfg)
    _empty_flow_s()  # the local API's start-up and the first flow run's imports are not the shards' cost
    out: dict = {"shards": n, "shards_per_task": per_task, "empty_flow_run_s": round(_empty_flow_s(), 3)}
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        top = s3 or tmp
        _plain(cfg, f"{top}/warm-up", keys, n)  # first writes import and warm pyarrow's writers
        prefect = functools.partial(_prefect, per_task=per_task)
        for path, run in (("plain", _plain), ("prefect", prefect)):
            root = f"{top}/{path}"
            for kind in ("fresh", "resume", "resume2"):
                # resume twice: under Prefect the second may answer from its result cache instead
                seconds, requests = run(cfg, root, keys, n)
                out[f"{path}_{kind}_s"] = round(seconds, 3)
                if path == "prefect":  # of which: the flow run, then waiting for the API to record it
                    out.update({f"prefect_{kind}_{k}": v for k, v in LAST.items()})
                if s3:
                    out[f"{path}_{kind}_requests"] = requests
                if kind == "fresh":
                    assert _count_done(root, keys, n) == n
    for kind in ("fresh", "resume", "resume2"):
        extra = out[f"prefect_{kind}_s"] - out[f"plain_{kind}_s"]
        out[f"overhead_{kind}_per_shard_s"] = round(extra / n, 4)
        if out[f"plain_{kind}_s"] >= 0.05:  # a ratio to a few milliseconds says nothing
            out[f"ratio_{kind}"] = round(out[f"prefect_{kind}_s"] / out[f"plain_{kind}_s"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--workdir", default=None, help="where the stage folders go (default: the system's temp)")
    ap.add_argument("--shards-per-task", type=int, default=1, help="the flow's shards_per_task")
    ap.add_argument("--s3", action="store_true", help="stage folders on moto's S3 server on 127.0.0.1; count requests")
    args = ap.parse_args(argv)
    if args.s3:
        from benchmarks.moto_s3 import moto_s3

        count_s3_requests()
        with moto_s3("prefect-overhead") as bucket:
            result = measure(args.shards, args.workdir, bucket, args.shards_per_task)
    else:
        result = measure(args.shards, args.workdir, per_task=args.shards_per_task)
    print("prefect-overhead: " + ", ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prefect tasks for the pipeline steps.

Reuse goes through storage, never Prefect's result cache: the flow asks which shards are pending
(``pending_shards_task``: the stage's markers from one listing, one marker read per finished
shard) and creates task runs for those only; a shard task reuses a shard whose marker appeared
since (another run on the same root). So a new flow run reuses every finished shard and stage,
deleting a marker makes exactly that shard run again, and a shard task persists no result and
computes no cache key (either would cost requests per shard that repeat the marker check).
"""

from __future__ import annotations

import hashlib
import re

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from ood_core import secrets
from ood_core.config import validate_config
from ood_core.pipeline import (
    clear_forced_stage,
    finalize_stage,
    load_stage_models,
    make_context,
    plan_stage,
    resolve_keys,
    run_shard,
    selected_stages,
    shard_failure,
    shard_rate,
    stage_store,
    write_run_record,
)
from ood_core.publish import link_images


def _prefect_secret(name: str) -> str:
    """The value of the Prefect Secret block ``name`` (models.endpoint.api_key_secret)."""
    from prefect.blocks.system import Secret

    return Secret.load(name).get()


# ood_core never imports Prefect: it asks this resolver for named secrets
secrets.set_secret_resolver(_prefect_secret)


def _root_tag(root: str) -> str:
    return hashlib.sha256(root.encode()).hexdigest()[:8]


def _logger():
    log = get_run_logger()
    return lambda msg: log.info(secrets.scrub(msg))


@task(name="preflight", cache_policy=NO_CACHE)
def preflight_task(cfg: dict, root: str) -> list[str]:
    """Check data, OOD sets, model ids, endpoint and output root before any model is loaded."""
    from ood_core.preflight import preflight

    checks = preflight(validate_config(cfg), root)
    get_run_logger().info(f"preflight passed: {', '.join(checks)}")
    return checks


@task(name="prepare-run", cache_policy=NO_CACHE)
def prepare_run_task(
    cfg: dict, root: str, only: list[str] | None, force: list[str] | None
) -> tuple[dict[str, str], list[str], list[str]]:
    """Validate the config, compute every stage key, record the run; returns (keys, stages, forced)."""
    config = validate_config(cfg)
    run, forced = selected_stages(only, force)
    keys = resolve_keys(config, root)
    write_run_record(root, config, keys)
    if config.generate.round:
        from ood_core.rounds import record_round

        record_round(root, config.generate.round, keys)
    for name in run:
        get_run_logger().info(f"{name}: {stage_store(root, name, keys).url()}")
    return keys, run, sorted(forced)


@task(name="plan-stage", task_run_name="plan-{stage}", cache_policy=NO_CACHE, retries=1)
def plan_task(
    stage: str, cfg: dict, root: str, keys: dict[str, str], force: bool = False, load_models: bool = True
) -> int:
    """Freeze the stage's shard plan; ``force`` first deletes the stage folder (once per flow run:
    a retry of the run keeps what its first attempt recomputed). ``load_models=False`` where the
    shards run elsewhere (a fan-out parent has no GPU and runs no shard)."""
    from prefect.runtime import flow_run

    config = validate_config(cfg)
    store = stage_store(root, stage, keys)
    if force:
        if clear_forced_stage(store, flow_run.id):
            get_run_logger().info(f"{stage}: --force, removed {store.url()}")
        else:
            get_run_logger().info(f"{stage}: --force was applied by an earlier attempt of this run: its finished "
                                  f"shards are kept")  # fmt: skip
    ctx = make_context(config, root, stage, keys, _logger())
    n_shards = plan_stage(ctx, stage, keys)
    done = sum(i < n_shards for i in store.shard_indices())  # one listing, not a request per shard
    get_run_logger().info(f"{stage}: {n_shards} shards, {done} already done")
    if load_models:
        # the stage's models load here, at its start, so a bad id fails before any shard (the shard
        # tasks run in this process and reuse them)
        load_stage_models(ctx, stage)
    return n_shards


# Reuse is decided by the shard markers in storage (see the module docstring), so shard tasks
# neither cache nor persist results; a failed shard is retried twice.
_SHARD_TASK_OPTIONS = {"cache_policy": NO_CACHE, "persist_result": False, "retries": 2, "retry_delay_seconds": 5}


@task(name="run-shard", task_run_name="{stage}-shard-{index:06d}", **_SHARD_TASK_OPTIONS)
def shard_task(stage: str, cfg: dict, root: str, keys: dict[str, str], index: int, n_shards: int) -> dict:
    """Run one shard of one stage (reused when its stats marker exists and checks)."""
    ctx = make_context(validate_config(cfg), root, stage, keys, _logger())
    return _run_logged(ctx, stage, index, n_shards)


@task(name="run-shards", task_run_name="{stage}-shards-from-{indices[0]:06d}", **_SHARD_TASK_OPTIONS)
def shard_group_task(
    stage: str, cfg: dict, root: str, keys: dict[str, str], indices: list[int], n_shards: int
) -> dict[int, dict]:
    """Run several shards of one stage in one task run (``shards_per_task``: small shards, where a
    task run's own cost would count); a retry reuses the ones that finished."""
    ctx = make_context(validate_config(cfg), root, stage, keys, _logger())
    return {index: _run_logged(ctx, stage, index, n_shards) for index in indices}


def _run_logged(ctx, stage: str, index: int, n_shards: int) -> dict:
    """``run_shard``, one log line for it, and its failure named in the flow run's log."""
    try:
        stats = run_shard(ctx, stage, index)
    except Exception as exc:
        # the flow run's log names the stage, the shard and its samples (the traceback follows)
        get_run_logger().error(secrets.scrub(shard_failure(exc) or f"{stage} shard {index} failed: {exc}"))
        raise
    if stats["reused"]:  # a reused shard's marker holds no timing (timings are not content)
        verb = f"copied from {stats['copied_from']}" if "copied_from" in stats else "reused"
    else:
        verb = f"done in {stats['seconds']:.1f}s"
    get_run_logger().info(f"{stage} shard {index + 1}/{n_shards} {verb}: {stats['rows']} rows {stats['counts']}"
                          f"{shard_rate(stats)}")
    return stats


# never a cache hit: a complete stage returns its _SUCCESS.json at once, and a fully reused run
# must still publish its summary
@task(name="finalize-stage", task_run_name="finalize-{stage}", cache_policy=NO_CACHE)
def finalize_task(stage: str, cfg: dict, root: str, keys: dict[str, str], n_shards: int, started: float) -> dict:
    """The stage-level step (training, report), then ``_SUCCESS.json``; publishes the stage's summary."""
    config = validate_config(cfg)
    ctx = make_context(config, root, stage, keys, _logger())
    info = finalize_stage(ctx, stage, keys, n_shards, started)
    get_run_logger().info(f"{stage}: complete -> {ctx.store.url()} ({info['rows']} rows, {info['counts']})")
    _publish(stage, ctx.store, info)
    return info


def _publish(stage: str, store, info: dict) -> None:
    """The stage's counts (and, for finetune, the report) as a Prefect artifact."""
    from prefect.artifacts import create_markdown_artifact

    lines = [f"## {stage} `{info['key']}`", "", f"{store.url()}", "", "| status | reason | count |", "|---|---|---|"]
    for status, reasons in sorted(info["counts"].items()):
        lines += [f"| {status} | {reason} | {n} |" for reason, n in sorted(reasons.items())]
    t = info.get("timings") or {}
    if t:
        rate = info["rows"] / t["shard_seconds"] if t.get("shard_seconds") else 0.0
        lines += ["", f"{info['shards']} shards, {info['rows']} rows; shard time {t['shard_seconds']} s "
                  f"({rate:.2f} rows/s), stage-level step {t['finalize_seconds']} s, wall {t['wall_seconds']} s"]
    rates = (info.get("summary") or {}).get("throughput") or {}
    if rates:
        lines += ["", "| generator | images | seconds | images/s | s/image | batch (asked / used) |", "|---|---|---|---|---|---|"]
        lines += [f"| {g} | {t['images']} | {t['seconds']} | {t['images_per_s']} | {t['s_per_image']} | "
                  f"{t['batch_size']} / {t['batch_used']} |" for g, t in sorted(rates.items())]
    report = store.path("artifacts", "report.md")
    if store.exists(report):
        # the report's plots stay in the stage folder: the artifact links them (inlined, megabytes of
        # base64 would go into Prefect's database on every run)
        lines += ["", link_images(store.read_bytes(report).decode(), store.url() + "/artifacts")]
    create_markdown_artifact(secrets.scrub("\n".join(lines)), key=artifact_key(stage, store.root),
                             description=f"synth-ood {stage} stage, {store.url()}")  # fmt: skip


def artifact_key(stage: str, root: str) -> str:
    """``synth-ood-<stage>-<root's last folder>-<hash of the root>``: one artifact per stage and output
    root, so runs on different roots (or deployments) never overwrite each other's."""
    root = root.rstrip("/")
    tail = re.sub(r"[^a-z0-9-]+", "-", root.rsplit("/", 1)[-1].lower()).strip("-")[:24].strip("-")
    return "-".join(p for p in ("synth-ood", stage, tail, _root_tag(root)) if p)


@task(name="concurrency-slot", task_run_name="slot-{stage}", cache_policy=NO_CACHE)
def slot_check_task(stage: str) -> dict:
    """Before a stage's tagged tasks queue on the limit ``stage-<stage>`` (if one exists): release the
    slots held by task runs that ended or whose flow run ended (killed, crashed, cancelled), and if
    the limit is still full, log the wait with the limit's name, its holders and what to do.

    Returns ``{"limit": tag, "released": [holders], "waiting_on": [holders]}`` (``{}`` without a limit).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    from tasks.prefect_api import api_call

    tag, log = f"stage-{stage}", get_run_logger()
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_concurrency_limit_by_tag(tag)
        except ObjectNotFound:
            return {}
        live, ended = [], []
        for holder in limit.active_slots:
            try:
                run = api_call(f"reading task run {holder} (holder of a slot of '{tag}')", client.read_task_run, holder)
            except RuntimeError:
                live.append(f"task run {holder}")  # unknown is not dead: never free a slot on a guess
                continue
            flow_state = client.read_flow_run(run.flow_run_id).state if run.flow_run_id else None
            states = [st for st in (run.state, flow_state) if st is not None]
            name = f"task run '{run.name}' of flow run {run.flow_run_id} ({'/'.join(st.name for st in states)})"
            (ended if any(st.is_final() for st in states) else live).append(name)
        if ended and not live:
            # every holder is gone, so nothing that runs loses its slot. A tag reset revokes the leases
            # but (Prefect 3.8) leaves the limit's count: it is given back as well
            held = client.read_global_concurrency_limit_by_name(f"tag:{tag}").active_slots
            api_call(f"resetting concurrency limit '{tag}'", client.reset_concurrency_limit_by_tag, tag)
            if held:
                api_call(f"releasing {held} slot(s) of '{tag}'", client.release_concurrency_slots, [f"tag:{tag}"],
                         held, 1.0)  # fmt: skip
            log.warning(f"{stage}: released {len(ended)} slot(s) of concurrency limit '{tag}' held by runs that "
                        f"ended without giving them back: {', '.join(ended)}")  # fmt: skip
            return {"limit": tag, "released": ended, "waiting_on": []}
        if len(limit.active_slots) >= limit.concurrency_limit:
            log.warning(
                f"{stage}: concurrency limit '{tag}' has all {limit.concurrency_limit} slot(s) taken "
                f"({', '.join(live + ended)}); this run's {stage} tasks wait for a slot. If that run was killed, "
                f"its slot comes back when its lease expires; or cancel it (`prefect flow-run cancel <id>`) and "
                f"run again: the slots of runs that ended are released when a stage starts"
            )
        return {"limit": tag, "released": [], "waiting_on": live + ended}


@task(name="prune-rounds", cache_policy=NO_CACHE)
def prune_rounds_task(root: str, keep_last: int, current: str) -> list[str]:
    """Remove the folders of rounds older than the newest ``keep_last`` (never the current one's)."""
    from ood_core.rounds import prune_rounds

    return prune_rounds(root, keep_last, current, _logger())


@task(name="pending-shards", task_run_name="pending-{stage}", cache_policy=NO_CACHE)
def pending_shards_task(stage: str, root: str, keys: dict[str, str], n_shards: int) -> dict:
    """``{"pending": [shards to run], "complete": bool}`` by the cheap check: one listing per folder of
    the stage, then (unless it is complete) one marker read per finished shard."""
    store = stage_store(root, stage, keys)
    if store.is_valid():
        return {"pending": [], "complete": True}
    listing = store.shard_listing()
    pending = [i for i in range(n_shards) if not store.shard_valid(i, listing)]
    get_run_logger().info(f"{stage}: {n_shards - len(pending)}/{n_shards} shards done, {len(pending)} to run")
    return {"pending": pending, "complete": False}

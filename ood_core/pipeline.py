"""Runner-agnostic pipeline steps: keys, plan, one shard, finalize; plus a plain local loop.

Prefect tasks (``tasks/``) call exactly these functions; ``run_local`` chains them without
Prefect for library use and tests of the stage logic.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable

from ood_core import __version__
from ood_core.config import RunConfig
from ood_core.stages import STAGE_ORDER, STAGES, ShardPlan, StageContext
from ood_core.stages.base import ModelHub
from ood_core.storage import StageStore, list_stage_runs, merge_counts, stage_key

PLAN = "plan.json"


class StageNotReady(RuntimeError):
    """An upstream stage a run needs is not complete."""


def resolve_keys(cfg: RunConfig) -> dict[str, str]:
    """Every stage's content key; each hashes its config slice and its upstream keys."""
    keys: dict[str, str] = {}
    for name in STAGE_ORDER:
        stage = STAGES.get(name)()
        up = {u: keys[u] for u in stage.upstream}
        keys[name] = stage_key(name, stage.schema.version, stage.config_slice(cfg), up)
    return keys


def stage_store(root: str, name: str, keys: dict[str, str]) -> StageStore:
    return StageStore(root, name, keys[name])


def make_context(cfg: RunConfig, root: str, name: str, keys: dict[str, str], log=print) -> StageContext:
    stage = STAGES.get(name)()
    upstream = {}
    for u in stage.upstream:
        store = stage_store(root, u, keys)
        if not store.is_complete():
            raise StageNotReady(
                f"stage '{name}' needs '{u}' ({store.url()}) to be complete, and it is not: "
                f"run without --only, or include '{u}' in --only"
            )
        upstream[u] = store
    return StageContext(cfg=cfg, store=stage_store(root, name, keys), upstream=upstream, log=log)


def shard_key(cfg: RunConfig, name: str, keys: dict[str, str]) -> str:
    """What a stage's shards (not its stage-level step) depend on; equal keys mean shareable shards."""
    stage = STAGES.get(name)()
    sliced = stage.shard_slice(cfg)
    if sliced is None:
        return keys[name]
    return stage_key(f"{name}/shards", stage.schema.version, sliced, {u: keys[u] for u in stage.upstream})


def read_plan(store: StageStore) -> dict | None:
    """``{"shard_key": str, "shards": n}`` or None before planning (``plan.json`` is written last)."""
    path = store.path(PLAN)
    return store.read_json(path) if store.exists(path) else None


def _shard_plan_path(store: StageStore, index: int) -> str:
    return store.path("plans", f"{index:06d}.json")


def plan_stage(ctx: StageContext, name: str, keys: dict[str, str]) -> int:
    """Plan once and freeze it: one small file per shard, then ``plan.json``; returns the shard count.

    A frozen plan keeps shard numbering stable across resumes, and a shard task reads only its own
    items (a stage may have thousands of shards).
    """
    plan = read_plan(ctx.store)
    if plan is None:
        shards = STAGES.get(name)().plan(ctx)
        for p in shards:
            ctx.store.write_json(_shard_plan_path(ctx.store, p.index), p.items)
        plan = {"shard_key": shard_key(ctx.cfg, name, keys), "shards": len(shards)}
        ctx.store.write_json(ctx.store.path(PLAN), plan)
    return plan["shards"]


def load_shard_plan(ctx: StageContext, index: int) -> ShardPlan:
    path = _shard_plan_path(ctx.store, index)
    if not ctx.store.exists(path):
        raise KeyError(f"shard {index} is not planned in {ctx.store.url()} (no {path})")
    return ShardPlan(index, ctx.store.read_json(path))


def shard_donors(ctx: StageContext) -> list[StageStore]:
    """Other folders of this stage planned with the same shard key (e.g. only training differs)."""
    cached = ctx.__dict__.get("_donors")
    if cached is not None:
        return cached
    own = read_plan(ctx.store)
    donors = []
    if own["shard_key"] != ctx.store.key:  # the stage declares shards narrower than its config
        for store in list_stage_runs(ctx.store.root, ctx.store.stage):
            plan = read_plan(store) if store.key != ctx.store.key else None
            if plan and plan == own:
                donors.append(store)
    ctx.__dict__["_donors"] = donors
    return donors


def _copy_shard(src: StageStore, dst: StageStore, index: int) -> None:
    a, b = src.shard_paths(index), dst.shard_paths(index)
    for kind in ("tar", "parquet", "stats"):  # stats last: it marks the shard done
        dst.write_bytes(b[kind], src.read_bytes(a[kind]))


def run_shard(ctx: StageContext, name: str, index: int) -> dict:
    """Run one shard unless it is done and intact here, or can be copied from an equal-keyed folder."""
    if ctx.store.shard_done(index):
        problems = ctx.store.shard_problems(index, deep=False)  # cheap; `synth-ood verify` re-hashes
        if not problems:
            return {**ctx.store.shard_stats(index), "reused": True}
        ctx.log(f"[{name}] shard {index} is not intact ({problems[0]}); recomputing it")
        ctx.store.invalidate_shard(index)
    own_items = ctx.store.read_bytes(_shard_plan_path(ctx.store, index))
    for donor in shard_donors(ctx):
        # same shard key means same items; comparing them costs one small read and guards the copy
        if donor.read_bytes(_shard_plan_path(donor, index)) == own_items and donor.shard_valid(index):
            _copy_shard(donor, ctx.store, index)
            return {**ctx.store.shard_stats(index), "reused": True, "copied_from": donor.url()}
    stage = STAGES.get(name)()
    shard = load_shard_plan(ctx, index)
    t0 = time.perf_counter()
    out = stage.run_shard(ctx, shard)
    stats = ctx.store.write_shard(index, out.samples, out.rows, stage.schema, time.perf_counter() - t0)
    return {**stats, "reused": False}


def finalize_stage(ctx: StageContext, name: str, keys: dict[str, str], n_shards: int, started: float) -> dict:
    """Run the stage-level step and write ``_SUCCESS.json`` last."""
    if ctx.store.is_complete():
        return ctx.store.read_success()
    missing = [i for i in range(n_shards) if not ctx.store.shard_done(i)]
    if missing:
        raise RuntimeError(f"{name}: cannot finalize, shards {missing} are not done in {ctx.store.url()}")
    stage = STAGES.get(name)()
    t0 = time.perf_counter()
    summary = stage.finalize(ctx)
    ModelHub.release()
    stats = [ctx.store.shard_stats(i) for i in range(n_shards)]
    info = {
        "stage": name,
        "key": keys[name],
        "schema_version": stage.schema.version,
        "config": stage.config_slice(ctx.cfg),
        "upstream": {u: keys[u] for u in stage.upstream},
        "shards": n_shards,
        "rows": sum(s["rows"] for s in stats),
        "samples": sum(s["samples"] for s in stats),
        "counts": merge_counts([s["counts"] for s in stats]),
        # per shard (tar, manifest) bytes: a rerun checks them against one listing, reading no marker
        "sizes": [[s.get("tar_size"), s.get("parquet_size")] for s in stats],
        "timings": {
            "shard_seconds": round(sum(s["seconds"] for s in stats), 3),
            "finalize_seconds": round(time.perf_counter() - t0, 3),
            "wall_seconds": round(time.time() - started, 3),
        },
        "summary": summary,
        "code_version": __version__,
        "python": platform.python_version(),
    }
    ctx.store.write_success(info)
    return info


def write_run_record(root: str, cfg: RunConfig, keys: dict[str, str]) -> None:
    """``<root>/_runs/latest.json``: which stage folders the latest run uses (for ``status``)."""
    store = StageStore(root, "_runs", "latest")
    record = {"preset": cfg.preset, "keys": keys, "config": cfg.to_dict(), "time": time.time()}
    store.write_bytes(store.base + ".json", json.dumps(record, indent=2, sort_keys=True).encode())


def read_run_record(root: str) -> dict | None:
    store = StageStore(root, "_runs", "latest")
    path = store.base + ".json"
    return json.loads(store.read_bytes(path)) if store.exists(path) else None


def selected_stages(only: list[str] | None, force: list[str] | None) -> tuple[list[str], set[str]]:
    for name in [*(only or []), *(force or [])]:
        if name not in STAGE_ORDER:
            raise ValueError(f"unknown stage '{name}': stages are {', '.join(STAGE_ORDER)}")
    run = [s for s in STAGE_ORDER if not only or s in only]
    return run, set(force or [])


def run_local(
    cfg: RunConfig,
    root: str,
    only: list[str] | None = None,
    force: list[str] | None = None,
    log: Callable[[str], None] = print,
    keep_last: int | None = None,
) -> dict[str, dict]:
    """Run the pipeline in this process without Prefect; returns each stage's ``_SUCCESS`` info.

    With a generation round, ``keep_last`` prunes the folders of older rounds once this one is done.
    """
    from ood_core.rounds import prune_rounds, record_round

    run, forced = selected_stages(only, force)
    keys = resolve_keys(cfg)
    write_run_record(root, cfg, keys)
    if cfg.generate.round:
        record_round(root, cfg.generate.round, keys)
    results = {}
    for name in run:
        store = stage_store(root, name, keys)
        if name in forced:
            store.clear()
        if store.is_valid():
            log(f"[{name}] reused {store.url()}")
            results[name] = store.read_success()
            continue
        started = time.time()
        ctx = make_context(cfg, root, name, keys, log)
        n_shards = plan_stage(ctx, name, keys)
        for index in range(n_shards):
            stats = run_shard(ctx, name, index)
            log(f"[{name}] shard {index + 1}/{n_shards}: {stats['rows']} rows {stats['counts']}")
        results[name] = finalize_stage(ctx, name, keys, n_shards, started)
        log(f"[{name}] done -> {store.url()}")
    if keep_last and cfg.generate.round:
        prune_rounds(root, keep_last, cfg.generate.round, log)
    return results

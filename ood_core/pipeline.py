"""Runner-agnostic pipeline steps: keys, plan, one shard, finalize; plus a plain local loop.

Prefect tasks (``tasks/``) call exactly these functions; ``run_local`` chains them without
Prefect for library use and tests of the stage logic.
"""

from __future__ import annotations

import json
import platform
import time
import uuid
from collections.abc import Callable

from ood_core import __version__
from ood_core.config import RunConfig
from ood_core.publish import annotate_samples, write_dataset_card
from ood_core.secrets import scrub_tree
from ood_core.stages import STAGE_ORDER, STAGES, ShardPlan, StageContext
from ood_core.stages.base import ModelHub
from ood_core.storage import (
    DamagedFileError,
    ShardListing,
    StageStore,
    list_stage_runs,
    merge_counts,
    stage_key,
)

PLAN = "plan.json"


class StageNotReady(RuntimeError):
    """An upstream stage a run needs is not complete."""


def resolve_keys(cfg: RunConfig, root: str | None = None) -> dict[str, str]:
    """Every stage's content key; each hashes its config slice and its upstream keys.

    With ``root``, a stage with a round window (finetune's ``rounds_window`` > 1) also hashes the
    earlier rounds' folders it reads, recorded under ``root``; they are added to the keys as
    ``<stage>@<round>`` entries, so a new round changes its key and the same set gives the same key.
    ``keys[DATA_KEY]`` is the data's identity; with ``root`` its index is stored there (the run's
    first step lists the data; every later step, chunk process and rerun reads the index).
    """
    from ood_core.dataset_index import DATA_KEY, ensure_index
    from ood_core.identity import data_identity
    from ood_core.rounds import round_window

    keys: dict[str, str] = {}
    for name in STAGE_ORDER:
        stage = STAGES.get(name)()
        if root is not None and stage.round_window:
            keys.update(round_window(root, cfg.generate.round, stage.window_size(cfg), keys, stage.round_window))
        keys[name] = stage_key(name, stage.schema.version, stage.config_slice(cfg), upstream_keys(name, keys))
    keys[DATA_KEY] = ensure_index(cfg.data, cfg.seed, root) if root is not None else data_identity(cfg.data, cfg.seed)
    return keys


def upstream_keys(name: str, keys: dict[str, str]) -> dict[str, str]:
    """The keys of the folders stage ``name`` reads: its upstream stages and their windowed rounds."""
    from ood_core.rounds import window_base

    stage = STAGES.get(name)()
    up = {u: keys[u] for u in stage.upstream}
    # only the earlier rounds' entries (``finetune@r1``), never this run's folder of that stage: generate's
    # closed loop reads the previous round's finetune, which this run's finetune comes after
    up.update({k: v for k, v in keys.items() if k != window_base(k) and window_base(k) in stage.round_window})
    return up


def stage_store(root: str, name: str, keys: dict[str, str]) -> StageStore:
    return StageStore(root, name, keys[name])


def make_context(cfg: RunConfig, root: str, name: str, keys: dict[str, str], log=print) -> StageContext:
    from ood_core.dataset_index import DATA_KEY, adopt
    from ood_core.rounds import window_base

    if DATA_KEY in keys:  # the data index the run's first step stored: read, never listed again
        adopt(cfg.data, cfg.seed, root, keys[DATA_KEY])
    upstream = {}
    for u, key in upstream_keys(name, keys).items():
        store = StageStore(root, window_base(u), key)
        if u != window_base(u) and not store.is_complete():
            raise StageNotReady(
                f"stage '{name}' reads the earlier round's folder '{u}' ({store.url()}), which is no longer "
                f"complete (pruned or deleted since the run started): run again to use the rounds present"
            )
        if not store.is_complete():
            raise StageNotReady(
                f"stage '{name}' needs '{u}' ({store.url()}) to be complete, and it is not"
                f"{explain_key_change(cfg, root, u, keys)}: run without --only, or include '{u}' in --only"
            )
        upstream[u] = store
    return StageContext(cfg=cfg, store=stage_store(root, name, keys), upstream=upstream, log=log)


def _diff(old: object, new: object, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two JSON trees, as ``key (old -> new)``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new)):
            out += _diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix} ({old!r} -> {new!r})"]


def explain_key_change(cfg: RunConfig, root: str, name: str, keys: dict[str, str]) -> str:
    """Why ``name`` has a new key: the settings that differ from its newest finished folder."""
    stage = STAGES.get(name)()
    finished = [s for s in list_stage_runs(root, name) if s.key != keys[name] and s.is_complete()]
    if not finished:
        return f" (no finished '{name}' folder exists under {root})"
    old = finished[0].read_success()
    changes = _diff(old.get("config", {}), stage.config_slice(cfg))
    up, old_up = upstream_keys(name, keys), old.get("upstream", {})
    changes += [f"upstream '{u}' key ({old_up.get(u)} -> {up.get(u)})" for u in sorted(set(up) | set(old_up))
                if up.get(u) != old_up.get(u)]
    what = "; ".join(changes[:5]) or "its schema or code version"
    return (
        f": its key changed from {finished[0].key} (the newest finished '{name}') to {keys[name]} "
        f"because of: {what}"
    )


def load_stage_models(ctx: StageContext, name: str) -> None:
    """Load the stage's models at its start (not in the first shard), unless the stage is done."""
    roles = STAGES.get(name)().models
    if roles and not ctx.store.is_complete():
        from ood_core.models import describe_device, resolve_device

        ctx.log(f"[{name}] models on {describe_device(resolve_device(ctx.cfg.models.device))}")
        ctx.models.load(roles)


def shard_key(cfg: RunConfig, name: str, keys: dict[str, str]) -> str:
    """What a stage's shards (not its stage-level step) depend on; equal keys mean shareable shards."""
    stage = STAGES.get(name)()
    sliced = stage.shard_slice(cfg)
    if sliced is None:
        return keys[name]
    return stage_key(f"{name}/shards", stage.schema.version, sliced, upstream_keys(name, keys))


def read_plan(store: StageStore) -> dict | None:
    """``{"shard_key": str, "shards": n}`` or None before planning (``plan.json`` is written last)."""
    path = store.path(PLAN)
    try:
        return store.read_json(path) if store.exists(path) else None
    except DamagedFileError:
        return None  # planning is a pure function of the stage's key: plan again


def _shard_plan_path(store: StageStore, index: int) -> str:
    return store.path("plans", f"{index:06d}.json")


def plan_stage(ctx: StageContext, name: str, keys: dict[str, str]) -> int:
    """Plan once and freeze it: one small file per shard, then ``plan.json``; returns the shard count.

    A frozen plan keeps shard numbering stable across resumes, and a shard task reads only its own
    items (a stage may have thousands of shards).
    """
    if swept := ctx.store.sweep_temporaries():
        ctx.log(f"[{name}] removed {len(swept)} temporary file(s) an interrupted writer left in {ctx.store.url()}")
    plan = read_plan(ctx.store)
    if plan is None:
        shards = STAGES.get(name)().plan(ctx)
        for p in shards:
            ctx.store.write_json(_shard_plan_path(ctx.store, p.index), p.items)
        plan = {"shard_key": shard_key(ctx.cfg, name, keys), "shards": len(shards)}
        content = content_keys(ctx.cfg, name, keys, shards)
        if content:
            plan["content_keys"] = content
        ctx.store.write_json(ctx.store.path(PLAN), plan)
    return plan["shards"]


def load_shard_plan(ctx: StageContext, index: int) -> ShardPlan:
    path = _shard_plan_path(ctx.store, index)
    if not ctx.store.exists(path):
        raise KeyError(f"shard {index} is not planned in {ctx.store.url()} (no {path})")
    try:
        return ShardPlan(index, ctx.store.read_json(path))
    except DamagedFileError as err:
        # the same key plans the same shards: re-derive this one and rewrite its file
        shards = {p.index: p for p in STAGES.get(ctx.store.stage)().plan(ctx)}
        if index not in shards:
            raise err from None
        ctx.log(f"[{ctx.store.stage}] shard {index}: its frozen plan was unreadable, planned again")
        ctx.store.write_json(path, shards[index].items)
        return ShardPlan(index, shards[index].items)


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


def content_keys(cfg: RunConfig, name: str, keys: dict[str, str], shards: list[ShardPlan]) -> list[str | None]:
    """Per-shard content keys for stages whose shards depend on less than the whole config.

    A stage opts in with ``shard_content_slice(cfg, items)``; the key hashes that slice, the
    shard's items and the upstream keys, so a shard is reusable from any folder of the same stage
    where the same index has the same content key (e.g. generate's boundary shards when only the
    number of far images per label changed). Empty when the stage does not opt in.
    """
    stage = STAGES.get(name)()
    if not hasattr(stage, "shard_content_slice"):
        return []
    up = upstream_keys(name, keys)
    out: list[str | None] = []
    for p in shards:
        sliced = stage.shard_content_slice(cfg, p.items)
        out.append(None if sliced is None else stage_key(f"{name}/content", stage.schema.version,
                                                         {"config": sliced, "items": p.items}, up))
    return out


def content_donor(ctx: StageContext, index: int) -> StageStore | None:
    """A folder of this stage whose shard ``index`` has this shard's content key and is intact."""
    own = read_plan(ctx.store)
    wanted = (own.get("content_keys") or [None] * (index + 1))[index]
    if wanted is None:
        return None
    plans = ctx.__dict__.get("_content_plans")
    if plans is None:
        plans = []
        for store in list_stage_runs(ctx.store.root, ctx.store.stage):
            plan = read_plan(store) if store.key != ctx.store.key else None
            if plan and plan.get("content_keys"):
                plans.append((store, plan["content_keys"]))
        ctx.__dict__["_content_plans"] = plans
    for store, ck in plans:
        if index < len(ck) and ck[index] == wanted and store.shard_valid(index):
            return store
    return None


def _copy_shard(src: StageStore, dst: StageStore, index: int) -> None:
    a = {**src.shard_paths(index), "rejected": src.rejected_path(index), "features": src.features_path(index)}
    b = {**dst.shard_paths(index), "rejected": dst.rejected_path(index), "features": dst.features_path(index)}
    a["timing"], b["timing"] = src.timing_path(index), dst.timing_path(index)
    for kind in ("tar", "rejected", "features", "parquet", "timing", "stats"):  # stats last: it marks the shard done
        if kind not in ("rejected", "features", "timing") or src.exists(a[kind]):
            dst.write_bytes(b[kind], src.read_bytes(a[kind]))


def run_shard(ctx: StageContext, name: str, index: int, listing: ShardListing | None = None) -> dict:
    """Run one shard unless it is done and intact here, or can be copied from an equal-keyed folder.

    With the stage's ``listing`` (``StageStore.shard_listing``), a listed shard's reuse check reads
    its marker only; one the listing lacks costs one existence check (another run on the same root
    may have finished it since).
    """
    listed = ctx.store.shard_done(index, listing) if listing is not None else False
    if listed or ctx.store.shard_done(index):
        # cheap; `synth-ood verify` re-hashes
        stats, problems = ctx.store.check_shard(index, deep=False, listing=listing if listed else None)
        if not problems:
            return {**stats, "reused": True}
        ctx.log(f"[{name}] shard {index} is not intact ({problems[0]}); recomputing it")
        ctx.store.invalidate_shard(index)
    own_items = ctx.store.read_bytes(_shard_plan_path(ctx.store, index))
    for donor in shard_donors(ctx):
        # same shard key means same items; comparing them costs one small read and guards the copy
        if donor.read_bytes(_shard_plan_path(donor, index)) == own_items and donor.shard_valid(index):
            _copy_shard(donor, ctx.store, index)
            return {**ctx.store.shard_stats(index), "reused": True, "copied_from": donor.url()}
    donor = content_donor(ctx, index)
    if donor is not None:
        _copy_shard(donor, ctx.store, index)
        return {**ctx.store.shard_stats(index), "reused": True, "copied_from": donor.url()}
    stage = STAGES.get(name)()
    shard = load_shard_plan(ctx, index)
    t0 = time.perf_counter()
    try:
        out = stage.run_shard(ctx, shard)
    except Exception as exc:
        # the whole shard failed (a model, the device, storage): the same exception goes on (its type
        # decides retries), with a note naming the stage, the shard and the samples it held
        exc.add_note(
            f"{SHARD_FAILED}{name} shard {index} ({ctx.store.url()}) failed on samples "
            f"{_item_keys(shard.items)}: {type(exc).__name__}: {exc}"
        )
        raise
    annotate_samples(out.samples, out.rows, lambda: ctx.dataset.classnames)
    failures = describe_failures(out.rows)
    if failures:
        ctx.log(f"[{name}] shard {index}: {failures}")
    stats = ctx.store.write_shard(index, out.samples, out.rows, stage.schema, time.perf_counter() - t0, out.stats,
                                  out.timings, out.features)
    return {**stats, "reused": False}


SHARD_FAILED = "shard failed: "


def shard_failure(exc: BaseException) -> str | None:
    """The note ``run_shard`` added to an exception from a shard (stage, shard, samples), if any."""
    notes = [n for n in getattr(exc, "__notes__", []) if n.startswith(SHARD_FAILED)]
    return notes[-1][len(SHARD_FAILED):] if notes else None


def _item_keys(items: list[dict], limit: int = 5) -> str:
    keys = [str(it.get("key") or it.get("label") or it.get("kind") or "?") for it in items]
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def describe_failures(rows: list[dict], limit: int = 5) -> str:
    """``N sample(s) failed: key (reason): error; ...`` for a shard's failed rows, or ``""``."""
    failed = [r for r in rows if r.get("status") == "failed"]
    if not failed:
        return ""
    parts = [f"{r['key']} ({r.get('reason')}): {r.get('error') or 'no error text'}" for r in failed[:limit]]
    more = f"; and {len(failed) - limit} more (see the manifest's error column)" if len(failed) > limit else ""
    return f"{len(failed)} sample(s) failed: " + "; ".join(parts) + more


def shard_rate(stats: dict) -> str:
    """`` (N images/s, batch B)`` for a shard that recorded its throughput (generate), else ``""``."""
    if stats.get("images_per_s") is None or stats.get("reused"):
        return ""
    return f" ({stats['images_per_s']:.2f} images/s, {stats['s_per_image']:.3f} s/image, batch {stats['batch_used']})"


def finalize_stage(ctx: StageContext, name: str, keys: dict[str, str], n_shards: int, started: float) -> dict:
    """Run the stage-level step and write ``_SUCCESS.json`` last."""
    if ctx.store.is_complete():
        try:
            info = ctx.store.read_success()
        except DamagedFileError:
            info = None  # truncated by a kill or a full disk
        if info is not None and not ctx.store.artifact_problems(info.get("artifacts"), deep=False):
            return info
        ctx.store.fs.rm(ctx.store.success_path())  # finalize again: it rewrites the artifacts too
    done = set(ctx.store.shard_indices())  # one listing
    missing = [i for i in range(n_shards) if i not in done]
    if missing:
        raise RuntimeError(f"{name}: cannot finalize, shards {missing} are not done in {ctx.store.url()}")
    stage = STAGES.get(name)()
    t0 = time.perf_counter()
    summary = stage.finalize(ctx)
    ModelHub.release()
    bad_inputs = write_bad_inputs(ctx, stage)
    stats = [ctx.store.shard_stats(i) for i in range(n_shards)]
    marker_sizes = {n: i.get("size") for n, i in ctx.store._listing("stats").items()}
    info = {
        "stage": name,
        "key": keys[name],
        "schema_version": stage.schema.version,
        "config": stage.config_slice(ctx.cfg),
        "upstream": upstream_keys(name, keys),
        "shards": n_shards,
        "rows": sum(s["rows"] for s in stats),
        "samples": sum(s["samples"] for s in stats),
        "counts": merge_counts([s["counts"] for s in stats]),
        # per shard (tar, manifest, marker) bytes: a rerun checks them against listings, reading no marker
        "sizes": [[s.get("tar_size"), s.get("parquet_size"), marker_sizes.get(f"{i:06d}.json")]
                  for i, s in enumerate(stats)],
        "timings": {
            # markers from before timings moved out of them still hold their seconds
            "shard_seconds": round(sum({**s, **ctx.store.shard_timing(i)}.get("seconds", 0.0)
                                       for i, s in enumerate(stats)), 3),
            "finalize_seconds": round(time.perf_counter() - t0, 3),
            "wall_seconds": round(time.time() - started, 3),
        },
        "summary": summary,
        "bad_inputs": bad_inputs,
        "code_version": __version__,
        "python": platform.python_version(),
    }
    info = scrub_tree(info)  # e.g. credentials in a configured URL never reach the record
    write_dataset_card(ctx.store, info)
    # last before the marker: what verify and a rerun check the stage-level outputs against
    info["artifacts"] = ctx.store.artifact_files()
    ctx.store.write_success(info)
    return info


BAD_INPUTS = "bad_inputs.parquet"


def write_bad_inputs(ctx: StageContext, stage) -> dict[str, int]:
    """Write the stage's ``bad_inputs.parquet``; returns ``{reason: count}``.

    One row per input file the stage could not use: left out by the listing (``origin=listing``,
    status ``skipped``) or failed when decoded (``origin=decode``: the manifest's failed rows with a
    bad-input reason).
    """
    import pyarrow as pa

    from ood_core.data import BAD_INPUT_REASONS
    from ood_core.storage import parquet_bytes

    rows = [b.as_row() for b in stage.listed_bad_inputs(ctx)]
    failed = []
    if ctx.store.shard_indices():
        failed = [r for r in ctx.store.read_manifest().to_pylist()
                  if r["status"] == "failed" and r["reason"] in BAD_INPUT_REASONS]
    if failed:
        records = ctx.records  # the dataset listing only when there is something to look up
        for r in failed:
            rec = records.get(r.get("source_key") or r["key"])
            rows.append({"key": r["key"], "source": rec.source if rec else "", "status": r["status"],
                         "reason": r["reason"], "error": r["error"], "class_name": rec.class_name if rec else "",
                         "split": rec.split if rec else "", "origin": "decode"})
    cols = ["key", "source", "status", "reason", "error", "class_name", "split", "origin"]
    table = pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in cols})
    data, path = parquet_bytes(table), ctx.store.path(BAD_INPUTS)
    # a re-finalize (e.g. after a deleted marker) leaves an identical table untouched
    if not ctx.store.exists(path) or ctx.store.read_bytes(path) != data:
        ctx.store.write_bytes(path, data)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["reason"]] = counts.get(r["reason"], 0) + 1
    return dict(sorted(counts.items()))


def check_upstream_ready(cfg: RunConfig, root: str, only: list[str] | None, force: list[str] | None) -> None:
    """Raise StageNotReady before any work when a selected stage needs an upstream stage that is
    neither complete nor part of this run (so the message is the whole output, under any runner)."""
    run, _ = selected_stages(only, force)
    keys = resolve_keys(cfg, root)
    for name in run:
        for u in STAGES.get(name)().upstream:
            if u in run:
                continue
            store = stage_store(root, u, keys)
            if not store.is_complete():
                wider = json.dumps([s for s in STAGE_ORDER if s in run or s == u])
                raise StageNotReady(
                    f"stage '{name}' needs '{u}' ({store.url()}) to be complete, and it is not: "
                    f"run without --only, or include '{u}' in --only (a deployment run: -p only='{wider}')"
                )


def write_run_record(root: str, cfg: RunConfig, keys: dict[str, str]) -> None:
    """``<root>/_runs/latest.json`` (which stage folders the latest run uses) and a copy in
    ``_runs/history/`` so that a failed run never hides the stages an earlier run finished."""
    store = StageStore(root, "_runs", "latest")
    now = time.time()
    record = {"preset": cfg.preset, "keys": keys, "config": scrub_tree(cfg.to_dict()), "time": now}
    data = json.dumps(record, indent=2, sort_keys=True).encode()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now))
    history = StageStore(root, "_runs", "history")
    history.write_bytes(history.path(f"{stamp}-{uuid.uuid4().hex[:6]}.json"), data)
    store.write_bytes(store.base + ".json", data)


def clear_forced_stage(store: StageStore, run_id: str | None) -> bool:
    """``force``'s delete of a stage folder, once per run: a retry of the run ``run_id`` keeps what
    its earlier attempt recomputed. True if the folder was deleted now (always, without a run id)."""
    marks = StageStore(store.root, "_runs", "forced")
    mark = marks.path(f"{run_id}-{store.stage}-{store.key}.json") if run_id else None
    if mark and marks.exists(mark):
        return False
    store.clear()
    if mark:
        marks.write_json(mark, {"run": run_id, "stage": store.stage, "key": store.key, "time": time.time()})
    return True


def read_run_history(root: str) -> list[dict]:
    """Every recorded run, newest first (``_runs/history/*.json``)."""
    store = StageStore(root, "_runs", "history")
    if not store.exists(store.base):
        return []
    paths = sorted((p for p in store.fs.ls(store.base, detail=False) if p.endswith(".json")), reverse=True)
    out = []
    for p in paths:
        try:
            out.append(store.read_json(p))
        except DamagedFileError:
            continue  # one damaged record must not hide the others
    return out


def read_run_record(root: str) -> dict | None:
    """The latest run's record; if ``latest.json`` is damaged, the newest readable one of the history."""
    store = StageStore(root, "_runs", "latest")
    path = store.base + ".json"
    if not store.exists(path):
        return None
    try:
        return store.read_json(path)
    except DamagedFileError:
        history = read_run_history(root)
        return history[0] if history else None


def selected_stages(only: list[str] | None, force: list[str] | None) -> tuple[list[str], set[str]]:
    for name in [*(only or []), *(force or [])]:
        if name not in STAGE_ORDER:
            raise ValueError(f"unknown stage '{name}': stages are {', '.join(STAGE_ORDER)}")
    run = [s for s in STAGE_ORDER if not only or s in only]
    return run, with_dependents(force or [])


def with_dependents(stages: list[str]) -> set[str]:
    """``stages`` and every stage that reads them, directly or not: forcing generate must not leave
    elaborate and finetune built from the bytes it replaced."""
    closed = set(stages)
    for name in STAGE_ORDER:  # upstream before downstream, so one pass closes the set
        if closed & set(STAGES.get(name).upstream):
            closed.add(name)
    return closed


def run_shards(ctx: StageContext, name: str, n_shards: int, log: Callable[[str], None] = print) -> None:
    """Every shard of a stage in this process, in order (finished ones are reused): the plain loop."""
    listing = ctx.store.shard_listing()  # the stage's markers in one listing, not a request per shard
    for index in range(n_shards):
        stats = run_shard(ctx, name, index, listing)
        copied = f" (copied from {stats['copied_from']})" if stats.get("copied_from") else ""
        log(f"[{name}] shard {index + 1}/{n_shards}: {stats['rows']} rows {stats['counts']}{copied}"
            f"{shard_rate(stats)}")


def run_local(
    cfg: RunConfig,
    root: str,
    only: list[str] | None = None,
    force: list[str] | None = None,
    log: Callable[[str], None] = print,
    check: bool = True,
    keep_last: int | None = None,
) -> dict[str, dict]:
    """Run the pipeline in this process without Prefect; returns each stage's ``_SUCCESS`` info.

    ``check`` runs the preflight first (data, OOD sets, model ids, endpoint, output root). With a
    generation round, ``keep_last`` prunes the folders of older rounds once this one is done.
    """
    from ood_core.dataset_index import forget
    from ood_core.rounds import check_keep_last, prune_rounds, record_round

    run, forced = selected_stages(only, force)
    check_keep_last(cfg.finetune.rounds_window, keep_last)
    forget()  # a new run lists its data anew: once, here (the data may have changed since the last)
    if check:
        from ood_core.preflight import preflight

        preflight(cfg, root)
    keys = resolve_keys(cfg, root)
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
        load_stage_models(ctx, name)
        run_shards(ctx, name, n_shards, log)
        results[name] = finalize_stage(ctx, name, keys, n_shards, started)
        log(f"[{name}] done -> {store.url()}")
    if keep_last and cfg.generate.round:
        prune_rounds(root, keep_last, cfg.generate.round, log)
    return results

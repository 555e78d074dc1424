"""Generation rounds: nightly regeneration that makes new data while sketch is reused.

A round (``generate.round``, e.g. the scheduled run's date) is folded into generate's seed and
key, so generate, elaborate and finetune of each round live in their own folders; sketch (its
costly MLLM calls) does not depend on it. ``<root>/_runs/rounds/<round>.json`` records which
folders a round uses: ``synth-ood status`` lists them and ``keep_last`` prunes the oldest.
A stage with a round window (finetune's ``rounds_window``) also reads the folders of earlier
rounds; they enter its key as ``<stage>@<round>`` entries and are never pruned while it uses them.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from ood_core.storage import StageStore

# the stages whose folders belong to one round (sketch is shared by every round)
ROUND_STAGES = ("generate", "elaborate", "finetune")
SHARED_STAGE = "sketch"
DATE_ROUND = "@date"
# a key entry ``elaborate@2026-11-21``: an earlier round's folder that a windowed stage reads
WINDOW_SEP = "@"


def window_base(name: str) -> str:
    """The stage of a key entry: ``elaborate@2026-11-21`` -> ``elaborate``."""
    return name.split(WINDOW_SEP, 1)[0]


def resolve_round(value: str | None, scheduled: datetime | None = None) -> str:
    """``@date`` becomes the (scheduled) run's UTC date, ``YYYY-MM-DD``; anything else is kept."""
    if value != DATE_ROUND:
        return value or ""
    when = scheduled or datetime.now(UTC)
    return when.astimezone(UTC).strftime("%Y-%m-%d")


def _store(root: str) -> StageStore:
    return StageStore(root, "_runs", "rounds")


def record_round(root: str, round_name: str, keys: dict[str, str]) -> None:
    """Remember which stage folders this round uses (its first recording time orders the rounds)."""
    store = _store(root)
    path = store.path(f"{round_name}.json")
    first = store.read_json(path)["first_seen"] if store.exists(path) else time.time()
    store.write_json(path, {"round": round_name, "keys": keys, "first_seen": first, "last_run": time.time()})


def list_rounds(root: str) -> list[dict]:
    """Recorded rounds, oldest first."""
    store = _store(root)
    if not store.exists(store.base):
        return []
    rounds = [json.loads(store.read_bytes(p)) for p in store.fs.ls(store.base, detail=False) if p.endswith(".json")]
    return sorted(rounds, key=lambda r: (r["first_seen"], r["round"]))


def round_window(root: str, current: str, size: int, keys: dict[str, str], stages: tuple[str, ...]) -> dict[str, str]:
    """The folders of ``stages`` from the ``size - 1`` rounds recorded before ``current`` that a
    windowed stage reads besides this round's: ``{"<stage>@<round>": key}``.

    Only rounds with this run's sketch (same negatives and data, so labels line up) whose folders
    are complete count; a round not yet recorded is the newest. Empty without a round.
    """
    if size <= 1 or not current:
        return {}
    rounds = list_rounds(root)
    names = [r["round"] for r in rounds]
    earlier = rounds[: names.index(current)] if current in names else rounds
    usable = [
        r for r in earlier
        if r["keys"].get(SHARED_STAGE) == keys[SHARED_STAGE]
        and all(s in r["keys"] and StageStore(root, s, r["keys"][s]).is_complete() for s in stages)
    ]
    return {f"{s}{WINDOW_SEP}{r['round']}": r["keys"][s] for r in usable[-(size - 1):] for s in stages}


def check_keep_last(window: int, keep_last: int | None) -> None:
    """Reject a ``keep_last`` that would prune rounds the next run's finetune trains on."""
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (got {keep_last}): the latest round is always kept")
    if keep_last and keep_last < window:
        raise ValueError(
            f"keep_last {keep_last} is smaller than finetune.rounds_window {window}: pruning would delete rounds "
            f"the next finetune trains on; set keep_last to at least {window} or lower finetune.rounds_window"
        )


def prune_rounds(root: str, keep_last: int, current: str, log=print) -> list[str]:
    """Delete the folders of all but the newest ``keep_last`` rounds; never a folder a kept round
    (or the ``current`` one) uses. Returns the pruned round names."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (got {keep_last}): the latest round is always kept")
    rounds = list_rounds(root)
    kept = rounds[-keep_last:]
    kept_names = {r["round"] for r in kept} | {current}
    # a kept round's own folders and the earlier rounds' folders its finetune reads (``elaborate@<round>``)
    protected = {(window_base(s), k) for r in rounds if r["round"] in kept_names for s, k in r["keys"].items()
                 if window_base(s) in ROUND_STAGES}
    pruned = []
    for r in rounds:
        if r["round"] in kept_names:
            continue
        for stage in ROUND_STAGES:
            if (stage, r["keys"][stage]) not in protected:
                store = StageStore(root, stage, r["keys"][stage])
                if store.exists(store.base):
                    log(f"[rounds] keep_last={keep_last}: removing round {r['round']} {store.url()}")
                    store.clear()
        _store(root).fs.rm(_store(root).path(f"{r['round']}.json"))
        pruned.append(r["round"])
    return pruned


def _averages(metrics: dict) -> dict:
    """``{method: {"fpr95", "auroc"}}`` averaged over the OOD sets, from finetune's ``metrics``."""
    return {m: {k: v["average"][k] for k in ("fpr95", "auroc")} for m, v in metrics.items() if "average" in v}


def _finished_metrics(root: str, keys: dict) -> dict | None:
    store = StageStore(root, "finetune", keys["finetune"]) if "finetune" in keys else None
    if store is None or not store.is_complete():
        return None
    try:
        return store.read_success().get("summary", {}).get("metrics")
    except ValueError:
        return None  # a damaged record: that round is left out, not fatal


def round_metrics(root: str, current: str = "", current_metrics: dict | None = None) -> list[dict]:
    """``[{"round", "metrics": {method: {"fpr95", "auroc"}}}]`` (averages over the OOD sets), oldest
    first, for every recorded round whose finetune folder is complete; ``current_metrics`` stands in
    for the round ``current`` (a finetune that is finishing has no ``_SUCCESS.json`` yet)."""
    stand_in = current_metrics is not None and bool(current)
    rounds = [(r["round"], current_metrics if stand_in and r["round"] == current else _finished_metrics(root, r["keys"]))
              for r in list_rounds(root)]  # fmt: skip
    if stand_in and current not in [name for name, _ in rounds]:
        rounds.append((current, current_metrics))
    return [{"round": name, "metrics": _averages(m)} for name, m in rounds if m]

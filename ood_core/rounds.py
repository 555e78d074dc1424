"""Generation rounds: nightly regeneration that makes new data while sketch is reused.

A round (``generate.round``, e.g. the scheduled run's date) is folded into generate's seed and
key, so generate, elaborate and finetune of each round live in their own folders; sketch (its
costly MLLM calls) does not depend on it. ``<root>/_runs/rounds/<round>.json`` records which
folders a round uses: ``synth-ood status`` lists them and ``keep_last`` prunes the oldest.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

from ood_core.storage import StageStore

# the stages whose folders belong to one round (sketch is shared by every round)
ROUND_STAGES = ("generate", "elaborate", "finetune")
DATE_ROUND = "@date"


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


def prune_rounds(root: str, keep_last: int, current: str, log=print) -> list[str]:
    """Delete the folders of all but the newest ``keep_last`` rounds; never a folder a kept round
    (or the ``current`` one) uses. Returns the pruned round names."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (got {keep_last}): the latest round is always kept")
    rounds = list_rounds(root)
    kept = rounds[-keep_last:]
    kept_names = {r["round"] for r in kept} | {current}
    protected = {(s, r["keys"][s]) for r in rounds if r["round"] in kept_names for s in ROUND_STAGES}
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

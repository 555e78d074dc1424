"""Rerun cost of a finished stage of N shards: full re-hash (before) vs marker + sizes (after).

    .venv/bin/python benchmarks/reuse.py --shards 2000 --where local
    .venv/bin/python benchmarks/reuse.py --shards 2000 --where moto

"before" is what a rerun did until now (``verify(deep=True)``: read and hash every tar and
manifest); "after" is ``is_valid()`` (three listings plus one batched read of the small markers).
The per-shard line is the check each Prefect shard task's cache key makes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ood_core.storage import Sample, StageStore  # noqa: E402
from schemas import GENERATE  # noqa: E402


def fill(store: StageStore, shards: int, kb: int) -> None:
    payload = os.urandom(kb * 1024)
    for i in range(shards):
        samples = [Sample(f"s{i}x{j}", {"bin": payload[j::4], "json": b"{}"}) for j in range(4)]
        rows = [{"key": s.key, "status": "kept", "reason": "ok"} for s in samples]
        store.write_shard(i, samples, rows, GENERATE, seconds=0.0)
    stats = [store.shard_stats(i) for i in range(shards)]
    store.write_success({"shards": shards, "sizes": [[s["tar_size"], s["parquet_size"]] for s in stats]})


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench(root: str, shards: int, kb: int, per_shard: int) -> None:
    per_shard = min(per_shard, shards)
    store = StageStore(root, "generate", "bench")
    t_fill, _ = timed(lambda: fill(store, shards, kb))
    t_before, problems = timed(lambda: store.verify(deep=True))
    assert problems == [], problems[:3]
    t_after, ok = timed(store.is_valid)
    assert ok
    t_shard_before, _ = timed(lambda: [store.shard_problems(i, deep=True) for i in range(per_shard)])
    t_shard_after, _ = timed(lambda: [store.shard_valid(i) for i in range(per_shard)])
    print(f"root {root}: {shards} shards x {kb} KB (written in {t_fill:.1f} s)")
    print(f"  stage reuse check   before (re-hash all) {t_before:8.2f} s   after (marker + sizes) {t_after:8.2f} s"
          f"   x{t_before / t_after:.0f}")
    print(f"  per-shard check x{per_shard}  before {t_shard_before:8.2f} s   after {t_shard_after:8.2f} s"
          f"   x{t_shard_before / t_shard_after:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=2000)
    ap.add_argument("--kb", type=int, default=64, help="payload per shard (KB)")
    ap.add_argument("--per-shard", type=int, default=200, help="shards timed with the per-shard check")
    ap.add_argument("--where", choices=["local", "moto"], default="local")
    args = ap.parse_args()
    if args.where == "local":
        with tempfile.TemporaryDirectory() as tmp:
            bench(tmp, args.shards, args.kb, args.per_shard)
    else:
        from benchmarks.moto_s3 import moto_s3

        with moto_s3("bench") as root:
            bench(root, args.shards, args.kb, args.per_shard)


if __name__ == "__main__":
    main()

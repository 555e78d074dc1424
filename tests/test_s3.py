"""`s3://` roots against a real S3 API (moto's server on 127.0.0.1, s3fs through its endpoint settings)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager

import pytest

from ood_core.storage import Sample, StageStore
from schemas import GENERATE


def _write(store: StageStore, index: int) -> dict:
    samples = [Sample(f"s{index}x{i}", {"txt": f"hello {i}".encode()}) for i in range(3)]
    rows = [{"key": s.key, "status": "kept", "reason": "ok"} for s in samples]
    return store.write_shard(index, samples, rows, GENERATE, seconds=0.1)


def test_stage_folder_on_s3_writes_verifies_and_is_reused_cheaply(s3_bucket):
    root = f"{s3_bucket}/{uuid.uuid4().hex[:8]}"
    store = StageStore(root, "generate", "k")
    assert store.on_object_store()
    for i in range(3):
        _write(store, i)
    store.write_success({"shards": 3})
    assert store.verify() == [] and store.is_valid() and store.shard_valid(2)
    names = store.fs.find(store.base)
    assert names and not [n for n in names if ".tmp-" in n], "object writes go straight to the final name"
    # truncate one object: the cheap check sees the size, verify sees it too
    tar = store.shard_paths(1)["tar"]
    store.fs.pipe_file(tar, store.read_bytes(tar)[:512])
    assert not store.is_valid() and not store.shard_valid(1) and store.shard_valid(0)
    assert any("shards/000001.tar" in p for p in store.verify())


_WRITER = """
import sys
from ood_core.storage import StageStore
store = StageStore(sys.argv[1], "generate", "k")
print("writing", flush=True)
store.write_bytes(store.shard_paths(0)["tar"], b"x" * (64 * 2**20))  # multipart upload
print("done", flush=True)
"""


def test_a_killed_writer_leaves_no_partial_object(s3_bucket):
    root = f"{s3_bucket}/{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, root], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(1.0)  # mid-upload (a 64 MB object goes up in parts)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    store = StageStore(root, "generate", "k")
    path = store.shard_paths(0)["tar"]
    # all or nothing: never a partial object under the final name
    if store.exists(path):
        assert store.fs.info(path)["size"] == 64 * 2**20
    leftovers = store.fs.find(f"{store.fs._strip_protocol(root)}")
    assert all(n.endswith("000000.tar") for n in leftovers), leftovers


@pytest.mark.slow
def test_tiny_pipeline_on_an_s3_root_completes_and_verifies(s3_bucket, tmp_path):
    root = f"{s3_bucket}/run-{uuid.uuid4().hex[:8]}"
    cmd = [sys.executable, "-m", "flows.cli"]
    run = subprocess.run(
        [*cmd, "run", "--preset", "tiny", "--out", root, "--set", f"models.cache_dir={tmp_path / 'models'}",
        ],
        capture_output=True, text=True, env=os.environ.copy(), timeout=1200,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    verify = subprocess.run([*cmd, "verify", root], capture_output=True, text=True, env=os.environ.copy())
    assert verify.returncode == 0 and "4 stage folder(s) consistent" in verify.stdout, verify.stdout + verify.stderr
    status = subprocess.run([*cmd, "status", root], capture_output=True, text=True, env=os.environ.copy())
    assert status.returncode == 0 and status.stdout.count(" done ") == 4, status.stdout


@contextmanager
def _s3_requests():
    """Every request s3fs sends in the block (all go through ``_call_s3``), as ``(operation, key or prefix)``."""
    import s3fs

    calls: list[tuple[str, str]] = []
    real = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        calls.append((method, kwargs.get("Key") or kwargs.get("Prefix") or ""))
        return await real(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = counted
    try:
        yield calls
    finally:
        s3fs.S3FileSystem._call_s3 = real


def test_resuming_a_partial_stage_lists_its_markers_once_and_reads_each_finished_one_once(
    s3_bucket, one_row_stage, monkeypatch
):
    """Issue 17: a finished shard's reuse check is its marker's one read (the stage's markers and files
    come from one listing per folder, no existence check or stat per shard); a pending shard's is
    at most one request. Both the plain loop and the flow's pending check."""
    import logging

    import tasks.stage_tasks as T
    from ood_core.config import load_config
    from ood_core.pipeline import make_context, plan_stage, run_shard, run_shards
    from ood_core.storage import stage_key

    monkeypatch.setattr(T, "get_run_logger", lambda: logging.getLogger("test"))  # the task's body, outside a flow

    root = f"{s3_bucket}/{uuid.uuid4().hex[:8]}"
    cfg = load_config("tiny")
    keys = {one_row_stage: stage_key(one_row_stage, 1, {}, {})}
    ctx = make_context(cfg, root, one_row_stage, keys, log=lambda m: None)
    assert plan_stage(ctx, one_row_stage, keys) == 6
    for i in (0, 1, 3):  # partially finished: 3 of 6, not in order
        run_shard(ctx, one_row_stage, i)
    base = ctx.store.fs._strip_protocol(ctx.store.base)
    key = base.split("/", 1)[1]  # the stage folder's key in the bucket
    done_files = {f"{base}/{f}" for i in (0, 1, 3) for f in (f"stats/{i:06d}.json", f"shards/{i:06d}.tar",
                                                             f"manifests/{i:06d}.parquet")}  # fmt: skip

    def per_shard(calls, index):
        return [c for c in calls if f"/{index:06d}." in c[1]]

    # the flow's check (pending_shards_task), then the plain loop's resume
    for check in (lambda: T.pending_shards_task.fn(one_row_stage, root, keys, 6)["pending"],
                  lambda: run_shards(make_context(cfg, root, one_row_stage, keys, log=lambda m: None),
                                     one_row_stage, 6, log=lambda m: None)):  # fmt: skip
        with _s3_requests() as calls:
            result = check()
        if result is not None:
            assert result == [2, 4, 5]
        lists = [c[1] for c in calls if c[0] == "list_objects_v2"]
        # each folder listed once (a missing one, features/, costs s3fs a listing of its parent too)
        for folder in ("stats", "shards", "manifests", "features"):
            assert lists.count(f"{key}/{folder}/") == 1, lists
        assert len(lists) <= 7 and not [p for p in lists if "/0000" in p], lists  # none per shard
        for i in (0, 1, 3):  # finished: its marker read once, nothing else
            assert per_shard(calls, i) == [("get_object", f"{key}/stats/{i:06d}.json")], calls
        assert not [c for c in calls if c[0] == "head_object" and f"{s3_bucket[5:]}/{c[1]}" in done_files]
        if result is None:  # the loop ran the pending shards: one request each before its work
            for i in (2, 4, 5):
                first_write = next(n for n, c in enumerate(calls) if c[0] == "put_object" and f"/{i:06d}." in c[1])
                before = [c for c in calls[:first_write] if f"/{i:06d}." in c[1] and "plans/" not in c[1]]
                assert before == [("get_object", f"{key}/stats/{i:06d}.json")], before
    assert ctx.store.shard_indices() == list(range(6))

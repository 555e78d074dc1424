"""`s3://` roots against a real S3 API (moto's server on 127.0.0.1, s3fs through its endpoint settings)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

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

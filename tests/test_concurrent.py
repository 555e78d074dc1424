"""Two runs at once on one root (a nightly run overlapping a manual rerun): no duplicate, torn or mixed shard."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ood_core.config import load_config
from ood_core.pipeline import resolve_keys
from ood_core.storage import StageStore, sha256_bytes

pytestmark = pytest.mark.slow


def test_two_runs_started_together_on_one_root_give_one_consistent_result(tmp_path):
    out, models = tmp_path / "out", str(tmp_path / "models")
    # build the tiny models once, so that both runs race on the stages rather than on the model cache
    cmd = [sys.executable, "-m", "flows.cli", "run", "--preset", "tiny", "--set", f"models.cache_dir={models}",
           "--only", "sketch,generate", "--no-prefect"]
    subprocess.run([*cmd, "--out", str(tmp_path / "warm"), "--only", "sketch"], check=True, capture_output=True)
    procs = [subprocess.Popen([*cmd, "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=os.environ.copy()) for _ in range(2)]
    outputs = [p.communicate(timeout=1200)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    keys = resolve_keys(load_config("tiny", {"models.cache_dir": models}))
    for stage in ("sketch", "generate"):
        store = StageStore(str(out), stage, keys[stage])
        assert store.verify() == []  # every shard's bytes match the hashes in its marker
        n = store.read_success()["shards"]
        for i in range(n):
            stats = store.shard_stats(i)
            assert sha256_bytes(store.read_bytes(store.shard_paths(i)["tar"])) == stats["tar_sha256"]
        rows = store.read_manifest().column("key").to_pylist()
        assert len(rows) == len(set(rows)), f"{stage}: duplicate manifest rows"
    assert not list(out.rglob(".tmp-*")), "no temporary file left behind"
    verify = subprocess.run([sys.executable, "-m", "flows.cli", "verify", str(out)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout

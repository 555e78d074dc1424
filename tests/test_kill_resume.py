"""A run killed with SIGKILL mid-stage resumes to the same manifests and shards as an uninterrupted run."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _args(out: Path, models: str) -> list[str]:
    return [sys.executable, "-m", "flows.cli", "run", "--no-prefect", "--preset", "tiny", "--out", str(out),
            "--only", "sketch", "--set", f"models.cache_dir={models}", "--set", "sketch.shard_size=2"]


def _digests(out: Path) -> dict[str, str]:
    return {
        str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(out.rglob("*"))
        # markers too: they hold no wall-clock value, so a resumed shard writes the same bytes
        if p.is_file() and p.parent.name in ("manifests", "shards", "plans", "stats")
    }


def test_sigkill_mid_stage_then_resume_matches_an_uninterrupted_run(tmp_path):
    models = str(tmp_path / "models")
    ref = tmp_path / "ref"
    subprocess.run(_args(ref, models), check=True, capture_output=True)
    expected = _digests(ref)
    assert sum("/manifests/" in k for k in expected) >= 6

    out = tmp_path / "killed"
    proc = subprocess.Popen(_args(out, models), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        # kill once three shards are done: mid-stage, with a later shard possibly half-written
        while len(list(out.glob("sketch/*/stats/*.json"))) < 3 and proc.poll() is None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not list(out.glob("sketch/*/_SUCCESS.json"))

    done = subprocess.run(_args(out, models), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _digests(out) == expected
    assert subprocess.run([sys.executable, "-m", "flows.cli", "verify", str(out)]).returncode == 0

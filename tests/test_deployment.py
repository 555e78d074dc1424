"""`prefect deployment run synth-ood/tiny` against a real local Prefect server and process worker."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ood_core.pipeline import read_run_record
from ood_core.stages import STAGE_ORDER

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-server")
    port = _free_port()
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(home / "results"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PWD": str(ROOT),
    }
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        proc.kill()
        raise RuntimeError(f"Prefect server did not become healthy; see {home / 'server.log'}")
    yield env
    proc.terminate()
    proc.wait(timeout=30)


def prefect(env: dict, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [str(BIN / "prefect"), *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_deployment_run_completes_and_a_second_run_reuses_everything(server, tmp_path):
    env = server
    # as the README says: one script creates both pools from their templates and deploys everything
    proc = subprocess.run(["deploy/deploy.sh"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"deploy/deploy.sh:\n{proc.stdout}\n{proc.stderr}"
    assert "CUDA_VISIBLE_DEVICES" in prefect(env, "work-pool", "inspect", "gpu-pool").stdout  # the template applied
    for name in ("imagenet", "food101", "tiny"):
        prefect(env, "deployment", "inspect", f"synth-ood/{name}")
    worker_log = open(tmp_path / "worker.log", "w")
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "cpu-pool"],
        env=env, cwd=ROOT, stdout=worker_log, stderr=subprocess.STDOUT,
    )
    out = tmp_path / "out"
    params = [
        "-p", f"out={out}",
        "-p", "overrides=" + json.dumps({"models.cache_dir": str(tmp_path / "models")}),
    ]
    try:
        prefect(env, "deployment", "run", "synth-ood/tiny", *params, "--watch", timeout=900)
        keys = read_run_record(str(out))["keys"]
        for stage in STAGE_ORDER:
            assert (out / stage / keys[stage] / "_SUCCESS.json").exists()
        files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and "_runs" not in p.parts}

        prefect(env, "deployment", "run", "synth-ood/tiny", *params, "--watch", timeout=900)
        assert {p: p.stat().st_mtime_ns for p in files} == files
    finally:
        worker.terminate()
        worker.wait(timeout=30)
    verify = subprocess.run([str(BIN / "synth-ood"), "verify", str(out)], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stdout
    # the server's scheduler works (SQLAlchemy 2.1 made it fail with a bulk_dml error)
    assert "bulk_dml" not in (Path(env["PREFECT_HOME"]) / "server.log").read_text()

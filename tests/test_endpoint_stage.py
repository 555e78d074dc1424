"""The sketch stage against a scripted faulty OpenAI-compatible endpoint: the right failed rows, a
failed shard when the endpoint is down for good, and no planted secret anywhere on disk or in logs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from flows.cli import main
from ood_core.config import load_config
from ood_core.models import RetryableError
from ood_core.pipeline import resolve_keys, run_local
from ood_core.storage import StageStore
from tests.fault_server import FaultServer

pytestmark = pytest.mark.slow

KEY = "sk-planted-7f3a9c1e5b2d4680"
PASSWORD = "pw-planted-q8w7e6r5"


def _sets(url: str, models: str) -> dict[str, str]:
    return {
        "models.cache_dir": models,
        "models.mllm.backend": "openai",
        "models.mllm.name": "faulty-llava",
        "models.mllm.base_url": url,
        "models.mllm.api_key_env": "SYNTHOOD_PLANTED_KEY",
        "models.endpoint.timeout": "1.0",
        "models.endpoint.max_retries": "2",
        "models.endpoint.backoff_initial": "0.01",
        "models.endpoint.backoff_max": "0.05",
        "models.endpoint.breaker_cooldown": "0",
        "sketch.far_labels": "0",
        "sketch.fine_labels": "0",  # one MLLM request each: the script counts context requests only
        "sketch.near_per_class": "0",
        "sketch.sources_per_class": "3",
        "sketch.shard_size": "64",
        "sketch.lexicon_limit": "200",  # negative mining is not under test here
    }


# one context request per source image, in plan order: (server actions, expected status, reason)
SCRIPT = [
    (["ok"], "kept", "ok"),
    (["429", "429", "ok"], "kept", "ok"),
    (["429ra", "ok"], "kept", "ok"),
    (["500", "ok"], "kept", "ok"),
    (["reset", "ok"], "kept", "ok"),
    (["slow", "ok"], "kept", "ok"),
    (["err200"], "failed", "error_object"),
    (["nonjson"], "failed", "bad_response"),
    (["echo"], "failed", "http_400"),
    (["empty"], "failed", "empty_reply"),
    (["slow", "slow", "slow"], "failed", "timeout"),
    (["ok"], "kept", "ok"),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


def _context_rows(store: StageStore) -> list[dict]:
    return [r for r in store.read_manifest().to_pylist() if r["kind"] == "context"]


def test_each_fault_gives_its_row_and_the_stage_completes(tmp_path, models, monkeypatch):
    monkeypatch.setenv("SYNTHOOD_PLANTED_KEY", KEY)
    actions = [a for acts, _, _ in SCRIPT for a in acts]
    with FaultServer(actions, default="ok", slow_seconds=3.0) as srv:
        cfg = load_config("tiny", _sets(srv.url, models))
        root = str(tmp_path / "run")
        run_local(cfg, root, only=["sketch"], log=lambda m: None)
    store = StageStore(root, "sketch", resolve_keys(cfg)["sketch"])
    rows = _context_rows(store)
    assert len(rows) == 15
    got = [(r["status"], r["reason"]) for r in rows[: len(SCRIPT)]]
    assert got == [(s, r) for _, s, r in SCRIPT]
    assert all(r["status"] == "kept" for r in rows[len(SCRIPT):])
    assert all(r["text"] for r in rows if r["status"] == "kept")  # never an empty success
    echo = rows[8]["error"]
    assert "HTTP 400" in echo and KEY not in echo and "***" in echo
    assert srv.log[0]["auth"] == f"Bearer {KEY}"
    assert main(["verify", root]) == 0


def test_endpoint_down_for_good_fails_the_shard_then_resumes(tmp_path, models):
    with FaultServer(default="500") as srv:
        cfg = load_config("tiny", _sets(srv.url, models))
        root = str(tmp_path / "run")
        with pytest.raises(RetryableError, match=r"127\.0\.0\.1.*HTTP 500.*counts as down"):
            run_local(cfg, root, only=["sketch"], log=lambda m: None)
        store = StageStore(root, "sketch", resolve_keys(cfg)["sketch"])
        assert not store.is_complete()
        plans = [store.read_json(store.path("plans", f"{i:06d}.json")) for i in range(2)]
        ctx_shard = [i for i, p in enumerate(plans) if p[0]["kind"] == "context"][0]
        assert ctx_shard not in store.shard_indices()  # no row recorded for a passing outage
        srv.default = "ok"  # the endpoint recovers: the same run resumes and completes
        run_local(cfg, root, only=["sketch"], log=lambda m: None)
    assert store.is_valid()
    assert all(r["status"] == "kept" for r in _context_rows(store))


def _files_containing(folder: Path, needles: list[str]) -> list[str]:
    hits = []
    for p in folder.rglob("*"):
        if not p.is_file() or p.is_symlink():
            continue
        data = p.read_bytes()
        texts = [data]
        if p.suffix == ".parquet":
            texts.append(str(pq.read_table(p).to_pylist()).encode())
        if any(n.encode() in t for n in needles for t in texts):
            hits.append(str(p))
    return hits


def test_planted_key_never_reaches_outputs_logs_or_prefect(tmp_path, models):
    """The key (env var) and a URL password (preset file) go to the endpoint and nowhere else."""
    actions = ["ok", "echo", "ok", "echo", "429", "ok"]
    with FaultServer(actions, default="ok") as srv:
        url = srv.url.replace("http://", f"http://alice:{PASSWORD}@")
        tree = yaml.safe_load(Path("deploy/presets/tiny.yaml").read_text())
        tree["models"]["mllm"].update(backend="openai", name="faulty-llava", base_url=url,
                                      api_key_env="SYNTHOOD_PLANTED_KEY")
        tree["models"]["endpoint"] = {"timeout": 2.0, "max_retries": 2, "backoff_initial": 0.01, "backoff_max": 0.05}
        tree["sketch"].update(far_labels=0, near_per_class=0, sources_per_class=2, lexicon_limit=200)
        preset = tmp_path / "secret-preset.yaml"
        preset.write_text(yaml.safe_dump(tree))
        out = tmp_path / "run"
        env = {**os.environ, "SYNTHOOD_PLANTED_KEY": KEY}
        proc = subprocess.run(
            [sys.executable, "-m", "flows.cli", "run", "--preset", str(preset), "--out", str(out),
             "--only", "sketch", "--set", f"models.cache_dir={models}"],
            capture_output=True, text=True, env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert any(e["auth"] == f"Bearer {KEY}" for e in srv.log)
        assert [e["action"] for e in srv.log].count("echo") == 2
    needles = [KEY, PASSWORD]
    assert not [n for n in needles if n in proc.stdout + proc.stderr]
    assert not _files_containing(out, needles)
    rows = [r for p in out.rglob("manifests/*.parquet") for r in pq.read_table(p).to_pylist()]
    assert sum(r["reason"] == "http_400" for r in rows) == 2  # the echoes were recorded, scrubbed
    assert "alice:***@" in (out / "_runs" / "latest.json").read_text() or "***@" in (out / "_runs" / "latest.json").read_text()
    # Prefect's database (logs, artifacts, flow and task runs) and its result storage
    prefect_home = Path(os.environ["PREFECT_HOME"])
    results = Path(os.environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"])
    db_bytes = b"".join(p.read_bytes() for p in prefect_home.rglob("*") if p.is_file())
    assert b"synth-ood-sketch" in db_bytes  # the stage's artifact is there to be searched
    assert not _files_containing(prefect_home, needles)
    assert not results.exists() or not _files_containing(results, needles)

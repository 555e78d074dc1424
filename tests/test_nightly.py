"""The nightly deployment on a real local Prefect server: each night a new round, sketch reused, old rounds pruned."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ood_core.pipeline import read_run_record
from ood_core.rounds import ROUND_STAGES, list_rounds
from ood_core.storage import StageStore
from tests.test_deployment import BIN, ROOT, _api, prefect, server  # noqa: F401 - `server` is the fixture

pytestmark = pytest.mark.slow
# fewer diffusion steps and noise-optimisation rounds: the same stages and folders, less CPU time
SHRINK = {"generate.steps": 1, "generate.rounds": 1, "generate.t2i_steps": 1}


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.rglob("*") if p.is_file()}


def _cli(capsys, *args: str) -> str:
    """``synth-ood <args>`` in this process (a subprocess exit may hit pyarrow's rare abort at shutdown)."""
    from flows.cli import main

    capsys.readouterr()
    code = main(list(args))
    captured = capsys.readouterr()
    assert code == 0, captured.out + captured.err
    return captured.out


@pytest.mark.e2e
def test_two_nights_make_a_new_round_reuse_sketch_and_keep_last_prunes(server, tmp_path, capsys):  # noqa: F811
    env = server
    subprocess.run([str(BIN / "prefect"), "work-pool", "create", "cpu-pool", "--type", "process"],
                   env=env, cwd=ROOT, capture_output=True, timeout=120)  # may exist from another test
    prefect(env, "--no-prompt", "deploy", "--prefect-file", "deploy/prefect.yaml", "--name", "tiny-nightly")
    deployment = _api(env, "/deployments/name/synth-ood/tiny-nightly")
    assert deployment["parameters"]["round"] == "@date" and deployment["parameters"]["keep_last"] == 2
    assert deployment["global_concurrency_limit"]["limit"] == 1  # a night never overlaps the previous one
    out = tmp_path / "out"
    overrides = {"models.cache_dir": str(tmp_path / "models"), **SHRINK}
    params = ["-p", f"out={out}", "-p", "overrides=" + json.dumps(overrides)]
    worker = subprocess.Popen(
        [str(BIN / "prefect"), "worker", "start", "--pool", "cpu-pool"],
        env=env, cwd=ROOT, stdout=open(tmp_path / "worker.log", "w"), stderr=subprocess.STDOUT,
    )
    try:
        # night 1: the deployment's own round, "@date" -> the run's UTC date
        prefect(env, "deployment", "run", "synth-ood/tiny-nightly", *params, "--watch", timeout=900)
        first = read_run_record(str(out))
        night1 = first["config"]["generate"]["round"]
        today = datetime.now(UTC).date()
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", night1)
        assert night1 in {today.isoformat(), (today - timedelta(days=1)).isoformat()}
        assert f"rounds: {night1} (latest run)" in _cli(capsys, "status", str(out))
        sketch = _files(out / "sketch")
        tar1 = (out / "generate" / first["keys"]["generate"] / "shards" / "000000.tar").read_bytes()

        # night 2: a new round, keeping only the latest
        prefect(env, "deployment", "run", "synth-ood/tiny-nightly", *params, "-p", "round=2099-01-02",
                "-p", "keep_last=1", "--watch", timeout=900)

        # one stage of a round whose generate is missing, as a user types it: fails at once, naming it
        folders = sorted(str(p) for p in out.glob("*/*"))
        rerun = subprocess.run(
            [str(BIN / "prefect"), "deployment", "run", "synth-ood/tiny-nightly", *params, "-p", "round=2099-01-03",
             "-p", 'only=["elaborate"]', "--watch"], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert rerun.returncode != 0, rerun.stdout
        runs = _api(env, "/flow_runs/filter", {"flow_runs": {"deployment_id": {"any_": [deployment["id"]]}},
                                               "sort": "EXPECTED_START_TIME_DESC", "limit": 1})
        assert runs[0]["state_type"] == "FAILED" and runs[0]["parameters"]["only"] == ["elaborate"]
        assert "stage 'elaborate' needs 'generate'" in runs[0]["state"]["message"], runs[0]["state"]["message"]
        assert sorted(str(p) for p in out.glob("*/*")) == folders  # nothing written, no round recorded
    finally:
        worker.terminate()
        worker.wait(timeout=60)
    second = read_run_record(str(out))
    assert second["config"]["generate"]["round"] == "2099-01-02"
    assert second["keys"]["sketch"] == first["keys"]["sketch"]
    assert _files(out / "sketch") == sketch  # sketch reused: not one file rewritten
    tar2 = (out / "generate" / second["keys"]["generate"] / "shards" / "000000.tar").read_bytes()
    assert second["keys"]["generate"] != first["keys"]["generate"] and tar2 != tar1  # new images

    # keep_last 1 pruned night 1's folders; night 2's are complete
    for stage in ROUND_STAGES:
        assert first["keys"][stage] != second["keys"][stage]
        assert not (out / stage / first["keys"][stage]).exists(), f"{stage} of {night1} not pruned"
        assert StageStore(str(out), stage, second["keys"][stage]).is_complete()
    assert [r["round"] for r in list_rounds(str(out))] == ["2099-01-02"]
    assert "rounds: 2099-01-02 (latest run)" in _cli(capsys, "status", str(out))
    assert "consistent" in _cli(capsys, "verify", str(out))

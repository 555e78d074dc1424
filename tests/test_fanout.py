"""Fan-out pieces that need no server: chunking, parameter checks, artifact keys outside deployments."""

from __future__ import annotations

import datetime

import pytest

from flows.fanout import FAN_OUT_STAGES, chunked, run_chunks
from ood_core.pipeline import STAGE_ORDER


def test_chunks_cover_every_pending_shard_once_in_order():
    pending = [0, 2, 3, 5, 8, 9, 10]
    chunks = chunked(pending, 3)
    assert chunks == [[0, 2, 3], [5, 8, 9], [10]]
    assert [i for c in chunks for i in c] == pending
    with pytest.raises(ValueError, match="chunk_size"):
        chunked(pending, 0)


def test_bad_in_flight_limit_is_named():
    with pytest.raises(ValueError, match="max_in_flight"):
        run_chunks("synth-ood-shards/tiny-shards", "generate", {}, [[0]], 0)


def test_gpu_stages_fan_out_and_sketch_does_not():
    assert set(FAN_OUT_STAGES) == {"generate", "elaborate", "finetune"}


def test_artifact_keys_differ_per_output_root_and_are_valid_prefect_keys():
    import re

    from tasks.stage_tasks import artifact_key

    a, b = artifact_key("finetune", "s3://synth-ood/imagenet"), artifact_key("finetune", "/data/runs/imagenet")
    assert a.startswith("synth-ood-finetune-imagenet-") and a != b
    assert artifact_key("finetune", "/tmp/x/") == artifact_key("finetune", "/tmp/x")
    for key in (a, b, artifact_key("generate", "/tmp/Runs With Spaces/ÜBER")):
        assert re.fullmatch(r"[a-z0-9-]+", key) and "--" not in key, key


class _FakePrefect:
    """run_deployment and a sync client over scripted chunk runs: ``{name: [state per attempt]}``."""

    def __init__(self, script):
        import uuid

        self.script, self.runs, self.submitted, self.forced, self.uuid = script, {}, [], [], uuid

    def run_deployment(self, deployment, parameters, timeout, flow_run_name, tags, idempotency_key=None):
        from types import SimpleNamespace

        base = flow_run_name.split("-resubmit")[0]
        attempt = sum(n.split("-resubmit")[0] == base for n in self.submitted)
        self.submitted.append(flow_run_name)
        # every run started two minutes ago (a Running one has sent no heartbeat since)
        started = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=120)
        run = SimpleNamespace(id=self.uuid.uuid4(), state=self.script[base][attempt](), start_time=started)
        self.runs[run.id] = run
        return run

    def __call__(self, sync_client=True):  # get_client
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_flow_run(self, run_id):
        return self.runs[run_id]

    def request(self, method, path, json):  # the heartbeat query: none ever came
        from types import SimpleNamespace

        return SimpleNamespace(raise_for_status=lambda: None, json=lambda: {"events": []})

    def set_flow_run_state(self, run_id, state, force):
        self.forced.append((run_id, state.name))
        self.runs[run_id].state = state


def test_a_crashed_or_silent_chunk_is_submitted_again_once_and_a_failed_one_is_not(monkeypatch):
    import prefect.client.orchestration
    import prefect.deployments
    from prefect.states import Completed, Crashed, Failed, Running

    fake = _FakePrefect({
        "generate-000000-000000": [Crashed, Completed],
        "generate-000001-000001": [Running, Completed],  # silent: its worker died
        "generate-000002-000002": [Failed],             # its own flow retries already ran
        "generate-000003-000003": [Crashed, Crashed],   # bounded: one resubmission
    })
    monkeypatch.setattr(prefect.deployments, "run_deployment", fake.run_deployment)
    monkeypatch.setattr(prefect.client.orchestration, "get_client", fake)
    lines = []
    with pytest.raises(RuntimeError) as err:
        run_chunks("synth-ood-shards/tiny-shards", "generate", {}, [[0], [1], [2], [3]], 2, lines.append,
                   poll_seconds=0, resubmit_delay=0, stale_seconds=60)
    assert sorted(fake.submitted) == sorted([
        "generate-000000-000000", "generate-000000-000000-resubmit1",
        "generate-000001-000001", "generate-000001-000001-resubmit1",
        "generate-000002-000002",
        "generate-000003-000003", "generate-000003-000003-resubmit1",
    ])
    assert [name for _, name in fake.forced] == ["Crashed"]  # the silent chunk
    assert any("sent no heartbeat" in ln and "generate-000001-000001" in ln for ln in lines)
    msg = str(err.value)
    assert "2 chunk run(s) did not complete" in msg
    assert "generate-000002-000002: Failed" in msg and "generate-000003-000003-resubmit1: Crashed" in msg


def _http_error(status: int):
    import httpx

    request = httpx.Request("POST", "http://127.0.0.1:4200/api/deployments/x/create_flow_run")
    return httpx.HTTPStatusError(f"{status}", request=request, response=httpx.Response(status, request=request))


def _flaky(fn, errors: list):
    """``fn`` that first raises each of ``errors`` in turn (one per call)."""
    def call(*args, **kwargs):
        if errors:
            raise errors.pop(0)
        return fn(*args, **kwargs)

    return call


def test_a_503_while_creating_or_reading_a_chunk_run_is_retried_with_backoff(monkeypatch):
    import httpx
    import prefect.client.orchestration
    import prefect.deployments
    from prefect.states import Completed

    fake = _FakePrefect({"generate-000000-000000": [Completed]})
    monkeypatch.setattr(prefect.deployments, "run_deployment", _flaky(fake.run_deployment, [_http_error(503)]))
    monkeypatch.setattr(fake, "read_flow_run", _flaky(fake.read_flow_run, [httpx.ConnectError("refused")]))
    monkeypatch.setattr(prefect.client.orchestration, "get_client", fake)
    lines = []
    ran = run_chunks("synth-ood-shards/tiny-shards", "generate", {}, [[0]], 1, lines.append, poll_seconds=0,
                     api_backoff=0)
    assert ran == {"generate-000000-000000": [0]}
    assert fake.submitted == ["generate-000000-000000"]  # created once, not once per attempt
    retried = [ln for ln in lines if "retrying in" in ln]
    assert len(retried) == 2 and "creating chunk run generate-000000-000000" in retried[0], lines
    assert "reading the state of chunk run" in retried[1]


@pytest.mark.parametrize("errors, attempts", [([_http_error(503)] * 9, "after 5 attempts"), ([_http_error(403)], "")])
def test_an_api_call_that_keeps_failing_fails_the_run_naming_the_call(monkeypatch, errors, attempts):
    import prefect.client.orchestration
    import prefect.deployments
    from prefect.states import Completed

    fake = _FakePrefect({"generate-000000-000000": [Completed]})
    monkeypatch.setattr(prefect.deployments, "run_deployment", _flaky(fake.run_deployment, list(errors)))
    monkeypatch.setattr(prefect.client.orchestration, "get_client", fake)
    with pytest.raises(RuntimeError) as err:
        run_chunks("synth-ood-shards/tiny-shards", "generate", {}, [[0]], 1, lambda m: None, poll_seconds=0,
                   api_backoff=0)
    msg = str(err.value)
    assert "creating chunk run generate-000000-000000 of deployment synth-ood-shards/tiny-shards" in msg
    assert attempts in msg and ("after" in msg) == bool(attempts)  # a 403 is not retried


def test_a_fan_out_parent_plans_every_gpu_stage_without_loading_its_models(tmp_path, monkeypatch):
    import flows.synth_ood as F

    planned = {}

    def plan(stage, cfg, out, keys, force=False, load_models=True):
        planned[stage] = load_models
        return 1

    monkeypatch.setattr(F, "preflight_task", lambda cfg, out: [])
    monkeypatch.setattr(F, "prepare_run_task", lambda cfg, out, only, force: ({}, list(STAGE_ORDER), []))
    monkeypatch.setattr(F, "plan_task", plan)
    monkeypatch.setattr(F, "slot_check_task", lambda stage: {})
    monkeypatch.setattr(F, "_fan_out_stage", lambda *a, **k: {})
    monkeypatch.setattr(F, "shard_task", lambda *a, **k: {})
    monkeypatch.setattr(F, "pending_shards_task", lambda *a, **k: {"pending": [0], "complete": False})
    monkeypatch.setattr(F, "finalize_task", lambda *a, **k: {})
    F.synth_ood.fn(preset="tiny", out=str(tmp_path), fan_out="synth-ood-shards/tiny-shards")
    assert planned == {s: s not in FAN_OUT_STAGES for s in STAGE_ORDER}
    planned.clear()
    F.synth_ood.fn(preset="tiny", out=str(tmp_path))
    assert planned == {s: True for s in STAGE_ORDER}

"""Fan-out pieces that need no server: chunking, parameter checks, artifact keys outside deployments."""

from __future__ import annotations

import datetime

import pytest

from flows.fanout import FAN_OUT_STAGES, chunked, run_chunks


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


def test_artifact_key_outside_a_deployment_is_the_stage_key():
    from tasks.stage_tasks import artifact_key

    assert artifact_key("finetune") == "synth-ood-finetune"


class _FakePrefect:
    """run_deployment and a sync client over scripted chunk runs: ``{name: [state per attempt]}``."""

    def __init__(self, script):
        import uuid

        self.script, self.runs, self.submitted, self.forced, self.uuid = script, {}, [], [], uuid

    def run_deployment(self, deployment, parameters, timeout, flow_run_name, tags):
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

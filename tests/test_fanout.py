"""Fan-out pieces that need no server: chunking, parameter checks, artifact keys outside deployments."""

from __future__ import annotations

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

"""A retry of a run started with ``force`` (issue 18, item 1): ``force`` deletes a stage's folder
once per flow run, so a retry reuses what the first attempt already recomputed."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from ood_core.pipeline import clear_forced_stage  # noqa: E402
from ood_core.storage import StageStore  # noqa: E402
from tests.test_batching import _overrides  # noqa: E402


def _finished_store(root, key="k") -> StageStore:
    store = StageStore(str(root), "generate", key)
    store.write_json(store.path("stats", "000000.json"), {"rows": 1})
    store.write_success({"shards": 1})
    return store


def test_force_clears_once_per_run_and_again_for_another_run(tmp_path):
    store = _finished_store(tmp_path)
    assert clear_forced_stage(store, "run-1") and not store.is_complete()
    _finished_store(tmp_path)  # what the first attempt recomputed
    assert not clear_forced_stage(store, "run-1") and store.is_complete()  # its retry keeps it
    assert clear_forced_stage(store, "run-2") and not store.is_complete()  # a new run forces again
    _finished_store(tmp_path)
    assert clear_forced_stage(store, None) and not store.is_complete()  # no run id: always


@pytest.mark.slow
def test_a_flow_retry_of_a_forced_run_reuses_the_shards_its_first_attempt_wrote(tmp_path, monkeypatch):
    """Real Prefect (local API): the first attempt fails after generate is done; the retry (same flow
    run, ``run_count`` 2) must not delete and recompute generate."""
    import tasks.stage_tasks as T
    from flows.synth_ood import synth_ood
    from ood_core.config import load_config
    from ood_core.pipeline import resolve_keys

    overrides = _overrides(str(tmp_path / "models"))
    root = tmp_path / "run"
    keys = resolve_keys(load_config("tiny", overrides))
    tar = root / "generate" / keys["generate"] / "shards" / "000000.tar"
    seen = []
    real_publish = T._publish

    def publish_then_fail_once(stage, store, info):
        real_publish(stage, store, info)
        if stage == "generate" and not seen:
            seen.append((os.stat(tar).st_ino, os.stat(tar).st_mtime_ns))
            raise RuntimeError("the node went away")  # after generate's _SUCCESS.json

    monkeypatch.setattr(T, "_publish", publish_then_fail_once)
    flow = synth_ood.with_options(retries=1, retry_delay_seconds=0)
    flow(preset="tiny", out=str(root), only=["sketch", "generate"], force=["generate"], overrides=overrides)
    assert seen, "the first attempt did not reach the failure"
    assert (os.stat(tar).st_ino, os.stat(tar).st_mtime_ns) == seen[0]  # not deleted and written again

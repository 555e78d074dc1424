"""Errors name the bad input and what to check."""

import pytest

from ood_core.config import load_config
from ood_core.pipeline import StageNotReady, run_local


def test_unloadable_model_fails_the_stage_naming_the_model(tmp_path):
    cfg = load_config("tiny", {"models.cache_dir": str(tmp_path / "m"), "models.mllm.name": str(tmp_path / "nope")})
    with pytest.raises(RuntimeError) as err:
        run_local(cfg, str(tmp_path / "run"), only=["sketch"], log=lambda m: None)
    msg = str(err.value)
    assert "mllm" in msg and str(tmp_path / "nope") in msg and "models.mllm" in msg
    assert not list((tmp_path / "run").glob("sketch/*/_SUCCESS.json"))


def test_only_downstream_stage_without_upstream_names_the_missing_stage(tmp_path):
    cfg = load_config("tiny", {"models.cache_dir": str(tmp_path / "m")})
    with pytest.raises(StageNotReady, match="'finetune' needs 'sketch'"):
        run_local(cfg, str(tmp_path / "run"), only=["finetune"], log=lambda m: None)


def test_missing_imagefolder_names_the_folder(tmp_path):
    cfg = load_config("tiny", {"data.id_source": "imagefolder", "data.root": str(tmp_path / "imagenet")})
    from ood_core.preflight import PreflightError

    # found by the preflight now, before any model load (it was a DataError from the first stage)
    with pytest.raises(PreflightError, match=r"imagenet/train does not exist.*set data.root"):
        run_local(cfg, str(tmp_path / "run"), only=["sketch"], log=lambda m: None)


def test_passing_failure_fails_the_shard_instead_of_recording_a_failed_row(tmp_path, monkeypatch):
    from ood_core.models import RetryableError
    from ood_core.stages.sketch import SketchStage
    from ood_core.storage import StageStore

    def endpoint_down(self, ctx, out, item, key):
        raise RetryableError("MLLM endpoint http://127.0.0.1:9/v1 failed: ConnectError")

    monkeypatch.setattr(SketchStage, "_context", endpoint_down)
    cfg = load_config("tiny", {"models.cache_dir": str(tmp_path / "m")})
    with pytest.raises(RetryableError, match="ConnectError"):
        run_local(cfg, str(tmp_path / "run"), only=["sketch"], log=lambda m: None)
    from ood_core.pipeline import resolve_keys

    store = StageStore(str(tmp_path / "run"), "sketch", resolve_keys(cfg)["sketch"])
    n = store.read_json(store.path("plan.json"))["shards"]
    context_shards = [i for i in range(n) if store.read_json(store.path("plans", f"{i:06d}.json"))[0]["kind"] == "context"]
    assert context_shards and not set(context_shards) & set(store.shard_indices())
    monkeypatch.undo()
    run_local(cfg, str(tmp_path / "run"), only=["sketch"], log=lambda m: None)
    assert store.is_valid()


def test_flow_with_only_on_missing_upstream_fails_at_once_naming_it(tmp_path):
    """`-p only='["elaborate"]'` on a root without generate's folder: the flow fails before any work."""
    from flows.synth_ood import synth_ood
    from ood_core.pipeline import resolve_keys
    from ood_core.storage import StageStore

    out = tmp_path / "run"
    overrides = {"models.cache_dir": str(tmp_path / "m")}
    sketch = StageStore(str(out), "sketch", resolve_keys(load_config("tiny", overrides))["sketch"])
    sketch.write_json(sketch.success_path(), {})  # sketch done, generate missing
    with pytest.raises(StageNotReady) as err:
        synth_ood.fn(preset="tiny", out=str(out), only=["elaborate"], overrides=overrides)
    msg = str(err.value)
    assert "stage 'elaborate' needs 'generate'" in msg and str(out / "generate") in msg
    assert """-p only='["generate", "elaborate"]'""" in msg
    assert sorted(p.name for p in out.iterdir()) == ["sketch"]  # no preflight, run record or stage folder

"""Resume after a crash, with the plain runner (the stage logic, without Prefect)."""

from __future__ import annotations

import pytest

from flows.cli import main
from ood_core.config import load_config
from ood_core.pipeline import resolve_keys, run_local
from ood_core.stages.generate import GenerateStage
from ood_core.storage import StageStore

pytestmark = pytest.mark.slow


def test_crash_mid_stage_keeps_finished_shards_and_resumes(tmp_path, monkeypatch, capsys):
    cfg = load_config("tiny", {"models.cache_dir": str(tmp_path / "models"), "generate.shard_size": "4"})
    root = str(tmp_path / "run")
    real = GenerateStage.run_shard

    def crash_on_second_shard(self, ctx, shard):
        if shard.index == 1:
            raise KeyboardInterrupt("simulated kill")
        return real(self, ctx, shard)

    monkeypatch.setattr(GenerateStage, "run_shard", crash_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        run_local(cfg, root, only=["sketch", "generate"], log=lambda m: None)
    store = StageStore(root, "generate", resolve_keys(cfg)["generate"])
    assert store.shard_indices() == [0] and not store.is_complete()
    assert main(["status", root]) == 0
    status = capsys.readouterr().out
    assert "sketch     done" in status and "generate   partial" in status and "finetune   missing" in status
    assert "1/" in status.split("generate", 1)[1].splitlines()[0]
    first = store.shard_paths(0)
    stamps = {k: (tmp_path / p).stat().st_mtime_ns for k, p in first.items()}

    monkeypatch.setattr(GenerateStage, "run_shard", real)
    run_local(cfg, root, only=["sketch", "generate"], log=lambda m: None)
    assert store.is_valid()
    assert {k: (tmp_path / p).stat().st_mtime_ns for k, p in first.items()} == stamps
    assert len(store.shard_indices()) == store.read_json(store.path("plan.json"))["shards"]


def test_new_training_setting_reuses_the_feature_cache(tmp_path, monkeypatch):
    from ood_core.stages.finetune import FinetuneStage

    models = str(tmp_path / "models")
    root = str(tmp_path / "run")
    cfg = load_config("tiny", {"models.cache_dir": models})
    run_local(cfg, root, log=lambda m: None)

    def no_feature_extraction(self, ctx, shard):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(FinetuneStage, "run_shard", no_feature_extraction)
    # the Multi-OS objective: a training setting, so the CLIP feature cache is reused
    new = load_config("tiny", {"models.cache_dir": models, "finetune.loss": "ce+contrastive"})
    old_key, new_key = resolve_keys(cfg)["finetune"], resolve_keys(new)["finetune"]
    assert old_key != new_key
    logs: list[str] = []
    results = run_local(new, root, log=logs.append)
    old_store, new_store = StageStore(root, "finetune", old_key), StageStore(root, "finetune", new_key)
    assert new_store.is_valid()
    assert new_store.shard_stats(0)["tar_sha256"] == old_store.shard_stats(0)["tar_sha256"]
    assert results["finetune"]["summary"]["train"]["adapter_loss"] != old_store.read_success()["summary"]["train"][
        "adapter_loss"
    ]
    # a setting the features depend on is not shared
    other = load_config("tiny", {"models.cache_dir": models, "data.image_size": "48"})
    with pytest.raises(AssertionError, match="features were recomputed"):
        run_local(other, str(tmp_path / "run"), only=None, log=lambda m: None)

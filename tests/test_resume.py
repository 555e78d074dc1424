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
    assert len(store.shard_indices()) == len(store.read_json(store.path("plan.json")))

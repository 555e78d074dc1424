"""Finetune on text-to-image samples only (``finetune.synthetic_kinds`` without ``boundary``): those
samples have no source ID image, so SynOOD's adapter pairs with the whole ID train split."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

from ood_core.config import load_config  # noqa: E402
from ood_core.pipeline import run_local  # noqa: E402
from tests.test_batching import _overrides  # noqa: E402


def test_text_to_image_samples_alone_train_and_score_every_method(tmp_path):
    cfg = load_config("tiny", _overrides(str(tmp_path / "models"), **{"finetune.synthetic_kinds": "[far]"}))
    logs: list[str] = []
    results = run_local(cfg, str(tmp_path / "run"), log=logs.append)
    summary = results["finetune"]["summary"]
    assert any("trains on the whole ID train split" in m for m in logs), logs
    assert {"mcm", "neglabel", "synood"} <= set(summary["metrics"])
    assert summary["train"]["samples"] > 0

"""Finetune on text-to-image samples only (``finetune.synthetic_kinds`` without ``boundary``): those
samples have no source ID image, so SynOOD's adapter pairs with the whole ID train split."""

from __future__ import annotations

import io
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from ood_core.config import load_config  # noqa: E402
from ood_core.pipeline import resolve_keys, run_local  # noqa: E402
from ood_core.storage import StageStore  # noqa: E402
from tests.test_batching import _overrides  # noqa: E402


def test_text_to_image_samples_alone_train_and_score_every_method(tmp_path):
    cfg = load_config("tiny", _overrides(str(tmp_path / "models"), **{"finetune.synthetic_kinds": "[far]"}))
    logs: list[str] = []
    results = run_local(cfg, str(tmp_path / "run"), log=logs.append)
    summary = results["finetune"]["summary"]
    assert any("trains on the whole ID train split" in m for m in logs), logs
    assert {"mcm", "neglabel", "synood"} <= set(summary["metrics"])
    assert summary["train"]["samples"] > 0


def test_noise_control_trains_on_noise_images_paired_with_their_sources(tmp_path):
    over = _overrides(str(tmp_path / "models"), **{"generate.noise_per_source": "2",
                                                    "finetune.synthetic_kinds": "[noise]"})
    cfg = load_config("tiny", over)
    results = run_local(cfg, str(tmp_path / "run"), log=lambda m: None)
    keys = resolve_keys(cfg)
    gen = StageStore(str(tmp_path / "run"), "generate", keys["generate"])
    rows = gen.read_manifest().to_pylist()
    boundary = {r["source_key"] for r in rows if r["kind"] == "boundary"}
    noise = [r for r in rows if r["kind"] == "noise"]
    assert len(noise) == 2 * len(boundary) and {r["source_key"] for r in noise} == boundary
    assert all(r["status"] == "ok" and r["prompt_id"] == "noise" for r in noise)
    images = {k: np.asarray(Image.open(io.BytesIO(f["png"]))) for k, f in gen.iter_samples()}
    assert len({images[r["key"]].tobytes() for r in noise}) == len(noise)  # each its own seed
    kept = [r for r in StageStore(str(tmp_path / "run"), "elaborate", keys["elaborate"]).read_manifest().to_pylist()
            if r["status"] == "kept"]
    summary = results["finetune"]["summary"]
    # the adapter trained on the kept noise images only, not on the boundary samples
    assert summary["train"]["synthetic"] == sum(r["kind"] == "noise" for r in kept) > 0
    assert summary["train"]["samples"] == 2 * summary["train"]["synthetic"]  # each paired with its source

    # noise off (the default): its own generate folder, no noise rows, the same boundary samples
    plain = load_config("tiny", _overrides(str(tmp_path / "models")))
    assert resolve_keys(plain)["generate"] != keys["generate"]
    run_local(plain, str(tmp_path / "run"), only=["sketch", "generate"], log=lambda m: None)
    other = StageStore(str(tmp_path / "run"), "generate", resolve_keys(plain)["generate"])
    assert {r["kind"] for r in other.read_manifest().to_pylist()} == {r["kind"] for r in rows} - {"noise"}
    plain_images = {k: f["png"] for k, f in other.iter_samples()}
    assert all(plain_images[r["key"]] == dict(gen.iter_samples())[r["key"]]["png"] for r in rows
               if r["kind"] == "boundary")

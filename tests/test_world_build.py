"""`synth-ood world build --recipe/--device`: a recipe is data (a settings dict in the trainer's
RECIPES), it reaches the trainer and its record, and a folder built with another recipe is not
"up to date" for a build that asks for this one."""

from __future__ import annotations

import json
import shutil

import pytest

from ood_core.world import build as B
from ood_core.world import train_diffusion as D
from ood_core.world import weights as W


def test_a_registered_recipe_trains_and_is_recorded(tmp_path, monkeypatch):
    smoke = {**D.SETTINGS, "images": 120, "vae_steps": 2, "t2i_steps": 2, "inpaint_steps": 2, "batch": 4,
             "vae_batch": 4, "warmup_steps": 1, "eval_per_concept": 1}  # fmt: skip
    monkeypatch.setitem(D.RECIPES, "smoke", smoke)
    # the diffusion models are judged by the CLIP of the world being built
    shutil.copytree(W.WEIGHTS_DIR / "clip", tmp_path / "clip")
    records = B.build_world(tmp_path, only=["diffusion"], recipe="smoke", progress=False)

    for model in ("sd-t2i", "sd-inpaint"):
        W.verify(tmp_path / model, model)
        record = json.loads((tmp_path / model / W.RECORD).read_text())
        assert record == records[model]
        assert (record["recipe"], record["device"]) == ("smoke", "cpu")
        assert record["settings"]["t2i_steps"] == 2 and record["settings"]["images"] == 120
        assert "--recipe smoke" in record["command"]
        assert set(record["competence"]) >= {"recognised", "eval_seconds"}
        assert B.up_to_date(tmp_path, model, 0, "smoke")
        assert not B.up_to_date(tmp_path, model, 0, "cpu")
        assert B.up_to_date(tmp_path, model, 0)  # no recipe asked: the seed decides
    # the shipped folders were built by the default recipe (recorded as such or before recipes existed)
    assert B.up_to_date(W.WEIGHTS_DIR, "sd-t2i", 0, "cpu")


def test_an_unknown_recipe_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown diffusion recipe 'nope'.*cpu, gpu"):
        D.build(tmp_path, recipe="nope", progress=False)

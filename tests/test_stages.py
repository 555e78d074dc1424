"""Stage options exercised through the stage code (plain runner, tiny models)."""

import pytest

from ood_core.config import load_config
from ood_core.pipeline import resolve_keys, run_local
from ood_core.storage import StageStore

pytestmark = pytest.mark.slow


def test_box_mask_generates_every_candidate(tmp_path):
    # (multi_os rejects its candidates outside the blank areas: not this test's kind)
    off = "{blank: 0, interpolations: 0, llm_interpolations: 0, counterfactuals: 0}"
    cfg = load_config("tiny", {"models.cache_dir": str(tmp_path / "m"), "generate.mask": "box",
                               "generate.multi_os": off})
    results = run_local(cfg, str(tmp_path / "run"), only=["sketch", "generate"], log=lambda m: None)
    assert results["generate"]["counts"] == {"ok": {"ok": results["generate"]["rows"]}}
    store = StageStore(str(tmp_path / "run"), "generate", resolve_keys(cfg)["generate"])
    assert store.read_manifest().num_rows == results["generate"]["rows"] > 0


def test_energy_scale_is_part_of_the_generate_key():
    a = resolve_keys(load_config("tiny"))
    b = resolve_keys(load_config("tiny", {"finetune.logit_scale": "50"}))
    assert a["sketch"] == b["sketch"] and a["generate"] != b["generate"]
    c = resolve_keys(load_config("tiny", {"models.device": "cuda", "models.cache_dir": "/elsewhere"}))
    assert c == a  # where models run and are cached does not change any output folder


def test_forcing_a_stage_forces_every_stage_that_reads_it():
    from ood_core.pipeline import selected_stages

    assert selected_stages(None, ["generate"])[1] == {"generate", "elaborate", "finetune"}
    assert selected_stages(None, ["finetune"])[1] == {"finetune"}
    assert selected_stages(None, ["sketch"])[1] == {"sketch", "generate", "elaborate", "finetune"}
    # only limits what runs, not what force means: a stage that does not run is not cleared
    assert selected_stages(["generate"], ["generate"]) == (["generate"], {"generate", "elaborate", "finetune"})

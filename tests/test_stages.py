"""Stage options exercised through the stage code (plain runner, tiny models)."""

import pytest

from ood_core.config import load_config
from ood_core.pipeline import resolve_keys, run_local
from ood_core.storage import StageStore

pytestmark = pytest.mark.slow


def test_box_mask_generates_every_candidate(tmp_path):
    cfg = load_config("tiny", {"models.cache_dir": str(tmp_path / "m"), "generate.mask": "box"})
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


def test_finetune_caches_features_only_for_the_records_it_reads(tmp_path):
    """Train has 6 images per class, sketch picks 1 source each: only those sources (and the ID test
    split, the OOD sets, the kept synthetic images) get a cached feature."""
    from ood_core.data import load_id_dataset
    from ood_core.stages.elaborate import read_cross_shard_duplicates
    from tests.test_batching import _overrides

    cfg = load_config("tiny", _overrides(str(tmp_path / "models")))
    root = str(tmp_path / "run")
    summary = run_local(cfg, root, log=lambda m: None)["finetune"]["summary"]
    assert {"neglabel", "synood"} <= set(summary["metrics"])
    keys = resolve_keys(cfg)
    elaborate = StageStore(root, "elaborate", keys["elaborate"])
    dups = read_cross_shard_duplicates(elaborate)
    kept = [r for r in elaborate.read_manifest().to_pylist() if r["status"] == "kept" and r["key"] not in dups]
    rows = StageStore(root, "finetune", keys["finetune"]).read_manifest().to_pylist()
    by_role: dict[str, set[str]] = {}
    for r in rows:
        by_role.setdefault(r["role"], set()).add(r["key"])
    data = load_id_dataset(cfg.data, cfg.seed)
    train = {r.key for r in data.records if r.split == "train"}
    sources = {r["source_key"] for r in kept if r["source_key"] in train}
    assert sources and len(sources) < len(train)
    assert by_role["id_train"] == sources
    assert by_role["id_test"] == {r.key for r in data.records if r.split == "test"}
    assert by_role["synthetic"] == {r["key"] for r in kept}
    assert {r for r in by_role if r.startswith("ood:")} == {f"ood:{n}" for n in cfg.data.ood_sets}
    # the adapter trained on the boundary images (finetune.synthetic_kinds) paired with their sources
    assert summary["train"]["samples"] == 2 * sum(r["kind"] == "boundary" for r in kept)

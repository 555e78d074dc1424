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


def test_eoe_label_sets_are_shards_of_their_own(tmp_path):
    """sketch.far_label_sets = 3: three far conversations, each its own shard with its marker and
    rows; the default (1) keeps the earlier sketch key."""
    from ood_core.stages.finetune import eoe_label_sets

    # small: a few classes, one source image each, a short lexicon
    base = {"models.cache_dir": str(tmp_path / "m"), "data.max_classes": "2", "sketch.sources_per_class": "1",
            "sketch.near_per_class": "1", "sketch.lexicon_limit": "50", "sketch.far_labels": "4",
            "sketch.far_per_turn": "4"}
    cfg = load_config("tiny", {**base, "sketch.far_label_sets": "3"})
    assert resolve_keys(load_config("tiny", {**base, "sketch.far_label_sets": "1"})) == resolve_keys(
        load_config("tiny", base))
    assert resolve_keys(cfg)["sketch"] != resolve_keys(load_config("tiny", base))["sketch"]
    run_local(cfg, str(tmp_path / "run"), only=["sketch"], log=lambda m: None)
    store = StageStore(str(tmp_path / "run"), "sketch", resolve_keys(cfg)["sketch"])
    per_shard = {i: store.read_manifest(i).to_pylist() for i in store.shard_indices()}
    far_shards = {i: rows for i, rows in per_shard.items() if any(r["kind"] in ("far", "far_set") for r in rows)}
    assert len(far_shards) == 3
    for rows in far_shards.values():  # one conversation per shard, every row of it in that shard
        assert len({r["source_key"] for r in rows}) == 1 and len({r["kind"] for r in rows}) == 1
    sources = sorted(next(iter(rows))["source_key"] or "far_conversation" for rows in far_shards.values())
    assert sources == ["far1_conversation", "far2_conversation", "far_conversation"]
    for i in far_shards:
        assert store.fs.exists(store.shard_paths(i)["stats"])  # each set has its completion marker
    rows = [r for i in sorted(per_shard) for r in per_shard[i]]
    sets = eoe_label_sets(rows)

    def kept(kinds, src=None):
        return [r["text"] for r in rows if r["status"] == "kept" and r["kind"] in kinds
                and (src is None or r["source_key"] == src)]

    assert len(sets) == 3 and sets[0] == kept(("far", "near", "fine"))
    assert sets[1] == kept(("far_set",), "far1_conversation") + kept(("near", "fine"))
    assert sets[2] == kept(("far_set",), "far2_conversation") + kept(("near", "fine"))
    assert kept(("far_set",), "far1_conversation")  # tiny's far_extra_labels go through each set's hygiene

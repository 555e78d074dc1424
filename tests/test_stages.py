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
def test_text_side_set_composition_by_hand():
    from ood_core.stages.finetune import text_side_set

    n_id = 3
    negatives = ["moss", "kettle", "dune"]
    cached = [  # finetune's cached synthetic rows: label_idx = n_id + the assigned (argmax) negative
        {"key": "syn_a", "label_idx": 3}, {"key": "syn_nograd_a", "label_idx": 5},
        {"key": "t2i_far_00", "label_idx": 4}, {"key": "t2i_neg_00", "label_idx": 3},
        {"key": "t2i_gone_00", "label_idx": 3},
    ]
    elaborate = [
        {"key": "syn_a", "kind": "boundary", "label": None},
        {"key": "syn_nograd_a", "kind": "boundary_no_grad", "label": None},
        {"key": "t2i_far_00", "kind": "far", "label": "volcano"},
        {"key": "t2i_neg_00", "kind": "negative", "label": "dune"},  # drawn from "dune", argmax said "moss"
        {"key": "t2i_gone_00", "kind": "negative", "label": "not a kept negative"},
    ]
    released = text_side_set("released", cached[:1], cached, elaborate, negatives, n_id)
    assert released == [
        {"key": "syn_a", "kind": "boundary", "neg_index": 0},
        # the reference labels a source's energy image and reuses that label for its other variants
        {"key": "syn_nograd_a", "kind": "boundary_no_grad", "neg_index": 0},
        {"key": "t2i_neg_00", "kind": "negative", "neg_index": 2},
    ]
    kept = text_side_set("kept_boundary", cached[:1], cached, elaborate, negatives, n_id)
    assert kept == [{"key": "syn_a", "kind": "boundary", "neg_index": 0}]


def test_released_text_side_trains_on_every_variant_and_the_negative_images(tmp_path):
    import io

    import pyarrow.parquet as pq

    from tests.test_batching import _overrides

    extra = {"generate.boundary_variants": "[energy, no_grad]", "generate.t2i_kinds": "[far, negative]",
             "generate.t2i_negative_labels": "2", "finetune.synood_text_data": "released"}
    cfg = load_config("tiny", _overrides(str(tmp_path / "m"), **extra))
    root = str(tmp_path / "run")
    results = run_local(cfg, root, log=lambda m: None)
    keys = resolve_keys(cfg)
    gen = {r["key"]: r for r in StageStore(root, "generate", keys["generate"]).read_manifest().to_pylist()}
    nograd = [r for r in gen.values() if r["kind"] == "boundary_no_grad"]
    assert nograd and all(r["rounds"] == 1 for r in nograd)
    # the no-gradient variant starts from its energy sample's noise
    assert all(r["seed"] == gen["syn_" + r["source_key"]]["seed"] for r in nograd)
    assert len({r["label"] for r in gen.values() if r["kind"] == "negative"}) == 2
    # expected by hand: every kept near image with its assigned negative, every kept negative
    # image with the negative it shows (index in sketch's kept negatives)
    sketch = StageStore(root, "sketch", keys["sketch"]).read_manifest().to_pylist()
    negs = [r["text"] for r in sketch if r["kind"] == "negative" and r["status"] == "kept"]
    kept = [r for r in StageStore(root, "elaborate", keys["elaborate"]).read_manifest().to_pylist()
            if r["status"] == "kept"]
    by_key = {r["key"]: r for r in kept}

    def label(r):  # a no-gradient image takes its kept energy sibling's negative
        if r["kind"] == "negative":
            return negs.index(r["label"])
        return by_key.get("syn_" + r["source_key"], r)["neg_index"]

    want = sorted((r["key"], r["kind"], label(r)) for r in kept if r["kind"] in ("boundary", "boundary_no_grad", "negative"))
    fstore = StageStore(root, "finetune", keys["finetune"])
    got = pq.read_table(io.BytesIO(fstore.read_bytes(fstore.path("artifacts", "text_side_set.parquet")))).to_pylist()
    assert sorted((r["key"], r["kind"], r["neg_index"]) for r in got) == want
    assert {"boundary", "boundary_no_grad"} <= {k for _, k, _ in want}
    text_side = results["finetune"]["summary"]["train"]["text_side"]
    assert text_side["data"] == "released" and sum(text_side["kinds"].values()) == len(want)
    assert text_side["used_negatives"] == len({n for _, _, n in want})
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

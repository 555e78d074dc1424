"""Multi-OS (seed 001): semantic blank areas, text synthesis, images with their alignment, own training data."""

from __future__ import annotations

import numpy as np

from ood_core import multi_os as M


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_blank_threshold_is_the_quantile_of_nearest_anchor_cosines_and_blank_points_lie_beyond_it():
    # three anchors in a plane: a-b close (cos 0.8), c far from both
    a, b, c = _unit([1, 0, 0]), _unit([0.8, 0.6, 0]), _unit([0, 0, 1])
    anchors = np.stack([a, b, c])
    nn = [0.8, 0.8, 0.0]  # each anchor's cosine to its nearest other anchor, by hand
    assert np.isclose(M.blank_threshold(anchors, 0.5), np.quantile(nn, 0.5))
    assert np.isclose(M.blank_threshold(anchors, 0.0), 0.0) and np.isclose(M.blank_threshold(anchors, 1.0), 0.8)
    assert M.blank_threshold(anchors[:1], 0.5) == 1.0
    # a point between a and c (cos ~0.707 to both) is farther from every anchor than 0.8: blank
    probe = np.stack([_unit([1, 0, 1]), _unit([0.9, 0.3, 0])])
    score, nearest = M.blank_scores(probe, anchors)
    assert np.allclose(score, [probe[0] @ a, max(probe[1] @ a, probe[1] @ b)])
    assert nearest[0] in (0, 2) and nearest[1] in (0, 1)
    tau = M.blank_threshold(anchors, 0.5)
    assert score[0] < tau <= score[1]


def test_interpolation_lies_between_its_concepts_and_maps_back_to_the_nearest_allowed_words():
    a, b = _unit([1, 0, 0]), _unit([0, 1, 0])
    z = M.interpolate(a, b, 0.5)
    assert np.isclose(np.linalg.norm(z), 1.0) and np.isclose(z @ a, z @ b)
    assert M.interpolate(a, b, 0.25) @ a > M.interpolate(a, b, 0.25) @ b
    words = ["east", "north", "northeast", "up"]
    feats = np.stack([a, b, _unit([1, 1, 0.1]), _unit([0, 0, 1])])
    allowed = np.array([True, True, True, True])
    assert M.nearest_words(z, feats, words, allowed, 2)[0] == "northeast"
    allowed[2] = False  # a word in a known area is never chosen
    assert "northeast" not in M.nearest_words(z, feats, words, allowed, 3)
    assert M.nearest_words(z, feats, words, np.zeros(4, bool), 2) == []
    two = ["north east", "east", "north", "up"]  # a two-word entry that would go over the bound is skipped
    assert M.nearest_words(z, feats[[2, 0, 1, 3]], two, np.ones(4, bool), 2, max_words=2) == ["north east"]
    assert M.nearest_words(z, feats[[2, 0, 1, 3]], two, np.ones(4, bool), 2, max_words=1)[0] in ("east", "north")


def test_planned_candidates_are_seeded_and_draw_from_the_known_concepts():
    ids, known, lex = ["cat", "dog"], ["volcano", "violin"], ["cat", "lantern", "coral", "kettle", "moss"]
    counts = {"blank": 3, "embed_interp": 4, "llm_interp": 2, "counterfactual": 2}
    items = M.plan_candidates(counts, ids, known, lex, seed=0)
    assert items == M.plan_candidates(counts, ids, known, lex, seed=0)
    assert items != M.plan_candidates(counts, ids, known, lex, seed=1)
    by = {o: [it for it in items if it["origin"] == o] for o in M.ORIGINS}
    assert {o: len(v) for o, v in by.items()} == counts
    blank = [it["sources"][0] for it in by["blank"]]
    assert len(set(blank)) == 3 and set(blank) <= set(lex) - {"cat"}  # a known concept is no blank probe
    for it in by["embed_interp"] + by["llm_interp"]:
        a, b = it["sources"]
        assert a in ids and b in ids + known and a != b
    assert all(it["sources"][0] in ids for it in by["counterfactual"])
    assert M.plan_candidates({}, ids, known, lex, seed=0) == []


# ---------------------------------------------------------------- the multi_os kind on tiny
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402

import pytest  # noqa: E402

os.environ["HF_HUB_OFFLINE"] = "1"

from ood_core.config import load_config  # noqa: E402
from ood_core.pipeline import resolve_keys, run_local  # noqa: E402
from ood_core.storage import StageStore  # noqa: E402
from tests.test_batching import _overrides  # noqa: E402

COUNTS = {"blank": 4, "interpolations": 3, "llm_interpolations": 2, "counterfactuals": 1}


def _tiny(models: str, **extra: str):
    mos = {f"generate.multi_os.{k}": str(v) for k, v in COUNTS.items()}
    return load_config("tiny", _overrides(models, **{"generate.images_per_label": "0", "sketch.fine_labels": "0",
                                                     "data.images_per_class": "4", **mos, **extra}))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multi-os")
    cfg = _tiny(str(tmp / "models"))
    root = str(tmp / "run")
    results = run_local(cfg, root, log=lambda m: None)
    keys = resolve_keys(cfg)
    stores = {s: StageStore(root, s, keys[s]) for s in ("sketch", "generate", "elaborate")}
    rows = {s: st.read_manifest().to_pylist() for s, st in stores.items()}
    return {"cfg": cfg, "root": root, "results": results, "stores": stores, "rows": rows, "tmp": tmp}


@pytest.mark.slow
def test_multi_os_rows_on_tiny_hold_blank_area_texts_interpolations_and_aligned_images(tiny_run):
    from ood_core.lexicon import load_lexicon

    cfg = tiny_run["cfg"]
    rows = [r for r in tiny_run["rows"]["generate"] if r["kind"] == "multi_os"]
    by = {o: [r for r in rows if r["origin"] == o] for o in M.ORIGINS}
    assert {M.ORIGINS[o]: len(v) for o, v in by.items()} == COUNTS  # one row per planned candidate
    assert all(r["status"] in ("ok", "rejected", "failed") and r["reason"] for r in rows)
    tau = {r["blank_threshold"] for r in rows}
    assert len(tau) == 1 and 0.0 < tau.pop() < 1.0
    for r in rows:  # the blank-area decision is the recorded score against the recorded threshold
        if r["blank_score"] is not None:
            assert (r["blank_score"] < r["blank_threshold"]) == (r["reason"] != "not_blank"), r
    for r in by["blank"]:  # (a) lexicon probes of the blank areas
        assert r["label"] == json.loads(r["concept_sources"])[0]
    words = set(load_lexicon(cfg.sketch.lexicon, cfg.sketch.lexicon_limit).nouns)
    for r in by["embed_interp"]:  # (b) interpolants mapped back to blank-area lexicon words
        a, b = json.loads(r["concept_sources"])
        if r["label"]:
            assert r["label"] not in (a, b)
            assert set(r["label"].split()) <= {w for entry in words for w in entry.split()}, r["label"]
    for r in by["llm_interp"] + by["counterfactual"]:  # (b) the MLLM's answer is recorded, parsed or rejected
        assert r["mllm_answer"] is not None or r["status"] == "failed"
        assert r["label"] is not None or r["reason"] in ("no_label_parsed", "answer_truncated", "too_many_labels")
    painted = [r for r in rows if r["alignment"] is not None]
    assert painted and all(r["status"] == "ok" for r in painted)  # tiny: alignment recorded, not judged
    assert {r["key"] for r in painted} == {r["key"] for r in rows if r["reason"] in ("ok", "misaligned")}
    # (c) the recorded alignment is the cosine of the stored image with its OWN text
    own, to_id = recompute_alignment(cfg, tiny_run["stores"]["generate"], painted)
    assert np.allclose([r["alignment"] for r in painted], own, atol=1e-4)
    assert np.allclose([r["alignment_id"] for r in painted], to_id, atol=1e-4)


def recompute_alignment(cfg, store, rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """Per painted row, from its stored PNG: the CLIP cosine with its own text and the largest with
    an ID class prompt (what generate's multi_os kind records as alignment / alignment_id)."""
    from PIL import Image

    from ood_core.data import load_id_dataset
    from ood_core.models import load_clip
    from ood_core.stages.base import ID_PROMPT

    files = store.load_samples({r["key"] for r in rows}, {r["shard"] for r in rows})
    clip = load_clip(cfg.models.clip, "cpu", cfg.models.cache_dir)
    img = clip.encode_images([Image.open(io.BytesIO(files[r["key"]]["png"])) for r in rows]).numpy()
    txt = clip.encode_texts([ID_PROMPT.format(r["label"]) for r in rows]).numpy()
    ids = clip.encode_texts([ID_PROMPT.format(c) for c in load_id_dataset(cfg.data, cfg.seed).classnames]).numpy()
    return (img * txt).sum(-1), (img @ ids.T).max(-1)


@pytest.mark.slow
def test_finetune_trains_multi_os_on_the_kept_multi_os_pairs_only(tiny_run):
    from ood_core.stages.elaborate import read_cross_shard_duplicates

    summary = tiny_run["results"]["finetune"]["summary"]
    train = summary["multi_os_train"]
    assert train["data"] == "multi_os" and "multi_os" in summary["metrics"]
    dups = read_cross_shard_duplicates(tiny_run["stores"]["elaborate"])
    kept = [r for r in tiny_run["rows"]["elaborate"] if r["status"] == "kept" and r["key"] not in dups]
    mos = [r for r in kept if r["kind"] == "multi_os"]
    assert mos and any(r["kind"] == "boundary" for r in kept)  # both kinds reach finetune's cache
    assert train["synthetic_keys"] == [r["key"] for r in mos]  # ... and Multi-OS takes its own
    gen = {r["key"]: r for r in tiny_run["rows"]["generate"]}
    assert all(gen[k]["kind"] == "multi_os" and gen[k]["status"] == "ok" for k in train["synthetic_keys"])
    assert train["texts"] == list(dict.fromkeys(gen[k]["label"] for k in train["synthetic_keys"]))


@pytest.mark.slow
def test_the_former_multi_os_stand_in_stays_a_named_option(tiny_run):
    cfg = _tiny(str(tiny_run["tmp"] / "models"), **{"finetune.multi_os_data": "boundary_nearest"})
    results = run_local(cfg, tiny_run["root"], only=["finetune"], log=lambda m: None)
    train = results["finetune"]["summary"]["multi_os_train"]
    assert train["data"] == "boundary_nearest"
    assert train["synthetic_keys"] and all(k.startswith("syn_") for k in train["synthetic_keys"])


def test_multi_os_settings_enter_generate_key_but_leave_the_other_kinds_shards_alone():
    from ood_core.stages.generate import GENERATORS

    a = load_config("tiny")
    b = load_config("tiny", {"generate.multi_os.blank": "7"})
    c = load_config("tiny", {"generate.multi_os.blank_quantile": "0.25"})
    assert len({resolve_keys(x)["generate"] for x in (a, b, c)}) == 3
    for name in ("boundary", "t2i"):
        gen = GENERATORS.get(name)()
        assert gen.config_slice(a) == gen.config_slice(b) == gen.config_slice(c)
    mos = GENERATORS.get("multi_os")()
    assert mos.config_slice(a) != mos.config_slice(b) != mos.config_slice(c)
    # the training-set choice is finetune's alone
    d = load_config("tiny", {"finetune.multi_os_data": "boundary_nearest"})
    ka, kd = resolve_keys(a), resolve_keys(d)
    assert ka["generate"] == kd["generate"] and ka["finetune"] != kd["finetune"]

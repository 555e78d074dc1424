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

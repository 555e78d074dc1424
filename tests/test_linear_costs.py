"""The linear-cost rewrites decide exactly as the simple loops they replace (seeded random inputs)."""

from __future__ import annotations

import types

import numpy as np
import pytest

from ood_core import dedup, scores
from ood_core.dedup import ShardDedup, cross_shard_duplicates
from ood_core.labels import content_words, label_hygiene, normalize_label


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _shards_with_near_duplicates(seed: int, sizes: list[int], dim: int = 8):
    rng = np.random.default_rng(seed)
    base = _unit(rng.normal(size=(sum(sizes) // 2 + 1, dim)))
    shards, k = [], 0
    for s, n in enumerate(sizes):
        # half the images are noisy copies of a shared pool: duplicates across shards, some below the threshold
        picks = base[rng.integers(0, len(base), n)] + rng.choice([0.01, 0.2], size=(n, 1)) * rng.normal(size=(n, dim))
        feats = np.where(rng.random((n, 1)) < 0.5, _unit(picks), _unit(rng.normal(size=(n, dim))))
        shards.append(([f"s{s}_{i}" for i in range(n)], feats.astype(np.float32)))
        k += n
    return shards


def _cross_reference(shards, threshold):
    """The definition: each image against every kept image of earlier shards, one at a time."""
    kept_keys: list[str] = []
    kept = np.zeros((sum(len(k) for k, _ in shards), shards[0][1].shape[1]))
    out = {}
    for keys, feats in shards:
        n = len(kept_keys)
        for key, f in zip(keys, feats, strict=True):
            cos = kept[:n] @ np.float64(f)  # float64: the exact cosines
            if n and cos.max() > threshold:
                out[key] = (kept_keys[int(np.argmax(cos))], float(cos.max()))
            else:
                kept[len(kept_keys)] = f
                kept_keys.append(key)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blocked_cross_shard_dedup_equals_the_loop(seed, monkeypatch):
    # small blocks and an index that must grow past its first buffer (1024 rows)
    monkeypatch.setattr(dedup, "_BLOCK_ELEMS", 4096)
    shards = _shards_with_near_duplicates(seed, [300, 0, 500, 450, 400, 350])
    got = cross_shard_duplicates(shards, 0.95)
    want = _cross_reference(shards, 0.95)
    assert len(want) > 50 and set(got) == set(want)
    assert all(got[k][0] == want[k][0] and got[k][1] == pytest.approx(want[k][1], abs=1e-5) for k in want)


def test_in_shard_dedup_from_the_gram_matrix_equals_the_loop():
    rng = np.random.default_rng(5)
    shards = _shards_with_near_duplicates(5, [200])
    feats = shards[0][1]
    passes = rng.random(len(feats)) < 0.7  # the image's other filters (blank, ID visible, ...) passed

    kept_feats, want_cos, want_kept = [], [], []
    for j, f in enumerate(feats):  # the loop elaborate ran before
        dup = max((float(f @ kf) for kf in kept_feats), default=-1.0)
        want_cos.append(dup)
        if passes[j] and dup <= 0.95:
            kept_feats.append(f)
            want_kept.append(j)
    d = ShardDedup(feats)
    got_cos = []
    for j in range(len(feats)):
        dup = d.max_cosine(j)
        got_cos.append(dup)
        if passes[j] and dup <= 0.95:
            d.keep(j)
    assert d.kept == want_kept and 0 < len(want_kept) < len(feats)
    np.testing.assert_allclose(got_cos, want_cos, atol=1e-6)


def _first_match_reference(label, words, names):
    """The scan label hygiene ran per label before: equal name first, else the first overlapping name."""
    for name in names:
        if label == normalize_label(name):
            return name, None
    for name in names:
        if words & content_words(name):
            return None, name
    return None, None


def test_label_hygiene_with_the_name_index_equals_the_scan():
    rng = np.random.default_rng(3)
    vocab = ["cat", "cats", "red fox", "box", "boxes", "glass jar", "jar", "lily", "lilies", "sea lion",
             "The Lion", "  tabby cat ", "mug", "coffee mug", "kite", "volcano", "violin", "bass"]
    ids = [" ".join(rng.choice(vocab, rng.integers(1, 3))) for _ in range(40)]
    ood = [" ".join(rng.choice(vocab, rng.integers(1, 3))) for _ in range(15)]
    others = vocab + ["unicorn", "teapot", "zebra crossing", "harp", "comet"]
    cands = [" ".join(rng.choice(others, rng.integers(1, 3))) for _ in range(200)] + ids[:5] + ["", "a/b"]
    verdicts = label_hygiene(cands, ids, eval_ood_names=ood)
    reasons = {v.reason for v in verdicts}
    assert {"equals_id_class", "overlaps_id_class", "duplicate", "ok"} <= reasons
    for v in verdicts:
        if v.reason in ("equals_id_class", "overlaps_id_class"):
            eq, ov = _first_match_reference(v.label, content_words(v.label), ids)
            assert v.matched == (eq or ov) and v.reason == ("equals_id_class" if eq else "overlaps_id_class")
        elif v.reason == "ok":
            assert _first_match_reference(v.label, content_words(v.label), ids) == (None, None)
    # leakage follows its own whole-label rule (ood_core.leakage, tested in test_labels): it must not
    # change any ID decision checked above
    assert [(v.status, v.reason, v.matched) for v in verdicts] == [
        (v.status, v.reason, v.matched) for v in label_hygiene(cands, ids)]


def test_near_class_records_come_from_a_per_class_index():
    from ood_core.stages.sketch import train_by_class

    rng = np.random.default_rng(0)
    recs = [types.SimpleNamespace(key=f"r{i}", split=rng.choice(["train", "test"]), class_idx=int(rng.integers(0, 7)))
            for i in range(300)]
    calls = []

    class Data:
        @property
        def records(self):
            calls.append(1)
            return recs

    ctx = types.SimpleNamespace(dataset=Data())
    for c in range(8):
        want = [r for r in recs if r.split == "train" and r.class_idx == c]
        assert train_by_class(ctx).get(c, []) == want
    assert len(calls) == 1  # listed once, not once per class


def test_neg_mining_keep_is_select_of_the_scores():
    from ood_core.stages.sketch import neg_mining_keep

    rng = np.random.default_rng(1)
    sim = rng.normal(size=(50, 9))
    score = np.percentile(sim, 95, axis=1)
    np.testing.assert_array_equal(neg_mining_keep(sim, 0.3, 95), np.argsort(score, kind="stable")[:15])


def test_feature_file_is_deterministic_and_guarded_by_the_marker(tmp_path):
    from ood_core.stages.elaborate import kept_features
    from ood_core.storage import Sample, StageStore, features_npz
    from schemas import GENERATE

    feats = _unit(np.random.default_rng(0).normal(size=(3, 4)))
    blob = features_npz(["a", "b", "c"], feats)
    assert blob == features_npz(["a", "b", "c"], feats)  # no clock in the zip: equal content, equal bytes
    assert features_npz([], feats[:0]) != blob  # a shard that kept nothing has an (empty) file too
    store = StageStore(str(tmp_path), "generate", "k")
    rows = [{"key": k, "status": "ok", "reason": "ok"} for k in "abc"]
    store.write_shard(0, [Sample(k, {"txt": b"x"}) for k in "abc"], rows, GENERATE, 0.1, features=blob)
    keys, got = store.read_features(0)
    assert keys == ["a", "b", "c"] and np.array_equal(got, feats) and kept_features(store, 0)[0] == keys
    assert store.shard_problems(0, deep=True) == [] and store.shard_problems(0, deep=False) == []
    with open(store.features_path(0), "r+b") as f:  # a damaged feature file is a damaged shard
        f.seek(len(blob) - 3)
        f.write(b"\x00\x01\x02")
    assert any("features/000000.npz" in p for p in store.shard_problems(0, deep=True))
    # an older shard (no feature file): its features are read from the tar's npy members
    from ood_core.stages.base import npy_bytes

    store.write_shard(1, [Sample("d", {"npy": npy_bytes(feats[0])})], [{"key": "d", "status": "ok", "reason": "ok"}],
                      GENERATE, 0.1)
    keys, got = kept_features(store, 1)
    assert keys == ["d"] and np.array_equal(got[0], feats[0])


def test_scores_in_chunks_equal_one_chunk(monkeypatch):
    import torch

    rng = np.random.default_rng(2)
    img, idt, neg = (torch.from_numpy(_unit(rng.normal(size=(n, 16)))) for n in (97, 5, 40))

    def run() -> dict:
        return {
            "neglabel": scores.neglabel(img, idt, neg, 0.01, 7, seed=1, device="cpu"),
            "mcm": scores.mcm(img, idt, 1.0), "energy": scores.energy_score(img, idt, 0.01),
            "max_logit": scores.max_logit_score(img, idt, 1.0), "eoe": scores.eoe(img, idt, neg[:6]),
            "mm_ood": scores.mm_ood(img, idt, neg[:6]),
        }

    whole = run()
    monkeypatch.setattr(scores, "_CHUNK_ELEMS", 64)  # 1-2 images per chunk
    chunked = run()
    for name, s in whole.items():
        assert s.dtype == np.float64 and s.shape == (97,)
        np.testing.assert_allclose(chunked[name], s, rtol=1e-6, atol=1e-7, err_msg=name)
    # max-logit without the whole n x C matrix equals the matrix's row maxima
    np.testing.assert_allclose(whole["max_logit"], scores.max_logit(scores.zero_shot_logits(img, idt, 1.0)),
                               rtol=1e-6)


def test_softmax_scores_of_confident_id_images_do_not_tie():
    """At tau = 0.01 NegLabel's ID softmax mass of ID-like images is within 1e-8 of 1: float32 rounds
    many of them to the same value and the ties make FPR95 meaningless. The scores keep them apart."""
    import torch

    rng = np.random.default_rng(4)
    idt, neg = (torch.from_numpy(_unit(rng.normal(size=(n, 16)))) for n in (5, 40))
    img = torch.from_numpy(_unit(idt.numpy()[rng.integers(0, 5, 50)] + 0.5 * rng.normal(size=(50, 16))))
    s = scores.neglabel(img, idt, neg, 0.01, 4, seed=1, device="cpu")
    assert len(np.unique(s)) == len(s)
    assert len(np.unique(s.astype(np.float32))) < len(s)  # the case float32 scores got wrong

"""Near-duplicates across shards: an index of kept embeddings, filled in shard order.

Each elaborate shard already rejects near-duplicates inside itself (it runs alone, possibly in
parallel with the others). :func:`cross_shard_duplicates` runs once the stage's shards are done:
it walks the shards in plan order and compares every kept image with the index of kept images of
the EARLIER shards; an image above the cosine threshold is a duplicate (of the most similar one)
and stays out of the index. The result is the same whatever order the shards ran in.

Cost: one (shard x index) matrix product per shard, O(N^2 d / 2) in all. For 50k images of
d = 512 (ViT-B/16) that is ~6e11 multiply-adds (tens of seconds on a few CPU cores, well under
one on a GPU) and an index of 50k x 512 float32 = 100 MB; the largest similarity block is
(shard size x N), e.g. 512 x 50k x 4 B = 100 MB. Beyond a few hundred thousand images an
approximate index (FAISS) would replace the exact product.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def cross_shard_duplicates(
    shards: Iterable[tuple[list[str], np.ndarray]], threshold: float
) -> dict[str, tuple[str, float]]:
    """``{key: (matched earlier key, cosine)}`` for kept images duplicating an earlier shard's.

    ``shards`` yields ``(keys, L2-normalised features (n, d))`` of each shard's kept images, in
    plan order. Within a shard nothing is compared (the shard did that itself).
    """
    index: list[np.ndarray] = []
    index_keys: list[str] = []
    out: dict[str, tuple[str, float]] = {}
    for keys, feats in shards:
        if len(keys) == 0:
            continue
        feats = np.asarray(feats, dtype=np.float32).reshape(len(keys), -1)
        fresh = np.ones(len(keys), dtype=bool)
        if index_keys:
            sims = feats @ np.concatenate(index).T
            best = sims.argmax(axis=1)
            best_cos = sims[np.arange(len(keys)), best]
            for i, key in enumerate(keys):
                if best_cos[i] > threshold:
                    out[key] = (index_keys[int(best[i])], float(best_cos[i]))
                    fresh[i] = False
        index.append(feats[fresh])
        index_keys += [k for k, f in zip(keys, fresh, strict=True) if f]
    return out

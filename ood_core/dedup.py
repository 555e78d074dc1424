"""Near-duplicates by embedding cosine: inside a shard (:class:`ShardDedup`) and across shards
(:func:`cross_shard_duplicates`).

Each elaborate shard rejects near-duplicates inside itself (it runs alone, possibly in parallel
with the others). :func:`cross_shard_duplicates` runs once the stage's shards are done: it walks
the shards in plan order and compares every kept image with the index of kept images of the
EARLIER shards; an image above the cosine threshold is a duplicate (of the most similar one) and
stays out of the index. The result is the same whatever order the shards ran in.

Cost: the index is one preallocated float32 buffer on the stage's device that grows by doubling
(each shard appends its fresh rows: amortised linear copying, no re-concatenation), and each
shard is compared with it in blocks of bounded size (``_BLOCK_ELEMS`` similarities at a time).
The products are exact, O(N^2 d / 2) multiply-adds in all (50k x 512: ~6e11, seconds on a GPU,
tens of seconds on a few CPU cores); beyond a few million images an approximate index would
replace them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

# Similarities per (shard x index block) product: 2^24 float32 = 64 MiB.
_BLOCK_ELEMS = 1 << 24


class ShardDedup:
    """In-shard near-duplicates: the shard's Gram matrix once, then for each image in order its
    largest cosine to the images kept before it (``max_cosine``), and ``keep`` for a kept one."""

    def __init__(self, feats: np.ndarray):
        feats = np.asarray(feats, dtype=np.float32)
        self.gram = feats @ feats.T
        self.kept: list[int] = []

    def max_cosine(self, j: int) -> float:
        """Largest cosine of image ``j`` to the kept images (-1 when none is kept yet)."""
        return float(self.gram[j, self.kept].max()) if self.kept else -1.0

    def keep(self, j: int) -> None:
        self.kept.append(j)


class _Index:
    """Kept embeddings in one growing buffer (capacity doubles: appends cost amortised O(rows))."""

    def __init__(self, dim: int, device: Any):
        import torch

        self.buf = torch.empty((1024, dim), dtype=torch.float32, device=device)
        self.n = 0
        self.keys: list[str] = []

    def add(self, keys: list[str], feats) -> None:
        import torch

        need = self.n + len(keys)
        if need > self.buf.shape[0]:
            grown = torch.empty((max(need, 2 * self.buf.shape[0]), self.buf.shape[1]), dtype=self.buf.dtype,
                                device=self.buf.device)
            grown[: self.n] = self.buf[: self.n]
            self.buf = grown
        self.buf[self.n : need] = feats
        self.n = need
        self.keys += keys

    def nearest(self, q):
        """(best cosine, index of the first most similar kept row) of every row of ``q``."""
        import torch

        best = torch.full((q.shape[0],), -torch.inf, device=q.device)
        arg = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        block = max(1024, _BLOCK_ELEMS // max(1, q.shape[0]))
        for start in range(0, self.n, block):
            m, a = (q @ self.buf[start : min(self.n, start + block)].T).max(dim=1)
            better = m > best  # strict: on a tie the earlier kept image stays the match
            best = torch.where(better, m, best)
            arg = torch.where(better, a + start, arg)
        return best, arg


def cross_shard_duplicates(
    shards: Iterable[tuple[list[str], np.ndarray]], threshold: float, device: Any = None
) -> dict[str, tuple[str, float]]:
    """``{key: (matched earlier key, cosine)}`` for kept images duplicating an earlier shard's.

    ``shards`` yields ``(keys, L2-normalised features (n, d))`` of each shard's kept images, in
    plan order. Within a shard nothing is compared (the shard did that itself).
    """
    import torch

    index: _Index | None = None
    out: dict[str, tuple[str, float]] = {}
    with torch.no_grad():
        for keys, feats in shards:
            if len(keys) == 0:
                continue
            q = torch.from_numpy(np.asarray(feats, dtype=np.float32).reshape(len(keys), -1)).to(device or "cpu")
            if index is None:
                index = _Index(q.shape[1], q.device)
            fresh = torch.ones(len(keys), dtype=torch.bool, device=q.device)
            if index.n:
                best, arg = index.nearest(q)
                fresh = ~(best > threshold)
                for i in (~fresh).nonzero().flatten().tolist():
                    out[keys[i]] = (index.keys[int(arg[i])], float(best[i]))
            keep = fresh.cpu().numpy()
            index.add([k for k, f in zip(keys, keep, strict=True) if f], q[fresh])
    return out

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
The decisions are exact; an exact projection filter (see :class:`_Index`) skips the full
product for pairs that provably cannot pass the threshold, so the cost is ~1/8 of the
O(N^2 d / 2) multiply-adds when duplicates are rare, and the full product (seconds on a GPU at
50k x 512) when the embeddings all lie close together.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

# Similarities per (shard x index block) product: 2^24 float32 = 64 MiB.
_BLOCK_ELEMS = 1 << 24
# The exact projection filter (see _Index): fitted on the first 512 kept rows of dimension >= 128;
# a block with more than 5% candidate pairs is multiplied whole; the margin absorbs float rounding.
_FILTER_MIN_DIM = 128
_FIT_ROWS = 512
_DENSE_FRACTION = 0.05
_MARGIN = 1e-3


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
    """Kept embeddings in one growing buffer (capacity doubles: appends cost amortised O(rows)).

    Once it holds ``_FIT_ROWS`` rows (of dimension >= ``_FILTER_MIN_DIM``) it also keeps each row
    projected onto the top ``dim // 8`` principal directions of those rows. A projection never
    lengthens a difference, so ``|P(q - x)|^2 >= |q|^2 + |x|^2 - 2 t`` proves ``q . x <= t``: the
    cheap projected product rules out (exactly) the pairs that cannot be duplicates, and only
    the rest are multiplied in full (a block with many candidates is multiplied whole).
    """

    def __init__(self, dim: int, device: Any):
        import torch

        self.buf = torch.empty((1024, dim), dtype=torch.float32, device=device)
        self.n = 0
        self.keys: list[str] = []
        self.proj = None  # (dim, k) orthonormal columns, once fitted
        self.pbuf = self.norm2 = None

    def _grow(self, t, need: int):
        import torch

        grown = torch.empty((max(need, 2 * t.shape[0]), *t.shape[1:]), dtype=t.dtype, device=t.device)
        grown[: self.n] = t[: self.n]
        return grown

    def add(self, keys: list[str], feats) -> None:
        need = self.n + len(keys)
        if need > self.buf.shape[0]:
            self.buf = self._grow(self.buf, need)
            if self.proj is not None:
                self.pbuf, self.norm2 = self._grow(self.pbuf, need), self._grow(self.norm2, need)
        self.buf[self.n : need] = feats
        if self.proj is not None:
            self.pbuf[self.n : need] = feats @ self.proj
            self.norm2[self.n : need] = (feats * feats).sum(1)
        self.n = need
        self.keys += keys
        dim = self.buf.shape[1]
        if self.proj is None and dim >= _FILTER_MIN_DIM and self.n >= _FIT_ROWS:
            self._fit(dim // 8)

    def _fit(self, k: int) -> None:
        import torch

        x = self.buf[: self.n]
        # principal directions of the kept rows: where differences between embeddings are largest
        _, _, vh = torch.linalg.svd(x - x.mean(0), full_matrices=False)
        self.proj = vh[:k].T.contiguous()
        self.pbuf = torch.empty((self.buf.shape[0], k), dtype=x.dtype, device=x.device)
        self.norm2 = torch.empty(self.buf.shape[0], dtype=x.dtype, device=x.device)
        self.pbuf[: self.n] = x @ self.proj
        self.norm2[: self.n] = (x * x).sum(1)

    def nearest(self, q, threshold: float):
        """(best cosine, index of the first most similar kept row) of every row of ``q``; a row
        whose best is at most ``threshold`` may get any value <= ``threshold`` (-inf)."""
        import torch

        best = torch.full((q.shape[0],), -torch.inf, device=q.device)
        arg = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        block = max(1024, _BLOCK_ELEMS // max(1, q.shape[0]))
        if self.proj is not None:
            pq = q @ self.proj
            pq2, q2 = (pq * pq).sum(1), (q * q).sum(1)
        for start in range(0, self.n, block):
            stop = min(self.n, start + block)
            if self.proj is None:
                m, a = (q @ self.buf[start:stop].T).max(dim=1)
            else:
                p = self.pbuf[start:stop]
                proj_d2 = pq2[:, None] + (p * p).sum(1)[None] - 2 * (pq @ p.T)
                may = proj_d2 < q2[:, None] + self.norm2[start:stop][None] - 2 * threshold + _MARGIN
                qi, xj = may.nonzero(as_tuple=True)
                if len(qi) > _DENSE_FRACTION * may.numel():
                    m, a = (q @ self.buf[start:stop].T).max(dim=1)
                else:
                    m, a = _first_max(len(q), qi, xj, (q[qi] * self.buf[start + xj]).sum(1))
            better = m > best  # strict: on a tie the earlier kept image stays the match
            best = torch.where(better, m, best)
            arg = torch.where(better, a + start, arg)
        return best, arg


def _first_max(n: int, qi, xj, dots):
    """Per query row: the largest of its candidate ``dots`` and the first (lowest) ``xj`` holding it."""
    import torch

    m = torch.full((n,), -torch.inf, device=dots.device).scatter_reduce(0, qi, dots, "amax")
    first = torch.full((n,), torch.iinfo(torch.long).max, dtype=torch.long, device=dots.device)
    hit = dots == m[qi]
    first = first.scatter_reduce(0, qi[hit], xj[hit], "amin")
    return m, torch.where(torch.isfinite(m), first, torch.zeros_like(first))


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
                best, arg = index.nearest(q, threshold)
                fresh = ~(best > threshold)
                for i in (~fresh).nonzero().flatten().tolist():
                    out[keys[i]] = (index.keys[int(arg[i])], float(best[i]))
            keep = fresh.cpu().numpy()
            index.add([k for k, f in zip(keys, keep, strict=True) if f], q[fresh])
    return out

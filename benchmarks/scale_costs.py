"""Per-item costs at scale, before vs after, side by side in one run (issue 17, items 3 and 4).

    .venv/bin/python benchmarks/scale_costs.py                 # dedup 1k/10k/50k, scores 8.6k x 10k
    .venv/bin/python benchmarks/scale_costs.py --score-images 86000 --device cuda

"before" is the code of ``--base`` (a git revision, default the commit before the rewrite), loaded
from ``git show`` into its own module; "after" is this checkout. Every measurement also checks
that both give the same decisions (dedup, hygiene, near-class records) or scores (within float32).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASE = "947cf20"


def old_module(path: str, base: str) -> types.ModuleType:
    """``path`` (e.g. ``ood_core/dedup.py``) as it was at git revision ``base``."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{base}:{path}"], check=True, capture_output=True,
                         text=True).stdout
    f = Path(tempfile.mkdtemp()) / Path(path).name
    f.write_text(src)
    spec = importlib.util.spec_from_file_location(f"old_{Path(path).stem}", f)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def bench_cross_shard_dedup(n: int, base: str, device: str, dim: int = 512, shard: int = 512,
                            decay: float = 1.0) -> dict:
    """Cross-shard dedup of ``n`` embeddings in shards of 512 (a tenth are near-copies of earlier ones).
    ``decay`` < 1: the features' spread falls geometrically over the dimensions down to ``decay``
    (anisotropic, as real image embeddings are; 1 = isotropic)."""
    from ood_core.dedup import cross_shard_duplicates

    rng = np.random.default_rng(0)
    feats = _unit(rng.normal(size=(n, dim)) * np.geomspace(1.0, decay, dim))
    copies = rng.random(n) < 0.1
    src = rng.integers(0, n, n)
    # noise of norm ~0.11: cosine ~0.99 to the copied image, above the 0.95 threshold
    feats[copies] = _unit(feats[np.minimum(src, np.arange(n))[copies]] + 0.005 * rng.normal(size=(copies.sum(), dim)))
    shards = [([f"k{i}" for i in range(j, min(n, j + shard))], feats[j : j + shard]) for j in range(0, n, shard)]
    old = old_module("ood_core/dedup.py", base)
    t_old, a = timed(lambda: old.cross_shard_duplicates(shards, 0.95))
    t_new, b = timed(lambda: cross_shard_duplicates(shards, 0.95, device))
    assert set(a) == set(b) and all(a[k][0] == b[k][0] for k in a), "dedup decisions differ"
    spread = "" if decay == 1.0 else f", spread 1 -> {decay:g}"
    return {"what": f"cross-shard dedup, {n} x {dim}{spread} ({len(b)} duplicates)", "before_s": t_old,
            "after_s": t_new}


def bench_in_shard_dedup(n: int = 512, dim: int = 512) -> dict:
    """In-shard dedup of one 512-image shard: the Python loop elaborate ran vs the Gram matrix."""
    from ood_core.dedup import ShardDedup

    feats = _unit(np.random.default_rng(1).normal(size=(n, dim)))

    def loop():
        kept = []
        for f in feats:
            if max((float(f @ kf) for kf in kept), default=-1.0) <= 0.95:
                kept.append(f)
        return len(kept)

    def gram():
        d = ShardDedup(feats)
        for j in range(n):
            if d.max_cosine(j) <= 0.95:
                d.keep(j)
        return len(d.kept)

    t_old, a = timed(loop)
    t_new, b = timed(gram)
    assert a == b
    return {"what": f"in-shard dedup, {n} images", "before_s": t_old, "after_s": t_new}


def bench_label_hygiene(classes: int, base: str, per_class: int = 5) -> dict:
    """Sketch's near step: label hygiene once per class against ``classes`` ID names."""
    from ood_core.labels import label_hygiene

    old = old_module("ood_core/labels.py", base)
    rng = np.random.default_rng(2)
    words = [f"w{i}" for i in range(3 * classes)]
    ids = [f"{rng.choice(words)} {rng.choice(words)}" for _ in range(classes)]
    cands = [[f"{rng.choice(words)} thing{c}" for _ in range(per_class)] for c in range(classes)]
    t_old, a = timed(lambda: [old.label_hygiene(c, ids) for c in cands])
    t_new, b = timed(lambda: [label_hygiene(c, ids) for c in cands])
    assert [[(v.reason, v.matched) for v in x] for x in a] == [[(v.reason, v.matched) for v in x] for x in b]
    return {"what": f"label hygiene x {classes} classes, {classes} ID names", "before_s": t_old, "after_s": t_new}


def bench_near_records(classes: int, per_class: int) -> dict:
    """The near step's source records per class: a scan of the train list per class vs a per-class index."""
    from ood_core.stages.sketch import train_by_class

    recs = [types.SimpleNamespace(key=f"r{i}", split="train", class_idx=i % classes) for i in range(classes * per_class)]
    ds = types.SimpleNamespace(records=recs, train=lambda: [r for r in recs if r.split == "train"])
    t_old, a = timed(lambda: [[r for r in ds.train() if r.class_idx == c][:1] for c in range(classes)])
    ctx = types.SimpleNamespace(dataset=ds)
    t_new, b = timed(lambda: [train_by_class(ctx).get(c, [])[:1] for c in range(classes)])
    assert a == b
    return {"what": f"near-class records, {classes} classes x {per_class}", "before_s": t_old, "after_s": t_new}


def bench_scores(n: int, n_neg: int, base: str, device: str, classes: int = 1000, dim: int = 512) -> dict:
    """Finalize's NegLabel (100 groups) + energy on ``n`` features, ``classes`` ID and ``n_neg`` negative labels."""
    from ood_core import scores

    old = old_module("ood_core/scores.py", base)
    rng = np.random.default_rng(3)
    img, idt, neg = (_unit(rng.normal(size=(m, dim))) for m in (n, classes, n_neg))

    def run(mod, **kw):
        return (mod.neglabel(img, idt, neg, 0.01, 100, 0, **kw), mod.energy_score(img, idt, 0.01, **kw),
                mod.max_logit(mod.zero_shot_logits(img[:1], idt)))

    t_old, a = timed(lambda: run(old))
    t_new, b = timed(lambda: run(scores, device=device))
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
    return {"what": f"scores (neglabel + energy), {n} x {n_neg} neg x {classes} ID", "before_s": t_old,
            "after_s": t_new}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=BASE, help="git revision of 'before'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dedup", default="1000,10000,50000")
    ap.add_argument("--dedup-decay", type=float, nargs="+", default=[1.0, 0.05],
                    help="feature spread over the dimensions (1: isotropic; 0.05: anisotropic)")
    ap.add_argument("--score-images", type=int, default=8600)
    ap.add_argument("--negatives", type=int, default=10000)
    ap.add_argument("--classes", type=int, default=1000)
    # 1/10 of ImageNet's 1300 per class: the old per-class scan at 1000 x 1300 takes ~10 min on 2 cores
    ap.add_argument("--train-per-class", type=int, default=130)
    ap.add_argument("--only", default="dedup,in_shard,hygiene,near,scores", help="measurements to run")
    args = ap.parse_args()
    import torch

    print(f"# torch threads {torch.get_num_threads()}, device {args.device}, before = {args.base}", flush=True)
    runs = {
        "dedup": [lambda n=n, d=d: bench_cross_shard_dedup(n, args.base, args.device, decay=d)
                  for d in args.dedup_decay for n in map(int, args.dedup.split(","))],
        "in_shard": [bench_in_shard_dedup],
        "hygiene": [lambda: bench_label_hygiene(args.classes, args.base)],
        "near": [lambda: bench_near_records(args.classes, args.train_per_class)],
        "scores": [lambda: bench_scores(args.score_images, args.negatives, args.base, args.device, args.classes)],
    }
    print(f"| {'measurement':<58} | before s | after s | x |")
    print(f"|{'-' * 60}|---------:|--------:|--:|")
    for fn in [fn for name in args.only.split(",") for fn in runs[name]]:
        r = fn()
        print(f"| {r['what']:<58} | {r['before_s']:8.2f} | {r['after_s']:7.3f} | "
              f"{r['before_s'] / max(r['after_s'], 1e-9):.0f} |", flush=True)


if __name__ == "__main__":
    main()

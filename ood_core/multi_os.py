"""Multi-OS (seed 001): multimodal outlier synthesis in CLIP's joint embedding space.

Three steps, the first two here (text side), the third in generate's ``multi_os`` kind:

(a) **Semantic blank areas.** The known concepts are the ID class names and the kept sketched
    outlier labels, each as CLIP text ``"a photo of a {}."`` (the *anchors*). A point of the
    embedding space lies in a blank area when its largest cosine to any anchor is below
    :func:`blank_threshold`: the ``quantile`` of the anchors' own nearest-other-anchor cosines, so
    a blank point is farther from every known concept than known concepts usually are from their
    nearest neighbour. The rule adapts to the model's geometry (a random tiny CLIP packs all texts
    near cosine 0.98, a trained one spreads them) and needs no global pass over the candidates, so
    every shard can decide its own candidates.
(b) **Text-modality synthesis.** Candidates of four origins (:data:`ORIGINS`): lexicon words
    probed for blank areas (``blank``); embedding-space interpolants between two known concepts
    mapped back to text by their nearest blank-area lexicon words (``embed_interp``); an LLM's
    semantic interpolation between two known concepts (``llm_interp``) and its counterfactual edit
    of an ID concept (``counterfactual``). Every candidate text is then checked for the blank area.
(c) Images of the kept texts (text-to-image) with their CLIP image-text alignment: see
    ``ood_core.stages.generate.MultiOSGenerator``.
"""

from __future__ import annotations

import numpy as np

from ood_core.stages.base import derive_seed

# candidate origins, in plan order; the count of each is ``generate.multi_os.<field>``
ORIGINS = {"blank": "blank", "embed_interp": "interpolations", "llm_interp": "llm_interpolations",
           "counterfactual": "counterfactuals"}
LLM_ORIGINS = {"llm_interp": "interpolation_prompt", "counterfactual": "counterfactual_prompt"}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.clip(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12, None)


def blank_threshold(anchors: np.ndarray, quantile: float) -> float:
    """The ``quantile`` of each anchor's cosine to its nearest other anchor (rows L2-normalised)."""
    if len(anchors) < 2:
        return 1.0  # one known concept: everything else is blank
    sim = anchors @ anchors.T
    np.fill_diagonal(sim, -np.inf)
    return float(np.quantile(sim.max(axis=1), quantile))


def blank_scores(feats: np.ndarray, anchors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``feats``: the largest cosine to any anchor and that anchor's index."""
    sim = feats @ anchors.T
    return sim.max(axis=1), sim.argmax(axis=1)


def interpolate(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    """The unit vector ``(1 - t) a + t b`` normalised: a point on the path between two concepts."""
    return _unit((1.0 - t) * a + t * b)


def nearest_words(point: np.ndarray, word_feats: np.ndarray, words: list[str], allowed: np.ndarray,
                  k: int, max_words: int | None = None) -> list[str]:
    """Up to ``k`` allowed lexicon entries whose text embeddings are nearest ``point`` (most similar
    first), skipping an entry that would take the joined text over ``max_words`` words."""
    sim = np.where(allowed, word_feats @ point, -np.inf)
    out: list[str] = []
    used = 0
    for i in np.argsort(-sim, kind="stable")[: int(allowed.sum())]:
        n = len(words[i].split())
        if max_words is None or used + n <= max_words:
            out.append(words[i])
            used += n
        if len(out) == k or used == max_words:
            break
    return out


def plan_candidates(counts: dict[str, int], id_names: list[str], known: list[str], lexicon: list[str],
                    seed: int) -> list[dict]:
    """The candidates of every origin (seeded, stable): ``{"origin", "index", "sources"}`` items.

    ``blank``: distinct lexicon words not naming a known concept (``sources`` = [the word]);
    ``embed_interp`` / ``llm_interp``: an ID class and another known concept (a sketched outlier
    label or another ID class); ``counterfactual``: an ID class. ``counts`` maps origin to number.
    """
    concepts = list(dict.fromkeys(id_names + known))
    taken = set(concepts)
    items: list[dict] = []
    for origin in ORIGINS:
        n = counts.get(origin, 0)
        if n <= 0:
            continue
        rng = np.random.default_rng(derive_seed(seed, "multi_os", origin))
        if origin == "blank":
            pool = [w for w in lexicon if w not in taken]
            picks = [[pool[int(i)]] for i in rng.permutation(len(pool))[:n]]
        elif origin == "counterfactual":
            picks = [[id_names[int(rng.integers(len(id_names)))]] for _ in range(n)]
        else:
            picks = []
            for _ in range(n):
                a = id_names[int(rng.integers(len(id_names)))]
                others = [c for c in concepts if c != a]
                picks.append([a, others[int(rng.integers(len(others)))]] if others else [a, a])
        items += [{"origin": origin, "index": i, "sources": p} for i, p in enumerate(picks)]
    return items

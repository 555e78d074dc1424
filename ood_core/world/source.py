"""The world as a data source: registers itself in the data and lexicon registries on import.

* ID source ``world``: ``data.images_per_class`` rendered images of each ID class
  (``data.max_classes`` takes the first classes), split by ``data.test_fraction``;
* OOD sets ``world-near``, ``world-glyphs``, ``world-textures``, ``world-photos`` (evaluation) and
  ``world-val`` (the validation OOD split: for choices that need OOD data, never for a report);
* pixel source ``world:<tag>:<concept>:<seed>:<index>`` (rendered on demand, nothing on disk);
* lexicon ``world``: the world's nouns and adjectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ood_core.config import DataConfig
from ood_core.data import (
    ID_SOURCES,
    OOD_SETS,
    PIXEL_SOURCES,
    IDDataset,
    ImageRecord,
    PixelSource,
    _n_test,
    slug,
)
from ood_core.lexicon import LEXICONS, Lexicon

from . import concepts as C
from . import render as R

# Bump when the renderer draws other pixels for the same source: data identities (and keys) change.
RENDER_VERSION = "world-render-1"
# Tags keep the pipeline's draws apart from the training draws of the world models.
ID_TAG, OOD_TAG = "id", "ood"

PIXEL_SOURCES.register("world", PixelSource(load=R.render_source, version=RENDER_VERSION))


@ID_SOURCES.register("world")
def world_source(cfg: DataConfig, seed: int) -> IDDataset:
    """Rendered images of the world's ID classes (shapes of every colour, size, place)."""
    classes = C.ID_CLASSES[: cfg.max_classes] if cfg.max_classes else C.ID_CLASSES
    n = cfg.images_per_class
    records = []
    for idx, name in enumerate(classes):
        test_idx = set(R.rng_for(seed, "split", name).permutation(n)[: _n_test(n, cfg.test_fraction)].tolist())
        for i in range(n):
            records.append(ImageRecord(key=f"{slug(name)}_{i:04d}", class_idx=idx, class_name=name,
                                       split="test" if i in test_idx else "train",
                                       source=R.source_of(seed, name, i, ID_TAG)))
    return IDDataset(classnames=list(classes), records=records)


@dataclass(frozen=True)
class WorldOODSet:
    """An OOD set of world concepts: about four ID classes' worth of images, spread evenly."""

    classnames: tuple[str, ...]

    def __call__(self, name: str, cfg: DataConfig, seed: int) -> list[ImageRecord]:
        per = max(2, math.ceil(4 * cfg.images_per_class / len(self.classnames)))
        return [ImageRecord(key=f"{slug(name)}_{slug(c)}_{i:04d}", class_idx=-1, class_name=name, split="test",
                            source=R.source_of(seed, c, i, f"{OOD_TAG}-{name}"))
                for c in self.classnames for i in range(per)]  # fmt: skip


for _name, _concepts in C.OOD_SETS.items():
    OOD_SETS.register(_name, WorldOODSet(_concepts))


@LEXICONS.register("world")
def world_lexicon() -> Lexicon:
    """The world's "WordNet": every noun it knows (rendered or text-only) and its adjectives."""
    return Lexicon("world", list(C.NOUNS), list(C.ADJECTIVES))

"""Class-name lists as data with a name, chosen per method as each reference does.

A list maps a class id (an ImageNet wnid, i.e. the class folder's name) to the name a prompt
takes. Registry ``CLASSNAME_LISTS``:

* ``openai`` — open_clip's cleaned ImageNet names (CLIP's, e.g. "rooster"): what NegLabel, MCM and
  EOE prompt with, and what ``data.classnames: imagenet`` gives the dataset.
* ``wordnet-first-lemma`` — each class's first WordNet lemma (e.g. "cock"): what SynOOD's
  ``"a nice {}"`` ID prompts take (``texts/ind_name.txt``, ``split(",")[1]``). Shipped as
  ``imagenet_wordnet_first_lemma.json``, made by :func:`derive_wordnet_first_lemma` from WordNet 3.0.

``dataset`` (not a list) means the dataset's own names (``data.classnames``); it is what a method
not named in ``finetune.id_names`` uses, and the only choice for data without class ids (world,
skimage).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path

from .registry import Registry

DATASET = "dataset"
# the ID prompt sets of finetune (``finetune.id_names`` keys): eoe = MCM, energy, max-logit, EOE;
# neglabel = NegLabel and SynOOD's score; synood = SynOOD's adapter and text side; mm_ood = MM-OOD, Multi-OS
PROMPT_SETS = ("eoe", "neglabel", "synood", "mm_ood")
FIRST_LEMMA_FILE = Path(__file__).resolve().parent / "imagenet_wordnet_first_lemma.json"

CLASSNAME_LISTS: Registry[Callable[[], dict[str, str]]] = Registry("class-name list")


@CLASSNAME_LISTS.register("openai")
def openai_names() -> dict[str, str]:
    """open_clip's ImageNet-1K class names by wnid."""
    from .data import imagenet_wnid_to_name

    return dict(imagenet_wnid_to_name())


@lru_cache(maxsize=1)
def _first_lemmas() -> dict[str, str]:
    return dict(json.loads(FIRST_LEMMA_FILE.read_text(encoding="utf-8"))["names"])


@CLASSNAME_LISTS.register("wordnet-first-lemma")
def wordnet_first_lemma_names() -> dict[str, str]:
    """Each ImageNet-1K class's first WordNet 3.0 lemma by wnid (the shipped list)."""
    return dict(_first_lemmas())


def derive_wordnet_first_lemma(wnids: Iterable[str], data_noun_lines: Iterable[str]) -> dict[str, str]:
    """wnid -> first lemma of its noun synset (``_`` as space, case kept), from a WordNet
    ``data.noun``: a wnid is ``n`` + the synset's offset. How the shipped list was made
    (wnids: timm's ``imagenet_synsets.txt``; ``data.noun``: Debian's ``wordnet-base``)."""
    from .lexicon import parse_wordnet_synsets

    first = {s.offset: s.words[0] for s in parse_wordnet_synsets(data_noun_lines) if s.words}
    out: dict[str, str] = {}
    for wnid in wnids:
        offset = int(wnid[1:]) if wnid[:1] == "n" and wnid[1:].isdigit() else None
        if offset not in first:
            raise KeyError(f"{wnid} is not a noun synset of this WordNet data.noun")
        out[wnid] = first[offset].replace("_", " ")
    return out


def list_names(choice: str, class_ids: list[str], dataset_names: list[str]) -> list[str]:
    """The names of the classes ``class_ids`` in list ``choice`` (``dataset``: ``dataset_names``)."""
    if choice == DATASET:
        return list(dataset_names)
    table = CLASSNAME_LISTS.get(choice)()
    missing = [c for c in class_ids if c not in table]
    if not class_ids or missing:
        raise ValueError(
            f"class-name list '{choice}' names ImageNet-1K classes by wnid, but "
            + (f"{len(missing)} class id(s) are not in it (e.g. {missing[:3]})" if class_ids
               else "this dataset has no class ids (only an imagefolder of wnid folders has)")
            + f"; use '{DATASET}' for this data"
        )
    return [table[c] for c in class_ids]


def prompt_set_names(choices: dict[str, str], dataset) -> dict[str, list[str]]:
    """Each ID prompt set's class names (``choices`` = ``finetune.id_names``; unnamed: ``dataset``)."""
    return {p: list_names(choices.get(p, DATASET), dataset.class_ids, dataset.classnames) for p in PROMPT_SETS}

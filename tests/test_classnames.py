"""Class-name lists as data with a name, and which list each method's ID prompts take (issue 19)."""

from __future__ import annotations

import pytest
from PIL import Image

from ood_core.classnames import (
    CLASSNAME_LISTS,
    derive_wordnet_first_lemma,
    list_names,
    openai_names,
    prompt_set_names,
    wordnet_first_lemma_names,
)
from ood_core.config import ConfigError, load_config
from ood_core.data import IDDataset, imagefolder_source

# ImageNet classes whose open_clip name and first WordNet lemma differ (cock -> rooster) or agree
WNIDS = ["n01440764", "n01494475", "n01514668"]

DATA_NOUN = """\
  1 licence header
01440764 05 n 02 tench 0 Tinca_tinca 0 000 | a fish
01494475 05 n 02 hammerhead 0 hammerhead_shark 0 000 | a shark
01514668 05 n 01 cock 0 000 | adult male chicken
"""


def test_shipped_lists_cover_imagenet_and_differ_where_the_references_do():
    openai, lemma = openai_names(), wordnet_first_lemma_names()
    assert len(openai) == len(lemma) == 1000 and set(openai) == set(lemma)
    assert [openai[w] for w in WNIDS] == ["tench", "hammerhead shark", "rooster"]
    assert [lemma[w] for w in WNIDS] == ["tench", "hammerhead", "cock"]
    assert 300 < sum(openai[w] != lemma[w] for w in openai) < 400  # 363 measured
    assert {"openai", "wordnet-first-lemma"} <= set(CLASSNAME_LISTS.names())


def test_first_lemma_is_derived_from_wordnet_data():
    assert derive_wordnet_first_lemma(WNIDS, DATA_NOUN.splitlines()) == {
        "n01440764": "tench", "n01494475": "hammerhead", "n01514668": "cock"}
    with pytest.raises(KeyError, match="n09999999"):
        derive_wordnet_first_lemma(["n09999999"], DATA_NOUN.splitlines())


def _imagenet_folder(tmp_path):
    for wnid in WNIDS:
        d = tmp_path / "train" / wnid
        d.mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (40 * i, 80, 120)).save(d / f"{i}.JPEG")
    return tmp_path


def test_each_prompt_set_takes_its_reference_list_in_the_imagenet_preset(tmp_path):
    root = _imagenet_folder(tmp_path)
    cfg = load_config("imagenet", [f"data.root={root}", "data.images_per_class=2"])
    ds = imagefolder_source(cfg.data, 0)
    assert ds.class_ids == WNIDS
    names = prompt_set_names(cfg.finetune.id_names, ds)
    # SynOOD's "a nice {}" (datasets.py load_ind_labels): the first WordNet lemma
    assert names["synood"] == ["tench", "hammerhead", "cock"]
    # NegLabel (class_names.py), MCM / EOE and MM-OOD: open_clip's cleaned names (data.classnames: imagenet)
    for prompts in ("neglabel", "eoe", "mm_ood"):
        assert names[prompts] == ["tench", "hammerhead shark", "rooster"]
    # the earlier behaviour stays a setting: every prompt set on the dataset's names
    old = load_config("imagenet", [f"data.root={root}", "finetune.id_names={}"])
    assert set(map(tuple, prompt_set_names(old.finetune.id_names, ds).values())) == {("tench", "hammerhead shark",
                                                                                      "rooster")}


def test_lists_need_class_ids_and_unknown_lists_are_config_errors():
    world = IDDataset(classnames=["circle", "square"], records=[])
    assert list_names("dataset", world.class_ids, world.classnames) == ["circle", "square"]
    with pytest.raises(ValueError, match="no class ids"):
        list_names("wordnet-first-lemma", world.class_ids, world.classnames)
    with pytest.raises(ValueError, match="not in it"):
        list_names("openai", ["circle"], ["circle"])
    with pytest.raises(ConfigError, match="unknown class-name list 'simple'"):
        load_config("tiny", ["finetune.id_names={synood: simple}"])

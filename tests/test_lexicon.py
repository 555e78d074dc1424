"""Negative-label lexicons: timm's ImageNet-21k lemmas and the WordNet data-file parser."""

from __future__ import annotations

import re

import pytest

from ood_core.lexicon import (
    ADJ_TEMPLATE,
    LEXICONS,
    NOUN_TEMPLATE,
    WORDNET_ENV,
    LexiconError,
    clean_word,
    load_lexicon,
    parse_wordnet_data,
    subsample,
)

CLEAN = re.compile(r"^[a-z0-9][a-z0-9 '\-]*$")

# Lines in the format of WordNet 3.0's data.noun / data.adj (licence header lines start with spaces).
DATA_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by
  2 Princeton University under the following license.
00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived
02084071 05 n 05 dog 0 domestic_dog 0 Canis_familiaris 0 hound 1 Dog 2 042 @ 02083346 n 0000 | a member
09918248 18 n 02 St._Bernard 0 Bernard 1 000 | a saint
03000000 06 n 01 dog 1 000 | duplicate lemma of an earlier synset
04000000 06 n 01 [bracket_thing] 0 000 | stray bracket
"""

DATA_ADJ = """\
  1 This software and database is being provided to you, the LICENSEE, by
00001740 00 a 01 able 0 005 = 05207437 n 0000 | (usually followed by `to')
00002098 00 a 01 unable 0 002 = 05207437 n 0000 | not having
01386000 00 s 02 beautiful(a) 0 lovely(p) 0 000 | delighting the senses
01386001 00 a 0a black 0 blackish 0 x3 0 x4 0 x5 0 x6 0 x7 0 x8 0 x9 0 x10 0 000 | ten words (hex count)
01386002 00 a 01 [ 0 000 | stray bracket from the reference code's list
"""


def test_templates():
    assert NOUN_TEMPLATE.format("cat") == "the nice cat"
    assert ADJ_TEMPLATE.format("red") == "This is a red photo"
    assert {"wordnet", "imagenet21k"} <= set(LEXICONS.names())


def test_clean_word():
    assert clean_word("Canis_familiaris") == "canis familiaris"
    assert clean_word("beautiful(a)") == "beautiful"
    assert clean_word("[") is None
    assert clean_word("[dog]") == "dog"
    assert clean_word("read/write head") is None
    assert clean_word("jack-o'-lantern") == "jack-o'-lantern"
    assert clean_word("  ") is None and clean_word("42") is None


def test_parse_wordnet_fixture():
    nouns = parse_wordnet_data(DATA_NOUN.splitlines())
    assert nouns[1] == ["dog", "domestic_dog", "Canis_familiaris", "hound", "Dog"]
    assert len(nouns) == 5
    adjs = parse_wordnet_data(DATA_ADJ.splitlines())
    assert adjs[2] == ["beautiful(a)", "lovely(p)"]
    assert len(adjs[3]) == 10  # w_cnt is hexadecimal


def test_wordnet_lexicon_from_env_dir(tmp_path, monkeypatch):
    (tmp_path / "data.noun").write_text(DATA_NOUN)
    (tmp_path / "data.adj").write_text(DATA_ADJ)
    monkeypatch.setenv(WORDNET_ENV, str(tmp_path))
    lex = load_lexicon("wordnet")
    assert lex.nouns == ["entity", "dog", "bracket thing"]  # "St._Bernard" fails the regex
    assert lex.adjectives == ["able", "unable", "beautiful", "black"]
    # imagenet21k never depends on whether WordNet is installed (same key, same labels)
    assert load_lexicon("imagenet21k", limit=3).adjectives == []


def test_wordnet_missing_gives_install_hint(tmp_path, monkeypatch):
    monkeypatch.setenv(WORDNET_ENV, str(tmp_path / "none"))
    with pytest.raises(LexiconError, match="apt-get install wordnet-base"):
        load_lexicon("wordnet")


def test_imagenet21k_nouns(monkeypatch, tmp_path):
    monkeypatch.setenv(WORDNET_ENV, str(tmp_path / "none"))
    lex = load_lexicon("imagenet21k")
    assert len(lex.nouns) > 10_000
    assert len(set(lex.nouns)) == len(lex.nouns)
    assert all(CLEAN.match(w) for w in lex.nouns)
    assert lex.adjectives == []
    assert lex.nouns[:2] == ["organism", "benthos"]  # timm's synset order, first lemma
    assert "dog" in lex.nouns


def test_limit_is_deterministic_subsample(monkeypatch, tmp_path):
    monkeypatch.setenv(WORDNET_ENV, str(tmp_path / "none"))
    a = load_lexicon("imagenet21k", limit=50)
    assert a == load_lexicon("imagenet21k", limit=50)
    full = load_lexicon("imagenet21k").nouns
    assert len(a.nouns) == 50 and a.nouns[0] == full[0]
    pos = [full.index(w) for w in a.nouns]
    assert pos == sorted(pos) and pos[-1] > len(full) // 2
    assert subsample(["a", "b"], 5) == ["a", "b"]


# ---------------------------------------------------------------- NegLabel's word lists (issue 19)
NL_NOUN = """\
  1 licence header
00000010 03 n 01 entity 0 000 | noun.Tops
00000020 06 n 02 Hammer 0 mallet 0 000 | noun.artifact: first lemma only, lower-cased
00000030 06 n 01 plain 0 000 | also in adj.all, which NegLabel reads after noun.artifact
00000040 06 n 01 dental 0 000 | also in adj.pert, which NegLabel reads before noun.artifact
00000050 05 n 01 dog 0 000 | noun.animal: not in NegLabel's txtfiles
00000060 13 n 01 bread 0 000 | noun.food: not in NegLabel's txtfiles
00000070 06 n 01 hammer 1 000 | duplicate within its file
"""
NL_ADJ = """\
00000100 00 a 01 abaxial 0 001 ! 00000200 a 0101 | opens its cluster (its antonym head comes later)
00000150 00 s 01 dorsal 0 000 | a satellite of the cluster
00000200 00 a 01 adaxial 0 001 ! 00000100 a 0101 | the cluster's second head
00000250 00 s 01 plain 0 000 | goes to the nouns
00000300 01 a 01 dental 0 000 | adj.pert
00000400 44 a 01 broken 0 000 | adj.ppl
"""


def test_neglabel_word_lists_and_pool_follow_neglabels_procedure(tmp_path, monkeypatch):
    from ood_core.lexicon import NEGLABEL_FILES, neglabel_pool, neglabel_word_lists, parse_wordnet_synsets

    synsets = parse_wordnet_synsets(NL_NOUN.splitlines()) + parse_wordnet_synsets(NL_ADJ.splitlines())
    assert synsets[0].lexname == "noun.Tops" and synsets[7].antonyms == (200,)
    lists = neglabel_word_lists(synsets)
    assert lists["noun.artifact"] == ["hammer", "plain", "dental"]
    assert lists["adj.all"] == ["dorsal", "adaxial", "plain"]  # "abaxial" opens its cluster: left out
    pool = neglabel_pool(lists)
    # NegLabel's file order: adj.pert < noun.Tops < noun.artifact < adj.all < adj.ppl; one dedupe
    assert pool.nouns == ["entity", "hammer", "plain"]
    assert pool.adjectives == ["dental", "dorsal", "adaxial", "broken"]
    assert "noun.animal" not in NEGLABEL_FILES and "noun.food" not in NEGLABEL_FILES and len(NEGLABEL_FILES) == 27
    # another file order moves the shared words: a word goes to the first file read
    swapped = neglabel_pool(lists, ["adj.all", "noun.artifact", "adj.pert"])
    assert swapped.nouns == ["hammer", "dental"] and swapped.adjectives == ["dorsal", "adaxial", "plain"]
    (tmp_path / "data.noun").write_text(NL_NOUN)
    (tmp_path / "data.adj").write_text(NL_ADJ)
    monkeypatch.setenv(WORDNET_ENV, str(tmp_path))
    assert load_lexicon("neglabel") == pool
    assert "dog" in load_lexicon("wordnet").nouns  # the full-WordNet lexicon stays as it was


def _fixture_wordnet(directory, n_nouns, n_adjs):
    nouns = "".join(f"{10 + i:08d} 06 n 01 noun{i:02d} 0 000 | x\n" for i in range(n_nouns))
    adjs = "".join(f"{10 + i:08d} 00 s 01 adj{i:02d} 0 000 | x\n" for i in range(n_adjs))
    (directory / "data.noun").write_text(nouns)
    (directory / "data.adj").write_text(adjs)


def test_neglabel_pool_size_and_dropped_remainder_through_the_sketch_stage(tmp_path, monkeypatch):
    """20 nouns + 12 adjectives, keep 50 %: 10 + 6 kept; 6 groups drop 16 mod 6 = 4 negatives, and
    (NegLabel: nouns then adjectives, each from the least ID-like up) those are the 4 most ID-like
    kept adjectives."""
    from types import SimpleNamespace

    import numpy as np
    import torch

    from ood_core.config import load_config
    from ood_core.scores import neglabel_groups
    from ood_core.stages.base import ShardOutput
    from ood_core.stages.sketch import SketchStage

    _fixture_wordnet(tmp_path, 20, 12)
    monkeypatch.setenv(WORDNET_ENV, str(tmp_path))
    rng = np.random.default_rng(0)
    words = [f"noun{i:02d}" for i in range(20)] + [f"adj{i:02d}" for i in range(12)]
    closeness = dict(zip(words, rng.permutation(len(words)) / len(words), strict=True))

    def encode(texts):  # cosine to the single ID prompt = the word's closeness
        c = [next((v for w, v in closeness.items() if f" {w} " in f" {t} "), 1.0) for t in texts]
        return torch.tensor([[x, (1 - x * x) ** 0.5] for x in c], dtype=torch.float32)

    def run(order):
        cfg = load_config("tiny", ["sketch.lexicon=neglabel", "sketch.neg_keep_fraction=0.5",
                                   f"sketch.neg_order={order}", "data.ood_sets=[]", "data.max_classes=1"])
        ctx = SimpleNamespace(cfg=cfg, models=SimpleNamespace(clip=lambda: SimpleNamespace(encode_texts=encode)),
                              dataset=SimpleNamespace(classnames=["zebra"]), text_features=encode,
                              log=lambda m: None)
        out = ShardOutput()
        SketchStage()._negatives(ctx, out)
        return [r["text"] for r in out.rows if r["status"] == "kept"]

    kept = run("score")
    nouns, adjs = sorted(words[:20], key=closeness.get), sorted(words[20:], key=closeness.get)
    assert kept == nouns[:10] + adjs[:6]  # pool size: floor(0.5 * 20) + floor(0.5 * 12)
    used = set(np.concatenate(neglabel_groups(len(kept), 6)).tolist())
    assert [kept[i] for i in range(len(kept)) if i not in used] == adjs[2:6]  # the most ID-like kept adjectives
    # the earlier order (lexicon order) keeps the same set but drops other negatives
    lexicon_order = run("lexicon")
    assert sorted(lexicon_order) == sorted(kept) and lexicon_order != kept

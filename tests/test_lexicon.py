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

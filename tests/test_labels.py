"""MLLM answer parsing, label hygiene and SynOOD's context prompt."""

from __future__ import annotations

import numpy as np
import pytest

from ood_core.labels import (
    LabelVerdict,
    context_prompt,
    kept_labels,
    label_hygiene,
    normalize_label,
    parse_label_list,
)

CHATTY_NUMBERED = """Sure! Here are 5 labels that look similar to the ID classes but are unrelated:

1. **Toaster** – a shiny kitchen appliance
2. "Traffic Cone"
3) paper lantern.
4. Snow globe: decorative glass ball
5. toaster
6. 1969

**Note**: all of these are unrelated.
I hope this helps! Let me know if you need more."""

BULLETS = """Here is the list:
- Foo Bar
- baz
* qux quux corge grault
• 'Quoted Thing'!
- """

COMMAS = "Here are some outlier labels: jellyfish, hot air balloon, a lighthouse, and Ferris wheel."


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CHATTY_NUMBERED, ["toaster", "traffic cone", "paper lantern", "snow globe"]),
        (BULLETS, ["foo bar", "baz", "quoted thing"]),
        (COMMAS, ["jellyfish", "hot air balloon", "lighthouse", "ferris wheel"]),
        ("1. sea anemone 2. coral reef 3. kelp forest", ["sea anemone", "coral reef", "kelp forest"]),
        ("Lamp\nKettle\n\nDesk fan", ["lamp", "kettle", "desk fan"]),
        ("Note: these are unrelated.\nLabels: umbrella; Wind-Chime", ["umbrella", "wind-chime"]),
        ("(1) Hockey puck (a sports item)\n(2) sea urchin", ["hockey puck", "sea urchin"]),
        ("", []),
    ],
)
def test_parse_label_list(text, expected):
    assert parse_label_list(text, max_words=3) == expected


def test_parse_max_words():
    assert parse_label_list("1. big red fire truck\n2. truck", max_words=3) == ["truck"]
    assert parse_label_list("1. big red fire truck\n2. truck", max_words=4) == ["big red fire truck", "truck"]


def test_normalize_label():
    assert normalize_label("  The **Golden_Gate** Bridge. ") == "golden gate bridge"
    assert normalize_label("\u201cAn apple\u201d") == "apple"
    assert normalize_label("jack-o'-lantern!") == "jack-o'-lantern"


def _by_label(vs: list[LabelVerdict]) -> dict[str, LabelVerdict]:
    return {v.raw: v for v in vs}


def test_hygiene_reasons_and_order():
    cands = ["Toaster", "toaster", "coffee table", "cats", "Cat", "", "!!", "grid pattern",
             "a very long label here", "the rocket", "moon rock", "Cup of tea", "Moons"]  # fmt: skip
    vs = label_hygiene(cands, ["cat", "coffee cup", "rocket"], eval_ood_names=["grid", "Moon"], max_words=3)
    assert [v.raw for v in vs] == cands  # one verdict each, input order
    got = {v.raw: (v.status, v.reason, v.matched) for v in vs}
    assert got["Toaster"] == ("kept", "ok", None)
    assert got["toaster"] == ("rejected", "duplicate", "toaster")
    assert got["coffee table"] == ("rejected", "overlaps_id_class", "coffee cup")
    assert got["cats"] == ("rejected", "overlaps_id_class", "cat")
    assert got["Cat"] == ("rejected", "equals_id_class", "cat")
    assert got[""][1] == "empty" and got["!!"][1] == "empty"
    assert got["a very long label here"][1] == "too_long"
    assert got["the rocket"] == ("rejected", "equals_id_class", "rocket")
    assert got["Cup of tea"] == ("rejected", "overlaps_id_class", "coffee cup")  # "of" ignored
    v = _by_label(vs)
    # leakage names a class whole (a plural folded), not by a shared word; flagged, not rejected here
    assert v["Moons"].status == "kept" and v["Moons"].leakage and v["Moons"].leak_match == "Moon"
    assert not v["grid pattern"].leakage and not v["moon rock"].leakage and not v["Toaster"].leakage
    assert kept_labels(vs) == ["toaster", "grid pattern", "moon rock", "moons"]


def test_stop_words_do_not_overlap():
    vs = label_hygiene(["house of cards"], ["bottle of wine"], eval_ood_names=[])
    assert vs[0].status == "kept"


def test_hygiene_cosine_rejection():
    calls = []

    def fake_cosine(labels, classes):
        calls.append(list(labels))
        return np.array([[0.95, 0.1] if lab == "lamp" else [0.2, 0.84] for lab in labels])

    vs = label_hygiene(["lamp", "kettle", "cat"], ["cat", "dog"], eval_ood_names=[], text_cosine=fake_cosine)
    assert calls == [["lamp", "kettle"]]  # only survivors of the word checks, once
    assert (vs[0].status, vs[0].reason, vs[0].matched) == ("rejected", "too_similar_to_id", "cat")
    assert (vs[1].status, vs[1].reason) == ("kept", "ok")
    assert vs[2].reason == "equals_id_class"
    with pytest.raises(ValueError, match="shape"):
        label_hygiene(["lamp"], ["cat"], eval_ood_names=[], text_cosine=lambda a, b: np.zeros((2, 2)))


def test_context_prompt():
    ctx = "The sandy beach with waves and a blue sky, palm trees in the distance, and rocks near the water."
    p = context_prompt(ctx)
    assert p.startswith("A photo only remain the sandy beach") and p.endswith(".")
    body = p[len("A photo only remain ") : -1]
    assert len(body) <= 73 and ctx.lower().startswith(body.lower()[:10])
    assert not body.endswith((",", " "))
    assert ctx[len(body)] in " ,"  # cut at a word boundary
    assert context_prompt("A kitchen counter.\n\nWith tiles") == "A photo only remain a kitchen counter. With tiles."
    assert context_prompt("TV stand") == "A photo only remain TV stand."
    long_word = "x" * 100
    assert context_prompt(long_word) == f"A photo only remain {'x' * 73}."
    assert len(context_prompt("word " * 40, max_chars=20)) <= len("A photo only remain .") + 20
    with pytest.raises(ValueError):
        context_prompt(" . ")


def test_undecodable_bytes_and_control_characters_are_removed():
    from ood_core.labels import context_prompt, normalize_label

    assert normalize_label("ro\ufffd\ufffd\x10\x10 fox") == "ro fox"
    prompt = context_prompt("ro\ufffd\x10 grass\x05 field")
    assert "\ufffd" not in prompt and "\x10" not in prompt and "\x05" not in prompt
    assert prompt == "A photo only remain ro grass field."


# ---------------------------------------------------------------- label leakage (ood_core.leakage)
def _write_wordnet(d):
    """A WordNet in the real file format with the few synsets the leakage test needs."""
    noun = {  # offset: (lemmas, hypernym offsets)
        "00000001": (["creek", "brook"], ["00000010"]), "00000010": (["stream", "watercourse"], []),
        "00000020": (["wave", "moving_ridge"], []), "00000021": (["tidal_wave"], ["00000020"]),
        "00000022": (["roll", "roster"], []), "00000023": (["roller", "roll", "rolling_wave"], ["00000020"]),
        "00000030": (["striped_bass", "striper"], ["00000031"]), "00000031": (["bass"], []),
        "00000040": (["grid", "gridiron"], []), "00000041": (["power_grid", "grid"], []),
        "00000050": (["dotted_line"], ["00000051"]), "00000051": (["line"], []),
        "00000060": (["bubbly", "champagne"], []),
    }
    adj = {"00000100": (["striped", "stripy"], []), "00000101": (["banded"], []), "00000102": (["bubbly"], [])}
    for pos, table, tag in (("noun", noun, "n"), ("adj", adj, "a")):
        data, index = [], {}
        for off, (lemmas, hyps) in table.items():
            ptrs = " ".join(f"@ {h} n 0000" for h in hyps)
            words = " ".join(f"{w} 0" for w in lemmas)
            data.append(f"{off} 05 {tag} {len(lemmas):02x} {words} {len(hyps):03d} {ptrs} | gloss".replace("  ", " "))
            for w in lemmas:
                index.setdefault(w, []).append(off)
        (d / f"data.{pos}").write_text("  1 licence header\n" + "\n".join(data) + "\n")
        (d / f"index.{pos}").write_text("".join(f"{w} {tag} {len(o)} 0 {len(o)} 0 {' '.join(o)}\n"
                                                for w, o in sorted(index.items())))


def test_leakage_names_classes_whole_with_wordnet_synonyms_and_hypernyms(tmp_path, monkeypatch):
    from ood_core.data import DTD_CLASSNAMES, SUN_CLASSNAMES
    from ood_core.leakage import leak_index

    _write_wordnet(tmp_path)
    monkeypatch.setenv("SYNTH_OOD_WORDNET_DIR", str(tmp_path))
    names = [("Textures", n) for n in DTD_CLASSNAMES] + [("SUN", n) for n in SUN_CLASSNAMES]
    index = leak_index(names)
    decisions = {lab: (m.ood_set, m.name, m.how) if (m := index.match(lab)) else None for lab in [
        "banded", "Stripy", "brook", "tidal wave", "waterfalls", "broadleaf forest", "grids",
        "woven basket", "striped bass", "dotted line", "power grid", "roll", "champagne", "bass"]}
    assert decisions == {
        "banded": ("Textures", "banded", "equal"),  # DTD's own name
        "Stripy": ("Textures", "striped", "synonym"),  # shares the synset of 'striped'
        "brook": ("SUN", "creek", "synonym"),
        "tidal wave": ("SUN", "wave", "hypernym"),  # a kind of wave
        "waterfalls": ("SUN", "waterfall/block", "equal"),  # plural; a SUN category without its subcategory
        "broadleaf forest": ("SUN", "forest/broadleaf", "equal"),
        "grids": ("Textures", "grid", "equal"),
        # a shared word is not a name; a rarer sense is not the class's
        "woven basket": None, "striped bass": None, "dotted line": None, "power grid": None,
        "roll": None,  # first sense a list of names, a sea wave only rarely
        "champagne": None,  # DTD's 'bubbly' is the adjective, not the noun
        "bass": None,
    }
    # the earlier rule, still a named option, flags any shared word
    old = leak_index(names, "word_overlap")
    assert {lab: old.match(lab).how for lab in ("woven basket", "striped bass", "dotted line")} == dict.fromkeys(
        ("woven basket", "striped bass", "dotted line"), "word")
    # without WordNet only whole names are found
    monkeypatch.setenv("SYNTH_OOD_WORDNET_DIR", str(tmp_path / "absent"))
    bare = leak_index(names)
    assert bare.match("banded").how == "equal" and bare.match("brook") is None and bare.match("tidal wave") is None


def test_standard_benchmark_class_lists_ship_for_the_leakage_check():
    from ood_core.data import ood_classnames

    sizes = {s: len(ood_classnames(s)) for s in ("iNaturalist", "SUN", "Places", "Textures", "places365", "dtd")}
    assert sizes == {"iNaturalist": 110, "SUN": 50, "Places": 50, "Textures": 47, "places365": 50, "dtd": 47}
    assert "Cercis canadensis" in ood_classnames("iNaturalist") and "waterfall/plunge" in ood_classnames("SUN")
    assert "underwater/ocean_deep" in ood_classnames("Places") and "polka-dotted" in ood_classnames("Textures")

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

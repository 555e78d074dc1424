"""Hostile MLLM labels and contexts (issue 18, item 12): path traversal, invisible characters that
split words, homoglyphs, ANSI escapes. Each case passed the hygiene before the fix."""

from __future__ import annotations

from typing import get_args

import pytest

from ood_core.labels import (
    Reason,
    clean_text,
    context_prompt,
    kept_labels,
    label_hygiene,
    normalize_label,
    parse_label_list,
)

ID = ["cat", "coffee cup", "rocket"]
EVAL = ["brick", "Moon"]


def _verdict(label: str, **kw):
    (v,) = label_hygiene([label], ID, eval_ood_names=EVAL, **kw)
    assert v.reason in get_args(Reason)  # every reason is in the manifest's vocabulary
    return v


@pytest.mark.parametrize("label", ["../../etc/x", "..\\..\\boot.ini", "salt/pepper", "back\\slash", "x..y",
                                   "/etc/passwd", "\u2024\u2024/x"])  # fmt: skip
def test_path_separators_and_traversal_are_rejected(label):
    v = _verdict(label)
    assert (v.status, v.reason) == ("rejected", "unsafe_characters"), v


def test_traversal_from_an_answer_never_reaches_the_kept_labels():
    labels = parse_label_list("1. ../../etc/x\n2. toaster\n3. ..\\windows", max_words=3)
    assert kept_labels(label_hygiene(labels, ID, eval_ood_names=EVAL)) == ["toaster"]


@pytest.mark.parametrize("sep", ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\u00ad", "\u034f", "\x00",
                                 "\x7f", "\u202e", "\ue000", "\ufe0f"])  # fmt: skip
def test_invisible_characters_do_not_split_words(sep):
    cat = sep.join("cat")
    assert normalize_label(cat) == "cat"
    assert (_verdict(cat).reason, _verdict(cat).matched) == ("equals_id_class", "cat")
    v = _verdict(f"co{sep}ffee table")
    assert (v.reason, v.matched) == ("overlaps_id_class", "coffee cup")
    leak = _verdict(f"br{sep}icks")
    assert leak.leakage and leak.leak_match == "brick" and leak.label == "bricks"


def test_invisible_characters_in_an_answer_are_removed_before_parsing():
    answer = "1. c\u200ba\u200bt\n2. ro\u00adck\u00adet\n3. \u200bmoon\u200b rock\n4. lamp\u2060shade"
    labels = parse_label_list(answer, max_words=3)
    assert labels == ["cat", "rocket", "moon rock", "lampshade"]
    vs = {v.label: v for v in label_hygiene(labels, ID, eval_ood_names=EVAL)}
    assert vs["cat"].reason == "equals_id_class" and vs["rocket"].reason == "equals_id_class"
    # a label sharing a word with an evaluation class ("Moon") does not name it
    assert not vs["moon rock"].leakage and kept_labels(vs.values()) == ["moon rock", "lampshade"]


@pytest.mark.parametrize("label", ["r\u043ecket", "\u0441offee table", "t\u043easter", "b\u03b1nana",
                                   "paper l\u0430ntern"])  # fmt: skip
def test_mixed_script_homoglyphs_are_rejected(label):
    v = _verdict(label)
    assert (v.status, v.reason) == ("rejected", "mixed_script"), v


def test_single_script_words_are_not_mixed_script():
    vs = label_hygiene(["\u03b2-carotene", "\u0440\u0430\u043a\u0435\u0442\u0430", "caf\u00e9 sign"], ID,
                       eval_ood_names=EVAL)
    assert [v.reason for v in vs] == ["ok", "ok", "ok"]


def test_ansi_escapes_are_stripped_from_labels():
    assert normalize_label("\x1b[1;31mToaster\x1b[0m") == "toaster"
    assert normalize_label("[31mtoaster[0m") == "toaster"  # an SGR fragment whose ESC was lost
    assert normalize_label("\x1b]0;owned\x07kettle") == "kettle"  # OSC (terminal title)
    assert parse_label_list("\x1b[32m1. kettle\x1b[0m\n\x1b[32m2. lamp\x1b[0m", max_words=3) == ["kettle", "lamp"]
    assert _verdict("\x1b[7mc\x1b[0mat").reason == "equals_id_class"


def test_context_prompt_is_cleaned_like_a_label():
    reply = "\x1b[1mA san\u00addy be\u200bach\x1b[0m with\x1b]0;pwned\x07 waves\x1b[2K and [33mpalm trees"
    assert context_prompt(reply) == "A photo only remain a sandy beach with waves and palm trees."
    prompt = context_prompt("\u202eA\u2066 grassy\x00 field\u2069 " + "\u200b" * 500 + "at dusk")
    assert prompt == "A photo only remain a grassy field at dusk."
    assert all(ch.isprintable() for ch in context_prompt("\x1b[31m" * 50 + "red\x9b0m wall " * 20))


def test_context_prompt_stays_bounded_when_invisible_characters_pad_it():
    reply = "\u200b".join("an ocean of sand stretching far beyond the horizon under a cloudless sky " * 3)
    prompt = context_prompt(reply, max_chars=40)
    assert len(prompt) <= len("A photo only remain .") + 40 and "\u200b" not in prompt


def test_clean_text_keeps_line_breaks_and_words():
    assert clean_text("one\u200b\ntwo\tthree\x0bfour") == "one\ntwo three four"
    assert clean_text("\ufb01sh \uff34\uff36") == "fish TV"  # NFKC: ligatures and full-width letters

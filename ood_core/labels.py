"""Turning MLLM answers into outlier labels, and keeping those labels honest.

* :func:`parse_label_list` reads the list out of a chatty answer (numbered lists, bullets, comma
  lists, preambles, markdown, descriptions after a colon or dash).
* :func:`clean_text` is the character cleaning every MLLM text goes through first (NFKC; ANSI
  escapes, format and control characters removed), so invisible characters cannot split a word.
* :func:`label_hygiene` gives every candidate exactly one :class:`LabelVerdict`: rejected when it is
  empty, holds path characters, mixes scripts, is too long, a duplicate, equal to /
  word-overlapping / too text-similar to an ID class; and
  flagged (not rejected) when it names an evaluation OOD class (:mod:`ood_core.leakage`) — label
  leakage, which would make the benchmark numbers meaningless.
* :func:`context_prompt` builds SynOOD's ``A photo only remain {context}.`` prompt.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:
    from ood_core.leakage import LeakIndex

STOP_WORDS = frozenset(
    "a an the of and or in on at by for from to with without into onto over under its it this that "
    "these those some any".split()
)

_QUOTES = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u00a0": " "})
_TRIM = " \t\"'`.,;:!?-\u2013\u2014[]{}()<>*_#"
# List markers: bullets, "1." "1)" "(1)" "1:" and "a)".
_MARKER = re.compile(r"^\s*(?:[-*\u2022+\u00b7\u2013\u2014>]+(?=\s)|\(?\d{1,3}[.):]|\(?\d{1,3}\s+-|[a-z]\))\s*")
# A description after the label inside a list item: "Toaster: a kitchen ...", "Toaster - a ...".
_DESC = re.compile(r":\s|:$|\s[-\u2013\u2014]\s|,")
_PREAMBLE = re.compile(
    r"^(?:sure|here|certainly|of course|okay|ok|great|absolutely|i\b|i'm|i've|these|this|note|"
    r"let me|hope|below|the following|as requested)",
    re.IGNORECASE,
)


# ANSI escape sequences (CSI such as colours, OSC such as terminal titles, two-character escapes),
# and SGR fragments whose ESC was lost ("[31m"): terminal noise, never part of a label or a context.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b\n]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]|\x9b[0-?]*[ -/]*[@-~]"
    r"|\[[0-9;]{0,12}m"
)
# Invisible characters outside category Cf (fillers, variation selectors, the grapheme joiner).
_INVISIBLE = frozenset("\u034f\u115f\u1160\u17b4\u17b5\u180b\u180c\u180d\u3164\uffa0\u2800") | frozenset(
    map(chr, range(0xFE00, 0xFE10))
)


def clean_text(s: str) -> str:
    r"""NFKC, typographic quotes made plain, ANSI escapes stripped; format (Cf), private-use and
    unassigned characters and non-whitespace controls (Cc) removed, so ``c\u200ba\u200bt`` is
    ``cat`` before any word is split; whitespace controls become spaces, except line breaks, which
    separate list items; U+FFFD (undecodable bytes from a model) becomes a space."""
    s = _ANSI.sub("", unicodedata.normalize("NFKC", s).translate(_QUOTES))
    out = []
    for ch in s:
        cat = unicodedata.category(ch)
        if ch in "\n\r":
            out.append(ch)
        elif ch == "\ufffd" or (cat == "Cc" and ch.isspace()):
            out.append(" ")
        elif cat[0] != "C" and ch not in _INVISIBLE:
            out.append(ch)
    return "".join(out)


def printable(s: str) -> str:
    """:func:`clean_text` on one line: line breaks become spaces too."""
    return re.sub(r"[\r\n]", " ", clean_text(s))


def normalize_label(s: str) -> str:
    """Canonical label: :func:`clean_text`, lower-case, no markdown/quotes/parentheticals/leading
    article, one space."""
    s = printable(s)
    s = s.replace("_", " ")
    s = re.sub(r"[*`#]+", "", s)
    s = re.sub(r"\([^)]*\)|\[[^\]]*\]", " ", s)
    s = re.sub(r"\s+", " ", s.lower()).strip(_TRIM + " ")
    s = re.sub(r"^(?:a|an|the)\s+", "", s).strip(_TRIM + " ")
    return s


def _words(label: str) -> list[str]:
    return label.split()


def _has_letter(s: str) -> bool:
    return any(ch.isalpha() for ch in s)


def _split_inline_numbering(text: str) -> str:
    # "1. foo 2. bar 3. baz" on one line -> one item per line.
    return re.sub(r"(?<=\S)[ \t,;]+(?=\(?\d{1,3}[.)]\s)", "\n", text)


def _list_items(text: str) -> list[str]:
    """The raw list items of an answer, in order (see :func:`parse_label_list`)."""
    text = _split_inline_numbering(clean_text(text))
    lines = [ln.strip() for ln in text.replace("\r", "\n").split("\n") if ln.strip()]
    marked = [(ln, _MARKER.match(ln)) for ln in lines]
    items: list[str] = []
    if any(m and m.end() < len(ln) for ln, m in marked):
        for ln, m in marked:
            if not m:
                continue
            body = re.sub(r"[*`]+", "", ln[m.end() :]).strip()
            # One label per item: drop what follows a description separator.
            items.append(_DESC.split(body, maxsplit=1)[0])
    else:
        for ln in lines:
            body = re.sub(r"[*`]+", "", ln).strip()
            if body.endswith(":"):
                continue
            if ":" in body:
                body = body.rsplit(":", 1)[1].strip()
            if _PREAMBLE.match(body):
                continue
            items.extend(re.split(r"[,;]", body))
    return items


def _item_labels(items: list[str], max_words: int) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        item = re.sub(r"^\s*(?:and|or)\s+", "", item, flags=re.IGNORECASE)
        label = normalize_label(item)
        if not _has_letter(label) or not content_words(label) or len(_words(label)) > max_words:
            continue
        if label not in seen:
            seen.add(label)
            out.append(label)
    return out


def parse_label_list(text: str, max_words: int) -> list[str]:
    """Labels listed in an MLLM answer: lower-case, ordered, deduplicated, at most ``max_words`` words.

    If any line carries a list marker only marked lines count (preamble and sign-off are ignored);
    otherwise lines are split on commas/semicolons and chatty lines are skipped.
    """
    return _item_labels(_list_items(text), max_words)


# ---------------------------------------------------------------- bounded answers
@dataclass(frozen=True)
class Cut:
    """What a bound cut off one MLLM answer: a manifest ``reason`` and the detail for its ``error``."""

    reason: Literal["answer_truncated", "too_many_labels"]
    detail: str


def bound_answer(reply: str, max_bytes: int) -> tuple[str, Cut | None]:
    """``reply`` cut to at most ``max_bytes`` bytes of UTF-8 (at a character boundary), and the cut."""
    if len(reply) * 4 <= max_bytes:  # no character takes more than 4 bytes
        return reply, None
    data = reply.encode("utf-8", errors="surrogatepass")
    if len(data) <= max_bytes:
        return reply, None
    kept = data[:max_bytes].decode("utf-8", errors="ignore")
    return kept, Cut("answer_truncated", f"answer of {len(data)} bytes cut to its first {max_bytes} "
                                         f"(models.mllm.max_answer_bytes)")


def answer_labels(text: str, max_words: int, max_labels: int) -> tuple[list[str], Cut | None]:
    """:func:`parse_label_list` reading at most ``max_labels`` list items, and the cut."""
    items, cut = _list_items(text), None
    if len(items) > max_labels:
        cut = Cut("too_many_labels", f"answer lists {len(items)} items; the first {max_labels} were read "
                                     f"(models.mllm.max_answer_labels)")
        items = items[:max_labels]
    return _item_labels(items, max_words), cut


# ---------------------------------------------------------------- instructions, role markers, URLs
# An answer that talks to a model ("ignore previous instructions"), carries chat-template role
# markers or links is not a description of an image: such text never becomes a prompt.
_INJECTION = (
    ("an instruction to a model", re.compile(
        r"\b(?:ignore|disregard|forget|override|bypass)\b(?:\W+\w+){0,4}?\W+(?:previous|prior|above|earlier|all|"
        r"any|your|the|these|those|system)\b(?:\W+\w+){0,3}?\W+(?:instructions?|prompts?|rules?|messages?|"
        r"directions?|guidelines?|context)\b"
        r"|\b(?:you are now|from now on,? you|pretend to be|new instructions?|system prompt|"
        r"jailbreak|developer mode|do anything now)\b", re.IGNORECASE)),
    ("a chat role marker", re.compile(
        r"<\|[a-z_]*\|>|\[/?inst\]|<</?sys>>|</?s>|#{2,}\s*(?:instruction|system|response)\b"
        r"|(?:^|[\n\[(<.!?;])\s*(?:system|assistant|user|human|developer)\s*[:>\])]", re.IGNORECASE)),
    ("a URL", re.compile(
        r"\b(?:https?|ftp|file|data|javascript)\s*:\s*//?|\bwww\.[^\s.]+\.|\b[\w-]+\.(?:com|net|org|io|ru|cn|xyz|"
        r"top|info|biz|ly|me|co|app|dev|onion)\b(?!\.\w)", re.IGNORECASE)),
)


def injection(text: str) -> str | None:
    """What makes ``text`` an instruction rather than a description (e.g. ``a URL: 'www.x.ru'``), or None."""
    s = clean_text(text)
    for what, pattern in _INJECTION:
        m = pattern.search(s)
        if m:
            return f"{what}: {m.group(0).strip()[:60]!r}"
    return None


# ---------------------------------------------------------------- hygiene
Reason = Literal[
    "ok", "duplicate", "equals_id_class", "overlaps_id_class", "too_similar_to_id", "empty", "too_long",
    "unsafe_characters", "mixed_script", "injection",
]
# a name of an object, not a padded answer: 3 long words fit
MAX_LABEL_CHARS = 64

# A label becomes a prompt, a manifest value and (in a report) text near file names: path
# separators and traversal have no place in an object's name.
_UNSAFE = re.compile(r"[/\\]|\.\.")
_SCRIPTS = ("LATIN", "CYRILLIC", "GREEK")


def unsafe_characters(label: str) -> bool:
    """``label`` holds a path separator (``/``, ``\\``) or a traversal (``..``)."""
    return bool(_UNSAFE.search(label))


def _script(ch: str) -> str | None:
    name = unicodedata.name(ch, "")
    return next((sc for sc in _SCRIPTS if name.startswith(sc + " ")), None)


def mixed_script(label: str) -> bool:
    r"""Some word of ``label`` (a run of letters) mixes Latin with Cyrillic or Greek letters: a
    homoglyph such as ``r\u043ecket`` (Cyrillic o). Such labels are rejected, not folded to Latin:
    a folding table never covers every look-alike, and a rejection is visible in the manifest."""
    for word in re.findall(r"[^\W\d_]+", label):
        scripts = {sc for ch in word if (sc := _script(ch))}
        if "LATIN" in scripts and len(scripts) > 1:
            return True
    return False


@dataclass(frozen=True)
class LabelVerdict:
    """The fate of one candidate label.

    ``label`` is the normalised label; ``raw`` the input. ``matched`` names the ID class (or the
    earlier label, for duplicates) behind a rejection; ``leak_match`` the evaluation OOD class name
    behind ``leakage``.
    """

    label: str
    status: Literal["kept", "rejected"]
    reason: Reason
    leakage: bool
    matched: str | None = None
    raw: str = ""
    leak_match: str | None = None


def word_variants(word: str) -> set[str]:
    """``word`` and its cheap singular forms, so "cats" overlaps "cat" and "boxes" overlaps "box"."""
    out = {word}
    if len(word) > 3 and word.endswith("ies"):
        out.add(word[:-3] + "y")
    if len(word) > 3 and word.endswith("es"):
        out.add(word[:-2])
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        out.add(word[:-1])
    return out


def content_words(label: str) -> set[str]:
    """Word forms of ``label`` that carry meaning (stop-words dropped, plurals folded)."""
    toks = re.findall(r"[^\W_]+(?:'[^\W_]+)?", normalize_label(label))
    out: set[str] = set()
    for t in toks:
        if t not in STOP_WORDS:
            out |= word_variants(t)
    return out


@dataclass(frozen=True)
class NameIndex:
    """Class names normalised once: each normalised name's first name, each content word's first name."""

    equal: dict[str, str]
    word_first: dict[str, tuple[int, str]]

    def match(self, label: str, words: set[str]) -> tuple[str | None, str | None]:
        """(equal name, overlapping name) of ``label``: the first name equal to it, else the first
        name (in list order) sharing a content word with it."""
        if label in self.equal:
            return self.equal[label], None
        hits = [self.word_first[w] for w in words if w in self.word_first]
        return None, (min(hits)[1] if hits else None)


@functools.lru_cache(maxsize=64)
def name_index(names: tuple[str, ...]) -> NameIndex:
    """The :class:`NameIndex` of ``names`` (cached: sketch calls hygiene once per class with the same names)."""
    equal: dict[str, str] = {}
    word_first: dict[str, tuple[int, str]] = {}
    for i, name in enumerate(names):
        equal.setdefault(normalize_label(name), name)
        for w in content_words(name):
            word_first.setdefault(w, (i, name))
    return NameIndex(equal, word_first)


def label_hygiene(
    candidates: list[str],
    id_classnames: list[str],
    *,
    eval_ood_names: Sequence[str | tuple[str, str]] | LeakIndex | None = None,
    text_cosine: Callable[[list[str], list[str]], np.ndarray] | None = None,
    overlap_cosine: float = 0.85,
    max_words: int | None = None,
    max_chars: int = MAX_LABEL_CHARS,
) -> list[LabelVerdict]:
    """One verdict per candidate, in input order.

    Labels are normalised first (:func:`normalize_label`: NFKC, no format/control/ANSI
    characters). Checks, first failing wins: empty, unsafe_characters (``/``, ``\\``, ``..``),
    mixed_script (a word mixing Latin with Cyrillic/Greek, see :func:`mixed_script`), injection
    (an instruction, role marker or URL, see :func:`injection`), too_long (> ``max_words`` words
    or > ``max_chars`` characters), duplicate, equals_id_class, overlaps_id_class (shared content word),
    too_similar_to_id (max of ``text_cosine(labels, id_classnames)`` above ``overlap_cosine``).
    Independently, ``leakage`` is set when the label names a class of ``eval_ood_names`` (names,
    ``(set, name)`` pairs or a :class:`ood_core.leakage.LeakIndex`; plain names are matched whole,
    with their WordNet synonyms and hypernyms: :mod:`ood_core.leakage`); ``leak_match`` is that class.
    """
    from ood_core.leakage import LeakIndex, leak_index

    leaks = eval_ood_names if isinstance(eval_ood_names, LeakIndex) else leak_index(list(eval_ood_names or []))
    id_index = name_index(tuple(id_classnames))

    verdicts: list[dict] = []
    seen: dict[str, str] = {}
    pending: list[int] = []  # survivors of the word-level checks, for the cosine check
    for raw in candidates:
        label = normalize_label(raw)
        v = {"label": label, "raw": raw, "status": "rejected", "leakage": False, "matched": None}
        verdicts.append(v)
        if not label or not _has_letter(label) or not content_words(label):
            v["reason"] = "empty"
            continue
        words = content_words(label)
        if leak := leaks.match(label):
            v["leakage"], v["leak_match"] = True, leak.name
        if unsafe_characters(label):
            v["reason"] = "unsafe_characters"
            continue
        if mixed_script(label):
            v["reason"] = "mixed_script"
            continue
        if injection(label):
            v["reason"] = "injection"
            continue
        if len(label) > max_chars or (max_words is not None and len(_words(label)) > max_words):
            v["reason"] = "too_long"
            continue
        if label in seen:
            v["reason"], v["matched"] = "duplicate", seen[label]
            continue
        seen[label] = label
        eq, ov = id_index.match(label, words)
        if eq:
            v["reason"], v["matched"] = "equals_id_class", eq
        elif ov:
            v["reason"], v["matched"] = "overlaps_id_class", ov
        else:
            v["status"], v["reason"] = "kept", "ok"
            pending.append(len(verdicts) - 1)

    if text_cosine is not None and pending and id_classnames:
        labels = [verdicts[i]["label"] for i in pending]
        cos = np.asarray(text_cosine(labels, list(id_classnames)), dtype=np.float64)
        if cos.shape != (len(labels), len(id_classnames)):
            raise ValueError(
                f"text_cosine returned shape {cos.shape}, expected {(len(labels), len(id_classnames))}"
            )
        best = cos.argmax(axis=1)
        for row, i in enumerate(pending):
            if cos[row, best[row]] > overlap_cosine:
                verdicts[i].update(status="rejected", reason="too_similar_to_id",
                                   matched=id_classnames[int(best[row])])
    return [LabelVerdict(**v) for v in verdicts]


def kept_labels(verdicts: Sequence[LabelVerdict]) -> list[str]:
    """The labels of the kept verdicts, in order."""
    return [v.label for v in verdicts if v.status == "kept"]


# ---------------------------------------------------------------- SynOOD context prompt
CONTEXT_TEMPLATE = "A photo only remain {}."


def context_prompt(context_text: str, max_chars: int = 73) -> str:
    """SynOOD's inpainting prompt ``A photo only remain {context}.``.

    The context is cleaned like a label (:func:`clean_text`: NFKC, no format/control/ANSI
    characters), made one line, stripped of quotes and trailing punctuation, and cut to at most
    ``max_chars`` characters (at a word boundary when one exists). Raises ``ValueError`` when empty.
    """
    s = printable(context_text)
    s = re.sub(r"\s+", " ", s).strip().strip("\"'` ")
    s = s.rstrip(" .,;:!?")
    if len(s) > max_chars:
        cut = s[:max_chars]
        if s[max_chars] != " " and " " in cut:
            cut = cut.rsplit(" ", 1)[0]
        s = cut.rstrip(" .,;:!?-")
    if not s or not _has_letter(s):
        raise ValueError(f"empty context for SynOOD prompt (from {context_text!r})")
    # Sentence case from the MLLM ("A beach ...") reads wrongly mid-prompt; keep acronyms ("TV").
    if len(s) > 1 and s[0].isupper() and not s[1].isupper():
        s = s[0].lower() + s[1:]
    return CONTEXT_TEMPLATE.format(s)

"""Negative-label candidates (the input of NegLabel's NegMining).

A :class:`Lexicon` is two ordered, lower-case, deduplicated word lists: nouns (prompted as
``NOUN_TEMPLATE``) and adjectives (``ADJ_TEMPLATE``). Every entry passes :data:`VALID_WORD`, so stray
punctuation such as the ``[`` in the reference code's adjective list cannot reach a prompt.

Sources (registry ``LEXICONS``):

* ``imagenet21k`` — first usable lemma of each of timm's 21,843 ImageNet-21k WordNet noun synsets
  (offline); no adjectives (the ``wordnet`` lexicon has both).
* ``wordnet`` — WordNet 3.0 from Debian's ``wordnet-base`` (``data.noun``, ``data.adj``), or from the
  directory in ``$SYNTH_OOD_WORDNET_DIR``: the first lemma of every noun and adjective synset.
* ``neglabel`` — the same WordNet data built into NegLabel's word lists (``txtfiles/`` at
  XueJiang16/NegLabel@3253db6) by NegLabel's procedure, :func:`neglabel_word_lists` and
  :func:`neglabel_pool`: one list per WordNet lexicographer file, ``noun.animal`` and ``noun.food``
  left out, verbs and adverbs too; the first head synset of each adjective cluster skipped; the
  lists concatenated in NegLabel's file order with one dedupe over nouns and adjectives together.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .registry import Registry

NOUN_TEMPLATE = "the nice {}"
ADJ_TEMPLATE = "This is a {} photo"

WORDNET_ENV = "SYNTH_OOD_WORDNET_DIR"
WORDNET_DEFAULT_DIRS = ("/usr/share/wordnet",)

# Letters (any script), digits, single spaces, hyphens, apostrophes; must start with a letter/digit.
VALID_WORD = re.compile(r"^[^\W_](?:[^\W_]|[ '\-])*$")

_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


class LexiconError(RuntimeError):
    """A lexicon source is unavailable; the message says how to install or point to it."""


@dataclass(frozen=True)
class Lexicon:
    """Ordered negative-label candidates."""

    name: str
    nouns: list[str]
    adjectives: list[str]

    def noun_prompts(self) -> list[str]:
        return [NOUN_TEMPLATE.format(w) for w in self.nouns]

    def adjective_prompts(self) -> list[str]:
        return [ADJ_TEMPLATE.format(w) for w in self.adjectives]


def clean_word(raw: str) -> str | None:
    """Lower-case, ``_`` -> space, trim stray punctuation; ``None`` if the result is not a clean word."""
    s = raw.replace("_", " ").strip().lower()
    s = _ADJ_MARKER.sub("", s)
    s = re.sub(r"\s+", " ", s)
    # Trim wrapping brackets/quotes/periods, the kind of debris found in scraped word lists.
    s = s.strip(" \t[](){}<>\"'`.,;:!?*")
    if not s or not VALID_WORD.match(s) or not any(ch.isalpha() for ch in s):
        return None
    return s


def _dedupe_clean(words: Iterable[str]) -> list[str]:
    seen: set[str] = set()
    out: list[str] = []
    for w in words:
        c = clean_word(w)
        if c is not None and c not in seen:
            seen.add(c)
            out.append(c)
    return out


def subsample(words: list[str], limit: int | None) -> list[str]:
    """At most ``limit`` words spread evenly over the list (seed-free, order kept)."""
    if limit is None or len(words) <= limit:
        return list(words)
    n = len(words)
    return [words[(i * n) // limit] for i in range(limit)]


# ---------------------------------------------------------------- WordNet data files
# WordNet's lexicographer files, indexed by a data line's lex_filenum (WordNet's lexnames(5WN))
LEXNAMES = (
    "adj.all", "adj.pert", "adv.all", "noun.Tops", "noun.act", "noun.animal", "noun.artifact",
    "noun.attribute", "noun.body", "noun.cognition", "noun.communication", "noun.event", "noun.feeling",
    "noun.food", "noun.group", "noun.location", "noun.motive", "noun.object", "noun.person",
    "noun.phenomenon", "noun.plant", "noun.possession", "noun.process", "noun.quantity", "noun.relation",
    "noun.shape", "noun.state", "noun.substance", "noun.time", "verb.body", "verb.change",
    "verb.cognition", "verb.communication", "verb.competition", "verb.consumption", "verb.contact",
    "verb.creation", "verb.emotion", "verb.motion", "verb.perception", "verb.possession", "verb.social",
    "verb.stative", "verb.weather", "adj.ppl",
)


@dataclass(frozen=True)
class Synset:
    """One line of a WordNet ``data.<pos>`` file: what the NegLabel procedure needs of it."""

    offset: int
    lexname: str
    ss_type: str  # n, a (head adjective), s (satellite adjective), ...
    words: tuple[str, ...]
    antonyms: tuple[int, ...]  # offsets of the adjective synsets its "!" pointers name


def parse_wordnet_synsets(lines: Iterable[str]) -> list[Synset]:
    """Parse a WordNet ``data.<pos>`` file into :class:`Synset` records, in file order.

    Line format: ``offset lex_filenum ss_type w_cnt word lex_id [word lex_id ...] p_cnt
    [pointer_symbol offset pos source/target]... | gloss`` with ``w_cnt`` in hexadecimal; lines
    starting with spaces are the licence header.
    """
    synsets: list[Synset] = []
    for line in lines:
        if not line.strip() or line.startswith(" "):
            continue
        fields = line.split("|", 1)[0].split()
        if len(fields) < 6 or not fields[0].isdigit():
            continue
        w_cnt = int(fields[3], 16)
        words = tuple(fields[4 + 2 * i] for i in range(w_cnt) if 4 + 2 * i < len(fields))
        p = 4 + 2 * w_cnt
        pointers = [fields[p + 1 + 4 * i: p + 5 + 4 * i] for i in range(int(fields[p]))] if p < len(fields) else []
        antonyms = tuple(int(q[1]) for q in pointers if len(q) == 4 and q[0] == "!" and q[2] in "as")
        lex = int(fields[1]) if fields[1].isdigit() else -1
        name = LEXNAMES[lex] if 0 <= lex < len(LEXNAMES) else f"lex{fields[1]}"
        synsets.append(Synset(int(fields[0]), name, fields[2], words, antonyms))
    return synsets


def parse_wordnet_data(lines: Iterable[str]) -> list[list[str]]:
    """Parse a WordNet ``data.<pos>`` file: one list of raw lemma words per synset, in file order."""
    return [list(s.words) for s in parse_wordnet_synsets(lines)]


# NegLabel's txtfiles/: one word list per lexicographer file, all of WordNet's noun and adjective
# files but noun.animal and noun.food (not shipped). Its code reads them in os.listdir order with
# one dedupe shared by nouns and adjectives, so a word in both goes to the file read first. This
# is the order os.listdir gave for the released txtfiles/ (measured): it gives the 57,628 nouns +
# 12,372 adjectives NegLabel's lists make (58,546 + 13,091 unique before the shared dedupe).
NEGLABEL_FILES = (
    "noun.body", "noun.state", "noun.phenomenon", "noun.group", "noun.shape", "noun.feeling", "noun.act",
    "adj.pert", "noun.communication", "noun.relation", "noun.time", "noun.Tops", "noun.artifact",
    "noun.motive", "noun.event", "noun.plant", "noun.cognition", "noun.possession", "noun.process",
    "noun.location", "adj.all", "noun.quantity", "noun.attribute", "noun.person", "noun.substance",
    "noun.object", "adj.ppl",
)


def _first_cluster_heads(synsets: list[Synset]) -> set[int]:
    """Offsets of the head synset that opens each adjective cluster: a head (``a``) of ``adj.all``
    whose antonym heads all come later in the file (the file keeps the lexicographer files' order).

    NegLabel's adj.all list has no word of these synsets (except where another synset has the same
    first lemma): 1,078 of WordNet 3.0's 1,845 such heads are absent, and 15 of its 1,893 other heads.
    """
    return {s.offset for s in synsets
            if s.lexname == "adj.all" and s.ss_type == "a" and s.antonyms and all(s.offset < a for a in s.antonyms)}


def neglabel_word_lists(synsets: Iterable[Synset]) -> dict[str, list[str]]:
    """NegLabel's per-file word lists: the first lemma of each synset, cleaned (lower case, ``_`` ->
    space), deduplicated within its file, in data-file order; the synsets opening an adjective
    cluster are left out (see :func:`_first_cluster_heads`). Keyed by lexicographer file name.

    NegLabel wrote each list from a ``set()`` (its line order is arbitrary); ours keeps the file order.
    """
    synsets = list(synsets)
    skip = _first_cluster_heads(synsets)
    raw: dict[str, list[str]] = {}
    for s in synsets:
        if s.words and s.offset not in skip:
            raw.setdefault(s.lexname, []).append(s.words[0])
    return {name: _dedupe_clean(words) for name, words in raw.items()}


def neglabel_pool(lists: dict[str, list[str]], order: Iterable[str] = NEGLABEL_FILES,
                  name: str = "neglabel") -> Lexicon:
    """NegLabel's candidate pool (``CLIPScalableClassifier.__init__``): the files of ``order`` read in
    turn, one dedupe over all of them (a word goes to the first file that has it), ``noun.*`` files
    to the nouns and ``adj.*`` to the adjectives, in reading order."""
    seen: set[str] = set()
    nouns: list[str] = []
    adjectives: list[str] = []
    for file in order:
        target = nouns if file.startswith("noun.") else adjectives if file.startswith("adj.") else None
        if target is None:
            raise ValueError(f"NegLabel reads noun.* and adj.* files only, not {file!r}")
        for w in lists.get(file, []):
            if w not in seen:
                seen.add(w)
                target.append(w)
    return Lexicon(name, nouns, adjectives)


def wordnet_dir() -> Path | None:
    """The WordNet ``dict`` directory: ``$SYNTH_OOD_WORDNET_DIR`` or Debian's ``/usr/share/wordnet``."""
    env = os.environ.get(WORDNET_ENV)
    candidates = [env] if env else list(WORDNET_DEFAULT_DIRS)
    for c in candidates:
        p = Path(c).expanduser()
        if (p / "data.noun").is_file():
            return p
    return None


def _require_wordnet() -> Path:
    d = wordnet_dir()
    if d is None:
        where = os.environ.get(WORDNET_ENV) or " or ".join(WORDNET_DEFAULT_DIRS)
        raise LexiconError(
            f"WordNet 3.0 data files (data.noun, data.adj) not found in {where}: install them with "
            f"`apt-get install wordnet-base`, or set {WORDNET_ENV} to a directory holding them, "
            f"or use sketch.lexicon=imagenet21k (offline, nouns only)"
        )
    return d


@lru_cache(maxsize=8)
def _wordnet_words(directory: str, pos: str) -> tuple[str, ...]:
    path = Path(directory) / f"data.{pos}"
    if not path.is_file():
        raise LexiconError(f"WordNet file {path} is missing (expected data.noun and data.adj there)")
    with open(path, encoding="utf-8", errors="replace") as fh:
        synsets = parse_wordnet_data(fh)
    # NegLabel's choice: the first lemma of every synset.
    return tuple(_dedupe_clean(ws[0] for ws in synsets if ws))


# ---------------------------------------------------------------- sources
LEXICONS: Registry[Callable[[], Lexicon]] = Registry("lexicon", plugins=("ood_core.world.source",))


@LEXICONS.register("wordnet")
def wordnet_lexicon() -> Lexicon:
    """Full WordNet 3.0: first lemma of each noun and adjective synset."""
    d = str(_require_wordnet())
    return Lexicon("wordnet", list(_wordnet_words(d, "noun")), list(_wordnet_words(d, "adj")))


@lru_cache(maxsize=4)
def _neglabel_lexicon(directory: str) -> Lexicon:
    synsets: list[Synset] = []
    for pos in ("noun", "adj"):
        path = Path(directory) / f"data.{pos}"
        if not path.is_file():
            raise LexiconError(f"WordNet file {path} is missing (expected data.noun and data.adj there)")
        with open(path, encoding="utf-8", errors="replace") as fh:
            synsets += parse_wordnet_synsets(fh)
    return neglabel_pool(neglabel_word_lists(synsets))


@LEXICONS.register("neglabel")
def neglabel_lexicon() -> Lexicon:
    """WordNet 3.0 built into NegLabel's word lists by NegLabel's procedure (module docstring)."""
    lex = _neglabel_lexicon(str(_require_wordnet()))
    return Lexicon(lex.name, list(lex.nouns), list(lex.adjectives))


def timm_info_file(name: str) -> Path:
    """Path of a data file shipped in timm's ``data/_info`` (ImageNet synset lists and lemmas)."""
    # Locate the data file without importing timm (which would import torch: seconds of startup).
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.origin:
        raise LexiconError("the imagenet21k lexicon needs the timm package (it ships the synset lemmas)")
    p = Path(spec.origin).parent / "data" / "_info" / name
    if not p.is_file():
        raise LexiconError(f"timm does not ship {name} (looked in {p.parent}); check the timm install")
    return p


@lru_cache(maxsize=1)
def _imagenet21k_nouns() -> tuple[str, ...]:
    lemmas: dict[str, list[str]] = {}
    for line in timm_info_file("imagenet_synset_to_lemma.txt").read_text(encoding="utf-8").splitlines():
        wnid, _, text = line.partition("\t")
        if wnid:
            lemmas[wnid.strip()] = [w.strip() for w in text.split(",")]
    wnids = [w.strip() for w in timm_info_file("imagenet21k_goog_synsets.txt").read_text().splitlines()]
    words: list[str] = []
    for wnid in wnids:
        # First lemma that survives cleaning (e.g. "read/write head" -> next lemma "head").
        for lemma in lemmas.get(wnid, []):
            if clean_word(lemma) is not None:
                words.append(lemma)
                break
    return tuple(_dedupe_clean(words))


@LEXICONS.register("imagenet21k")
def imagenet21k_lexicon() -> Lexicon:
    """ImageNet-21k synset lemmas shipped with timm (nouns only; use ``wordnet`` for adjectives)."""
    # no adjectives: whether WordNet happens to be installed must not change the labels under one key
    return Lexicon("imagenet21k", list(_imagenet21k_nouns()), [])


def load_lexicon(name: str, limit: int | None = None) -> Lexicon:
    """Load lexicon ``name``; ``limit`` caps nouns and adjectives separately (even, seed-free spread)."""
    lex = LEXICONS.get(name)()
    return Lexicon(lex.name, subsample(lex.nouns, limit), subsample(lex.adjectives, limit))

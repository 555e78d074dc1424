"""Label leakage: does an outlier label name a class of an evaluation OOD set?

A label that names an evaluation class (EOE's released Food-50 lists hold 11-30 of them) makes
the benchmark numbers meaningless, so sketch rejects it (``leaks_eval_ood``). ``sketch.leakage_match``
says what counts as naming a class:

* ``whole`` (default): the label as a whole is the class name (case, ``_``/``-``/space and a
  plural folded; SUN/Places ``a/b`` categories also as ``a b``, ``b a`` and ``a``), a WordNet
  synonym of it (they share a synset), or a kind of it (the class's synset is a hypernym of the
  label's). Sharing a word is not naming:
  ``striped bass`` and ``dotted line`` do not name DTD's ``striped`` and ``dotted``.
* ``word_overlap``: the earlier rule, any shared content word (flags 44 WordNet nouns and 37
  adjectives against DTD alone).

Only first (most frequent) senses are compared: the class's (its adjective sense if it has one,
else its noun sense) and the label's first noun and adjective senses, so that ``power grid`` (a
rarer sense of *grid*) does not name DTD's *grid* (a pattern of lines), nor ``roll`` (a list, first;
a sea wave, rarely) SUN's *wave*. Hypernyms are kinds (``@``), not instances (a river's name). Without WordNet (:func:`ood_core.lexicon.wordnet_dir`)
only whole-name equality is checked, and the stage key records that.

Class names come from :func:`ood_core.data.ood_classnames`: the shipped lists of the standard
benchmarks (MOS's iNaturalist / SUN / Places subsets and DTD, as MCM, NegLabel and EOE evaluate),
a set's ``classnames.txt`` or its class folders, plus ``sketch.eval_ood_names``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

from ood_core.labels import word_variants

LeakMode = Literal["whole", "word_overlap"]
# the matching rule's version: in sketch's key, so a changed rule never reuses old labels
LEAK_RULE = "whole-wordnet-first-sense-v1"
_POS = ("noun", "adj")
_ADJ_MARKER = re.compile(r"\((?:a|p|ip)\)$")


@dataclass(frozen=True)
class LeakMatch:
    """Why a label leaks: the OOD set and class it names, how (equal | synonym | hypernym | word), via what."""

    ood_set: str
    name: str
    how: str
    via: str

    def describe(self) -> str:
        return f"{self.how} of {self.ood_set} '{self.name}'" + (f" ({self.via})" if self.via else "")


# ---------------------------------------------------------------- WordNet
class WordNet:
    """The little of WordNet 3.0 leakage needs: lemma -> synsets in sense order, synset -> lemmas and
    noun hypernyms (``@`` and ``@i``), read from the ``index.*`` / ``data.*`` files."""

    def __init__(self, senses: dict[str, list[str]], lemmas: dict[str, list[str]], hypernyms: dict[str, list[str]]):
        self.senses, self.lemmas, self.hypernyms = senses, lemmas, hypernyms
        self._closure: dict[str, tuple[str, ...]] = {}

    @classmethod
    def read(cls, directory: Path) -> WordNet:
        senses: dict[str, list[str]] = {}
        lemmas: dict[str, list[str]] = {}
        hypernyms: dict[str, list[str]] = {}
        for pos in _POS:
            tag = pos[0]
            for line in _lines(directory / f"index.{pos}"):
                f = line.split()
                n_syn, n_ptr = int(f[2]), int(f[3])
                offsets = f[4 + n_ptr + 2:][:n_syn]
                senses.setdefault(_norm_lemma(f[0]), []).extend(f"{tag}{o}" for o in offsets)
            for line in _lines(directory / f"data.{pos}"):
                f = line.split()
                sid, w_cnt = f"{tag}{f[0]}", int(f[3], 16)
                lemmas[sid] = [_norm_lemma(f[4 + 2 * i]) for i in range(w_cnt)]
                p = 4 + 2 * w_cnt
                n_ptr = int(f[p])
                ptrs = [f[p + 1 + 4 * i: p + 5 + 4 * i] for i in range(n_ptr)]
                # "@" only: an instance ("Bull Run" of creek) is a named individual, not a kind
                hypernyms[sid] = [f"n{q[1]}" for q in ptrs if q[0] == "@" and q[2] == "n"]
        return cls(senses, lemmas, hypernyms)

    def closure(self, sid: str) -> tuple[str, ...]:
        """Every hypernym of ``sid`` (transitively), nearest first."""
        if sid not in self._closure:
            seen: dict[str, None] = {}
            frontier = list(self.hypernyms.get(sid, []))
            while frontier:
                nxt = []
                for h in frontier:
                    if h not in seen:
                        seen[h] = None
                        nxt += self.hypernyms.get(h, [])
                frontier = nxt
            self._closure[sid] = tuple(seen)
        return self._closure[sid]

    def first_senses(self, form: str) -> list[str]:
        """The most frequent noun sense and the most frequent adjective sense of ``form`` (those it has)."""
        found = self.senses.get(form, [])
        return [s for pos in ("n", "a") for s in [next((x for x in found if x[0] == pos), None)] if s]

    def name(self, sid: str) -> str:
        return "/".join(self.lemmas.get(sid, [])[:3])


def _lines(path: Path) -> Iterable[str]:
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.strip() and not line.startswith(" "):
                yield line


def _norm_lemma(raw: str) -> str:
    return _ADJ_MARKER.sub("", raw).replace("_", " ").lower()


@lru_cache(maxsize=4)
def _wordnet_at(directory: str) -> WordNet:
    return WordNet.read(Path(directory))


def load_wordnet() -> WordNet | None:
    """WordNet from :func:`ood_core.lexicon.wordnet_dir` (None when it is not installed)."""
    from ood_core.lexicon import wordnet_dir

    d = wordnet_dir()
    return _wordnet_at(str(d)) if d is not None and all((d / f"index.{p}").is_file() for p in _POS) else None


def wordnet_fingerprint() -> str | None:
    """What WordNet the leakage rule saw (file sizes), for stage keys; None without WordNet."""
    from ood_core.lexicon import wordnet_dir

    d = wordnet_dir()
    if d is None or not all((d / f"index.{p}").is_file() for p in _POS):
        return None
    return "-".join(str((d / f"{k}.{p}").stat().st_size) for p in _POS for k in ("index", "data"))


# ---------------------------------------------------------------- forms of a name
def label_forms(label: str) -> set[str]:
    """The label written every way a name can be: lower case, ``_``/``-`` as spaces, last word singular."""
    base = re.sub(r"\s+", " ", label.lower().replace("_", " ")).strip()
    out: set[str] = set()
    for s in {base, base.replace("-", " ")}:
        head, _, last = s.rpartition(" ")
        out |= {f"{head} {w}".strip() for w in word_variants(last)}
    return {f for f in out if f}


def class_forms(name: str) -> set[str]:
    """Forms of an evaluation class name; a SUN/Places ``category/subcategory`` also as ``category sub``,
    ``sub category`` and ``category`` alone; a two-word name also written as one word."""
    s = name.strip().lower().replace("_", " ")
    parts = [p.strip() for p in s.split("/") if p.strip()]
    raw = {" ".join(parts)}
    if len(parts) == 2:
        raw |= {f"{parts[1]} {parts[0]}", parts[0]}
    out = set()
    for r in raw:
        out |= label_forms(r)
        if r.count(" ") == 1:
            out.add(r.replace(" ", ""))
    return out


# ---------------------------------------------------------------- the index
class LeakIndex:
    """Evaluation class names, matched against labels by ``mode`` (see the module docstring)."""

    def __init__(self, names: Sequence[tuple[str, str]], mode: LeakMode = "whole", wordnet: WordNet | None = None):
        self.mode = mode
        self.names = list(names)
        self.wordnet = wordnet
        self._forms: dict[str, tuple[str, str]] = {}
        self._synsets: dict[str, tuple[str, str, str]] = {}  # class first-sense synset -> (set, name, form)
        self._words: list[tuple[set[str], str, str]] = []
        from ood_core.labels import content_words

        for ood_set, name in self.names:
            forms = class_forms(name)
            for f in sorted(forms):
                self._forms.setdefault(f, (ood_set, name))
                if wordnet is not None:
                    # a class's own sense: an adjective's if the name has one (DTD's "bubbly" is
                    # not champagne), else its first noun sense
                    first = wordnet.first_senses(f)
                    for sid in [x for x in first if x[0] == "a"][:1] or first[:1]:
                        self._synsets.setdefault(sid, (ood_set, name, f))
            self._words.append((content_words(name.replace("/", " ")), ood_set, name))

    def __bool__(self) -> bool:
        return bool(self.names)

    def match(self, label: str) -> LeakMatch | None:
        """The first reason ``label`` names an evaluation class, or None."""
        if not self.names:
            return None
        if self.mode == "word_overlap":
            from ood_core.labels import content_words

            words = content_words(label)
            for f in sorted(label_forms(label)):
                if f in self._forms:
                    return LeakMatch(*self._forms[f], "equal", "")
            for nw, ood_set, name in self._words:
                if shared := sorted(words & nw):
                    return LeakMatch(ood_set, name, "word", f"shares '{shared[0]}'")
            return None
        forms = sorted(label_forms(label))
        for f in forms:
            if f in self._forms:
                return LeakMatch(*self._forms[f], "equal", "")
        wn = self.wordnet
        if wn is None:
            return None
        label_senses = [s for f in forms for s in wn.first_senses(f)]
        for sid in label_senses:
            if sid in self._synsets:
                ood_set, name, form = self._synsets[sid]
                return LeakMatch(ood_set, name, "synonym", f"WordNet {wn.name(sid)}")
        for sid in label_senses:
            if sid[0] != "n":
                continue
            for h in wn.closure(sid):
                if h in self._synsets:
                    ood_set, name, form = self._synsets[h]
                    return LeakMatch(ood_set, name, "hypernym", f"WordNet {wn.name(sid)} is a kind of {wn.name(h)}")
        return None


@lru_cache(maxsize=16)
def _cached_index(names: tuple[tuple[str, str], ...], mode: str, fingerprint: str | None) -> LeakIndex:
    return LeakIndex(names, mode, load_wordnet() if mode == "whole" and fingerprint else None)  # type: ignore[arg-type]


def leak_index(names: Sequence[str | tuple[str, str]], mode: LeakMode = "whole") -> LeakIndex:
    """The index of ``names`` (plain names count as set ``configured``), built once per process."""
    pairs = tuple(n if isinstance(n, tuple) else ("configured", n) for n in names)
    return _cached_index(pairs, mode, wordnet_fingerprint() if pairs else None)


def eval_names(cfg, log: Callable[[str], None] | None = None) -> list[tuple[str, str]]:
    """``(OOD set, class name)`` of every evaluation class leakage is checked against: the configured
    ``sketch.eval_ood_names`` and every evaluation set's class names (``log`` warns about a set with none)."""
    from ood_core.data import ood_classnames

    names = [("configured", n) for n in cfg.sketch.eval_ood_names]
    for ood_set in cfg.data.ood_sets:
        found = ood_classnames(ood_set, cfg.data)
        if not found and log is not None:
            log(f"[sketch] warning: no class names known for OOD set '{ood_set}': label leakage against it is "
                "not checked (add a classnames.txt to its folder)")
        names += [(ood_set, n) for n in found]
    return names


def key_slice(mode: LeakMode) -> dict:
    """What the leakage decisions depend on besides the names (for sketch's key)."""
    return {"match": mode, "rule": LEAK_RULE, **({"wordnet": wordnet_fingerprint()} if mode == "whole" else {})}


def context_index(ctx) -> LeakIndex:
    """The run's leakage index (``sketch.leakage_match`` over :func:`eval_names`), once per stage context."""
    cache = ctx.__dict__.setdefault("_leak_index", {})
    if "index" not in cache:
        cache["index"] = leak_index(eval_names(ctx.cfg, ctx.log), ctx.cfg.sketch.leakage_match)
    return cache["index"]

"""The world's concepts as data: ID classes, near/far OOD kinds, attributes, lexicon, OOD sets.

Everything here is a plain constant in a fixed order (never built from a ``set``), so class
indices, prompts and embeddings line up across runs. The renderer (:mod:`ood_core.world.render`)
draws every concept named here; the captions use every attribute, so the world CLIP's text side
knows far more than the ID classes, as real CLIP's does.
"""

from __future__ import annotations

# ---------------------------------------------------------------- attributes
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 90, 230), "yellow": (240, 220, 40),
    "orange": (245, 140, 30), "purple": (150, 60, 200), "pink": (245, 130, 190), "cyan": (40, 210, 220),
    "white": (245, 245, 245), "brown": (130, 80, 40),
}  # fmt: skip
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (10, 10, 12), "gray": (120, 120, 125), "beige": (225, 210, 180), "navy": (20, 30, 80),
    "dark green": (20, 60, 30),
}  # fmt: skip
SIZES = ("small", "large")
POSITIONS = ("center", "left", "right", "top", "bottom")

# ---------------------------------------------------------------- shapes
# In-distribution classes (index = label), the world's "ImageNet".
ID_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart", "diamond", "arrow")
# Near OOD: shapes drawn with the same colours, sizes and backgrounds as the ID shapes.
NEAR_EVAL: tuple[str, ...] = ("ellipse", "rectangle", "pentagon", "crescent", "ring", "trapezoid")
NEAR_VAL: tuple[str, ...] = ("hexagon", "semicircle", "kite")
SHAPES: tuple[str, ...] = ID_CLASSES + NEAR_EVAL + NEAR_VAL

# ---------------------------------------------------------------- far kinds
GLYPHS_EVAL: tuple[str, ...] = tuple(f"letter {c}" for c in "abeghkmrsw")
GLYPHS_VAL: tuple[str, ...] = tuple(f"digit {d}" for d in ("two", "five", "seven"))
PATTERNS_EVAL: tuple[str, ...] = ("stripes", "checkerboard", "dots", "waves", "grid", "zigzag")
PATTERNS_VAL: tuple[str, ...] = ("spiral", "concentric rings")
# scikit-image's bundled photos: the world's "Places"
PHOTOS_EVAL: dict[str, str] = {
    "brick": "brick", "grass": "grass", "gravel": "gravel", "coins": "coins", "moon": "moon",
    "camera": "cameraman", "page": "text page", "coffee": "coffee cup", "chelsea": "cat",
}  # fmt: skip
PHOTOS_VAL: dict[str, str] = {"hubble_deep_field": "galaxy", "retina": "retina", "horse": "horse"}
NOISES_EVAL: tuple[str, ...] = ("static noise", "smooth noise")
NOISES_VAL: tuple[str, ...] = ("salt noise",)

# Named evaluation OOD sets (the world's iNaturalist / SUN / Places / Textures) and the one
# validation OOD split: only choices that need OOD data may look at "world-val", never a report.
EVAL_SETS: dict[str, tuple[str, ...]] = {
    "world-near": NEAR_EVAL,
    "world-glyphs": GLYPHS_EVAL,
    "world-textures": PATTERNS_EVAL + NOISES_EVAL,
    "world-photos": tuple(PHOTOS_EVAL.values()),
}
VAL_SET = "world-val"
VAL_CONCEPTS: tuple[str, ...] = NEAR_VAL + GLYPHS_VAL + PATTERNS_VAL + tuple(PHOTOS_VAL.values()) + NOISES_VAL
OOD_SETS: dict[str, tuple[str, ...]] = {**EVAL_SETS, VAL_SET: VAL_CONCEPTS}

FAR_CONCEPTS: tuple[str, ...] = (
    GLYPHS_EVAL + GLYPHS_VAL + PATTERNS_EVAL + PATTERNS_VAL
    + tuple(PHOTOS_EVAL.values()) + tuple(PHOTOS_VAL.values()) + NOISES_EVAL + NOISES_VAL
)  # fmt: skip
ALL_CONCEPTS: tuple[str, ...] = SHAPES + FAR_CONCEPTS


def kind_of(concept: str) -> str:
    """``shape``, ``glyph``, ``pattern``, ``photo`` or ``noise``."""
    if concept in SHAPES:
        return "shape"
    if concept.startswith(("letter ", "digit ")):
        return "glyph"
    if concept in PATTERNS_EVAL + PATTERNS_VAL:
        return "pattern"
    if concept in NOISES_EVAL + NOISES_VAL:
        return "noise"
    if concept in PHOTOS_EVAL.values() or concept in PHOTOS_VAL.values():
        return "photo"
    raise KeyError(f"'{concept}' is not a world concept (see ood_core/world/concepts.py)")


# ---------------------------------------------------------------- world knowledge (for the MLLM)
# What the world MLLM knows about shapes: near look-alikes from other "domains", the answers to
# EOE's near-OOD question. Some of them are evaluation names (the leakage filter must catch them).
LOOKALIKES: dict[str, tuple[str, ...]] = {
    "circle": ("ellipse", "ring", "coin", "oval", "disc"),
    "square": ("rectangle", "tile", "checkerboard", "box"),
    "triangle": ("pyramid", "trapezoid", "kite", "wedge"),
    "star": ("asterisk", "flower", "sparkle", "starfish"),
    "cross": ("plus sign", "letter x", "sword", "grid"),
    "heart": ("leaf", "apple", "crescent", "bell"),
    "diamond": ("kite", "rhombus", "gem", "crystal"),
    "arrow": ("pointer", "chevron", "zigzag", "letter v"),
}
# Broad visual categories of the world and far-OOD look-alikes (EOE's far question).
VISUAL_CATEGORIES = ("flat coloured shapes", "plain backgrounds", "simple outlines")
FAR_LOOKALIKES: tuple[str, ...] = (
    "letter a", "letter b", "letter e", "letter q", "letter z", "digit two", "digit five",
    "digit nine", "stripes", "dots", "waves", "spiral", "static noise", "smooth noise",
    "salt noise", "brick", "grass", "gravel", "galaxy", "moon", "horse", "cat", "cloud", "tree",
    "river", "house", "boat", "fish", "bird", "flower", "wheel", "key", "clock", "candle",
    "mountain", "road", "window", "ladder", "feather", "shell",
)  # fmt: skip
# Fine-grained kinds of the super-category "shape" that are not ID classes (EOE's fine task).
FINE_KINDS: tuple[str, ...] = ("hexagon", "octagon", "semicircle", "oval", "rhombus", "parallelogram",
                               "kite", "pentagon", "rectangle", "ellipse")  # fmt: skip

# ---------------------------------------------------------------- lexicon (the world's WordNet)
# Nouns: every rendered concept plus words the world only knows as text.
TEXT_ONLY_NOUNS: tuple[str, ...] = (
    "oval", "disc", "tile", "box", "pyramid", "wedge", "asterisk", "flower", "sparkle", "starfish",
    "plus sign", "sword", "leaf", "apple", "bell", "rhombus", "gem", "crystal", "pointer",
    "chevron", "octagon", "parallelogram", "cloud", "tree", "river", "house", "boat", "fish",
    "bird", "wheel", "key", "clock", "candle", "mountain", "road", "window", "ladder", "feather",
    "shell", "bottle", "chair", "table", "lamp", "rope", "net", "fence", "bridge", "tower",
    "castle", "kettle", "spoon", "fork", "knife", "hammer", "drum", "guitar", "piano", "violin",
    "sun", "planet", "comet", "rain", "snow", "ice", "fire", "smoke", "sand", "stone", "rock",
    "island", "lake", "ocean", "forest", "desert", "valley", "cave", "volcano", "garden",
)  # fmt: skip
NOUNS: tuple[str, ...] = tuple(dict.fromkeys(ALL_CONCEPTS + TEXT_ONLY_NOUNS))
ADJECTIVES: tuple[str, ...] = tuple(dict.fromkeys(
    tuple(COLOURS) + tuple(b for b in BACKGROUNDS if " " not in b) + SIZES
    + ("bright", "dark", "pale", "smooth", "rough", "noisy", "striped", "dotted", "wavy", "round",
       "pointed", "curved", "straight", "hollow", "solid", "tiny", "huge", "flat", "shiny", "dull",
       "soft", "hard", "warm", "cold", "old", "new", "empty", "full", "quiet", "loud")
))  # fmt: skip

# Words the world's tokenizers must know: every word of every caption, answer and lexicon entry.
CAPTION_WORDS: tuple[str, ...] = (
    "a", "an", "the", "of", "on", "in", "with", "and", "photo", "picture", "image", "background",
    "pattern", "texture", "noise", "letter", "digit", "shape", "object", "nice", "this", "is",
    "there", "yes", "no", "it", "shows", "only", "remain", "left", "right", "top", "bottom",
    "center", "side", "corner", "plain", "colour", "colored", "drawing", "flat", "empty", "space",
)  # fmt: skip


def world_labels() -> set[str]:
    """Every label the world knows: its nouns and the MLLM's far / near / fine answers."""
    return set(NOUNS) | set(FAR_LOOKALIKES) | set(FINE_KINDS) | {w for v in LOOKALIKES.values() for w in v}


PUNCTUATION = (".", ",", "?", "!", ":", ";", "'", "-", "(", ")")


def vocabulary() -> list[str]:
    """Every word the world uses, sorted (the basis of its word-level tokenizers)."""
    words: dict[str, None] = {}
    for phrase in (*CAPTION_WORDS, *NOUNS, *ADJECTIVES, *BACKGROUNDS, *POSITIONS,
                   *(w for v in LOOKALIKES.values() for w in v), *FAR_LOOKALIKES, *VISUAL_CATEGORIES,
                   *FINE_KINDS):  # fmt: skip
        for w in phrase.split():
            words[w] = None
    return sorted(words) + list(PUNCTUATION)

"""Rendering the world: a :class:`Scene` (concept + attributes) -> a 64x64 RGB image and captions.

Pure functions of their arguments: a scene drawn from ``(seed, concept, index)`` is always the
same scene, and rendering it always gives the same pixels. Shapes are drawn at 4x and downsampled
(anti-aliased edges, as in a photo), glyphs with Pillow's bundled FreeType font, photos are seeded
crops of scikit-image's bundled images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ood_core.data import _rng as rng_for  # one seeding rule (crc32 of names) for all data draws

from . import concepts as C

SIZE = 64
_SS = 4  # supersampling factor for shapes
SOURCE_PREFIX = "world:"


@dataclass(frozen=True)
class Scene:
    """One world image: a concept with its attributes. ``angle`` in degrees, ``jitter`` in pixels."""

    concept: str
    colour: str
    background: str
    size: str = "large"
    position: str = "center"
    angle: float = 0.0
    jitter: tuple[int, int] = (0, 0)
    seed: int = 0  # for textures, photo crops and noise

    @property
    def kind(self) -> str:
        return C.kind_of(self.concept)


def sample_scene(concept: str, rng: np.random.Generator) -> Scene:
    """Random attributes for ``concept`` (the object colour never equals the background)."""
    colour = str(rng.choice(list(C.COLOURS)))
    bgs = [b for b in C.BACKGROUNDS if not (b == "navy" and colour == "blue")]
    background = str(rng.choice(bgs))
    kind = C.kind_of(concept)
    size = str(rng.choice(C.SIZES)) if kind in ("shape", "glyph") else "large"
    position = str(rng.choice(C.POSITIONS)) if kind in ("shape", "glyph") and size == "small" else "center"
    angle = float(rng.uniform(-20, 20)) if kind == "shape" else 0.0
    jitter = (int(rng.integers(-3, 4)), int(rng.integers(-3, 4)))
    return Scene(concept, colour, background, size, position, angle, jitter, int(rng.integers(0, 2**31)))


def scene_for(seed: int, concept: str, index: int, tag: str = "") -> Scene:
    """The ``index``-th scene of ``concept`` under ``seed`` (``tag`` separates independent draws)."""
    return sample_scene(concept, rng_for(seed, tag, concept, str(index)))


# ---------------------------------------------------------------- sources (ImageRecord.source)
_BY_SLUG = {c.replace(" ", "_"): c for c in C.ALL_CONCEPTS}


def source_of(seed: int, concept: str, index: int, tag: str = "") -> str:
    """``world:<tag>:<concept>:<seed>:<index>``: an ImageRecord source that renders its scene."""
    return f"{SOURCE_PREFIX}{tag}:{concept.replace(' ', '_')}:{seed}:{index}"


def scene_of_source(source: str) -> Scene:
    """Inverse of :func:`source_of`."""
    try:
        tag, slug, seed, index = source[len(SOURCE_PREFIX):].split(":")
        return scene_for(int(seed), _BY_SLUG[slug], int(index), tag)
    except (ValueError, KeyError):
        raise ValueError(f"not a world image source: {source!r} (expected world:<tag>:<concept>:<seed>:<index>)") from None


# ---------------------------------------------------------------- geometry
def _centre(scene: Scene) -> tuple[float, float, float]:
    r = 12.0 if scene.size == "small" else 21.0
    off = {"center": (0, 0), "left": (-16, 0), "right": (16, 0), "top": (0, -16), "bottom": (0, 16)}
    dx, dy = off[scene.position]
    return SIZE / 2 + dx + scene.jitter[0], SIZE / 2 + dy + scene.jitter[1], r


def _rot(points: list[tuple[float, float]], angle: float, cx: float, cy: float) -> list[tuple[float, float]]:
    a = math.radians(angle)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + _SS * (x * ca - y * sa), cy + _SS * (x * sa + y * ca)) for x, y in points]


def _ngon(n: int, r: float, start: float = -90.0) -> list[tuple[float, float]]:
    return [(r * math.cos(math.radians(start + 360 * k / n)), r * math.sin(math.radians(start + 360 * k / n)))
            for k in range(n)]  # fmt: skip


def _star(r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rr = r if k % 2 == 0 else 0.42 * r
        a = math.radians(-90 + 36 * k)
        pts.append((rr * math.cos(a), rr * math.sin(a)))
    return pts


def _heart(r: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(64):
        t = 2 * math.pi * k / 64
        x = 16 * math.sin(t) ** 3
        y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
        pts.append((x * r / 17, y * r / 17 + 0.1 * r))
    return pts


_POLYGONS = {
    "square": lambda r: _ngon(4, r * 1.05, -45),
    "rectangle": lambda r: [(-r, -0.55 * r), (r, -0.55 * r), (r, 0.55 * r), (-r, 0.55 * r)],
    "triangle": lambda r: _ngon(3, r * 1.1),
    "pentagon": lambda r: _ngon(5, r),
    "hexagon": lambda r: _ngon(6, r),
    "star": _star,
    "heart": _heart,
    "diamond": lambda r: [(0, -r), (0.62 * r, 0), (0, r), (-0.62 * r, 0)],
    "kite": lambda r: [(0, -r), (0.62 * r, -0.3 * r), (0, r), (-0.62 * r, -0.3 * r)],
    "trapezoid": lambda r: [(-0.5 * r, -0.6 * r), (0.5 * r, -0.6 * r), (r, 0.6 * r), (-r, 0.6 * r)],
    "arrow": lambda r: [(-r, -0.25 * r), (0.1 * r, -0.25 * r), (0.1 * r, -0.65 * r), (r, 0),
                        (0.1 * r, 0.65 * r), (0.1 * r, 0.25 * r), (-r, 0.25 * r)],
    "cross": lambda r: [(-0.3 * r, -r), (0.3 * r, -r), (0.3 * r, -0.3 * r), (r, -0.3 * r), (r, 0.3 * r),
                        (0.3 * r, 0.3 * r), (0.3 * r, r), (-0.3 * r, r), (-0.3 * r, 0.3 * r), (-r, 0.3 * r),
                        (-r, -0.3 * r), (-0.3 * r, -0.3 * r)],
}  # fmt: skip


def _draw_shape(draw: ImageDraw.ImageDraw, scene: Scene, fill, bg) -> None:
    cx, cy, r = _centre(scene)
    X, Y, R = cx * _SS, cy * _SS, r * _SS
    c = scene.concept
    if c in _POLYGONS:
        draw.polygon(_rot(_POLYGONS[c](r), scene.angle, X, Y), fill=fill)
    elif c == "circle":
        draw.ellipse((X - R, Y - R, X + R, Y + R), fill=fill)
    elif c == "ellipse":
        pts = [(r * math.cos(t), 0.55 * r * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 72, endpoint=False)]
        draw.polygon(_rot(pts, scene.angle, X, Y), fill=fill)
    elif c == "ring":
        draw.ellipse((X - R, Y - R, X + R, Y + R), fill=fill)
        q = 0.58 * R
        draw.ellipse((X - q, Y - q, X + q, Y + q), fill=bg)
    elif c == "crescent":
        draw.ellipse((X - R, Y - R, X + R, Y + R), fill=fill)
        a = math.radians(scene.angle)
        ox, oy = 0.45 * R * math.cos(a), 0.45 * R * math.sin(a)
        q = 0.85 * R
        draw.ellipse((X + ox - q, Y + oy - q, X + ox + q, Y + oy + q), fill=bg)
    elif c == "semicircle":
        draw.pieslice((X - R, Y - R * 0.5, X + R, Y + R * 1.5), 180 + scene.angle, 360 + scene.angle, fill=fill)
    else:  # pragma: no cover - every shape of concepts.SHAPES is handled above
        raise KeyError(c)


def object_box(scene: Scene) -> tuple[int, int, int, int]:
    """The object's bounding box ``(left, top, right, bottom)`` in image pixels (shapes, glyphs)."""
    cx, cy, r = _centre(scene)
    m = r + 3
    return (max(0, int(cx - m)), max(0, int(cy - m)), min(SIZE, int(math.ceil(cx + m))), min(SIZE, int(math.ceil(cy + m))))


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


_DIGITS = {"two": "2", "five": "5", "seven": "7", "nine": "9"}


def _glyph_char(concept: str) -> str:
    word = concept.split(" ", 1)[1]
    return _DIGITS.get(word, word)


@lru_cache(maxsize=16)
def _photo(name: str) -> Image.Image:
    from ood_core.data import decode_image, skimage_path

    return decode_image(skimage_path(name))


def _pattern(scene: Scene, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    rng = rng_for(scene.seed, "pattern")
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64)
    period = float(rng.uniform(7, 13))
    a = math.radians(float(rng.uniform(0, 180)))
    u = xx * math.cos(a) + yy * math.sin(a)
    v = -xx * math.sin(a) + yy * math.cos(a)
    c = scene.concept
    if c == "stripes":
        on = (u % period) < period / 2
    elif c == "checkerboard":
        on = ((xx // (period / 1.5)) + (yy // (period / 1.5))) % 2 == 0
    elif c == "dots":
        on = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 3.2) ** 2
    elif c == "waves":
        on = np.sin(2 * math.pi * (v + 3 * np.sin(2 * math.pi * u / 20)) / period) > 0
    elif c == "grid":
        on = ((xx % period) < 2) | ((yy % period) < 2)
    elif c == "zigzag":
        on = ((v + np.abs((u % period) - period / 2) * 1.6) % period) < period / 2
    elif c == "spiral":
        rr, th = np.hypot(xx - 32, yy - 32), np.arctan2(yy - 32, xx - 32)
        on = np.sin(rr / 2.2 - 2 * th) > 0
    elif c == "concentric rings":
        on = (np.hypot(xx - 32, yy - 32) % period) < period / 2
    else:  # pragma: no cover
        raise KeyError(c)
    return np.where(on[..., None], fg, bg)


def _noise(scene: Scene, fg: np.ndarray, bg: np.ndarray) -> np.ndarray:
    rng = rng_for(scene.seed, "noise")
    if scene.concept == "static noise":
        return rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.float64)
    if scene.concept == "smooth noise":
        small = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(small).resize((SIZE, SIZE), Image.Resampling.BICUBIC), np.float64)
    # salt noise: a plain background sprinkled with white and black pixels
    out = np.broadcast_to(bg, (SIZE, SIZE, 3)).copy()
    u = rng.random((SIZE, SIZE))
    out[u < 0.08] = 255.0
    out[u > 0.92] = 0.0
    return out


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image."""
    fg = np.array(C.COLOURS[scene.colour], np.float64)
    bg = np.array(C.BACKGROUNDS[scene.background], np.float64)
    kind = scene.kind
    if kind == "shape":
        big = Image.new("RGB", (SIZE * _SS, SIZE * _SS), tuple(int(v) for v in bg))
        _draw_shape(ImageDraw.Draw(big), scene, tuple(int(v) for v in fg), tuple(int(v) for v in bg))
        return big.resize((SIZE, SIZE), Image.Resampling.BOX)
    if kind == "glyph":
        cx, cy, r = _centre(scene)
        im = Image.new("RGB", (SIZE, SIZE), tuple(int(v) for v in bg))
        ImageDraw.Draw(im).text((cx, cy), _glyph_char(scene.concept), fill=tuple(int(v) for v in fg),
                                font=_font(int(2.3 * r)), anchor="mm")
        return im
    if kind == "photo":
        name = next(k for k, v in {**C.PHOTOS_EVAL, **C.PHOTOS_VAL}.items() if v == scene.concept)
        photo = _photo(name)
        rng = rng_for(scene.seed, "crop")
        w, h = photo.size
        side = int(min(w, h) * rng.uniform(0.4, 0.9))
        x, y = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
        return photo.crop((x, y, x + side, y + side)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    arr = _pattern(scene, fg, bg) if kind == "pattern" else _noise(scene, fg, bg)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def render_source(source: str) -> Image.Image:
    """Pixels of a ``world:`` ImageRecord source."""
    return render(scene_of_source(source))


def with_concept(scene: Scene, concept: str) -> Scene:
    """The same scene (colour, background, place) with another concept: an inpainting target."""
    return replace(scene, concept=concept)


# ---------------------------------------------------------------- language
def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(scene: Scene) -> str:
    """``red circle``, ``yellow letter k``, ``stripes pattern``, ``galaxy``: what the image shows."""
    kind = scene.kind
    if kind in ("shape", "glyph"):
        return f"{scene.colour} {scene.concept}"
    if kind == "pattern":
        return f"{scene.colour} {scene.concept} pattern"
    return scene.concept


def describe(scene: Scene) -> str:
    """The canonical one-sentence description (the MLLM's answer to "describe the image")."""
    kind = scene.kind
    np_ = noun_phrase(scene)
    if kind in ("shape", "glyph"):
        where = "" if scene.position == "center" else f" on the {scene.position}"
        return f"{_article(scene.size)} {scene.size} {np_}{where} on a {scene.background} background"
    if kind == "pattern":
        return f"{_article(np_)} {np_} on a {scene.background} background"
    if kind == "photo":
        return f"a photo of {_article(np_)} {np_}"
    return f"an image of {np_}"


def context(scene: Scene) -> str:
    """What the image shows besides its main subject (SynOOD's context question)."""
    if scene.kind in ("shape", "glyph"):
        where = "" if scene.position == "center" else f" with empty space on the {scene.position}"
        return f"a plain {scene.background} background{where}"
    return f"a {scene.background} background"


def captions(scene: Scene, rng: np.random.Generator, n: int = 1) -> list[str]:
    """``n`` templated captions of the scene (CLIP's training text)."""
    kind = scene.kind
    c = scene.concept
    np_ = noun_phrase(scene)
    if kind in ("shape", "glyph"):
        pool = [
            describe(scene), f"a photo of {_article(c)} {c}", f"{_article(np_)} {np_}",
            f"a {scene.size} {c}", f"{_article(c)} {c} on a {scene.background} background",
            f"a {scene.colour} {c} in the {scene.position}", f"the nice {c}", f"a drawing of {_article(np_)} {np_}",
        ]  # fmt: skip
    elif kind == "pattern":
        pool = [describe(scene), f"a {c} pattern", f"a texture of {c}", f"a photo of {c}", f"the nice {c}",
                f"{_article(scene.colour)} {scene.colour} {c} texture"]  # fmt: skip
    elif kind == "photo":
        pool = [describe(scene), f"a photo of {_article(c)} {c}", f"{_article(c)} {c}", f"the nice {c}",
                f"a picture of {_article(c)} {c}"]  # fmt: skip
    else:
        pool = [describe(scene), f"a photo of {c}", f"an image of {c}", f"the nice {c}", f"{c}"]
    return [pool[int(i)] for i in rng.integers(0, len(pool), n)]

"""In-distribution (ID) data and evaluation OOD sets.

Every image is an :class:`ImageRecord`: a stable key, its class, its split and *where the pixels come
from* (a file path or ``skimage:<name>``, plus an optional crop box and flip). Records are cheap,
hashable and deterministic; pixels are only decoded by :func:`load_image`.

ID sources (registry ``ID_SOURCES``):

* ``skimage`` — the offline tiny preset: a few real colour photos bundled with scikit-image, each
  expanded into ``images_per_class`` seeded random crops.
* ``imagefolder`` — ``<root>/train/<class>/*`` (+ ``<root>/val/<class>/*`` for test if present),
  e.g. ImageNet with WordNet ids as folder names.

Evaluation OOD sets (registry ``OOD_SETS``): ``tiny-textures`` and ``tiny-objects`` from other
bundled photos, ``folder:<path>``, or a folder name under ``cfg.ood_root`` (iNaturalist, SUN, ...).
"""

from __future__ import annotations

import errno
import importlib.util
import inspect
import io
import logging
import math
import os
import re
import stat
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import DataConfig
from .dataset_index import DIR, FILE, Entry, listing
from .registry import Registry

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")
# Decoding limit when no config is at hand (the listing applies ``data.max_pixels`` first).
DEFAULT_MAX_PIXELS = 64_000_000
# Reasons an input file is not used; every one is a ``skipped``/``failed`` row or a bad_inputs entry.
BAD_INPUT_REASONS = (
    "missing_file", "not_a_file", "dangling_symlink", "symlink_loop", "unreadable", "empty_file",
    "not_an_image", "too_many_pixels", "too_small", "truncated", "decode_error", "class_without_usable_images",
    "changed_since_index",
)  # fmt: skip

log = logging.getLogger("synth_ood.data")

# Packages of their own that register ID sources, OOD sets and pixel sources (imported on demand).
DATA_PLUGINS = ("ood_core.world.source",)

# Bundled colour photos used as ID classes, in a fixed order (never derived from a set or a listing).
SKIMAGE_ID_CLASSES: list[tuple[str, str]] = [
    ("astronaut", "astronaut"),
    ("chelsea", "cat"),
    ("coffee", "coffee cup"),
    ("rocket", "rocket"),
    ("motorcycle_left", "motorcycle"),
]

# Bundled photos used only for evaluation OOD sets (disjoint from SKIMAGE_ID_CLASSES).
TINY_OOD_SOURCES: dict[str, list[str]] = {
    "tiny-textures": ["brick", "grass", "gravel"],
    "tiny-objects": ["coins", "camera", "moon", "page", "hubble_deep_field", "retina", "ihc"],
}


def _shipped_classnames(name: str) -> list[str]:
    """A class-name list shipped in ``ood_core/ood_classnames/<name>.txt`` (``#`` lines are its source)."""
    text = (Path(__file__).parent / "ood_classnames" / f"{name}.txt").read_text(encoding="utf-8")
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


# The standard ImageNet OOD benchmarks' class names, MOS's subsets as MCM, NegLabel and EOE evaluate
# them: the 47 Describable Textures (DTD) classes ("Textures"), 110 iNaturalist plant species, 50 SUN
# and 50 Places categories.
DTD_CLASSNAMES = _shipped_classnames("textures")
INATURALIST_CLASSNAMES = _shipped_classnames("inaturalist")
SUN_CLASSNAMES = _shipped_classnames("sun")
PLACES_CLASSNAMES = _shipped_classnames("places")

# Class names of evaluation OOD sets, for label-leakage checks. Folder sets may instead ship a
# ``classnames.txt`` (one per line) or class sub-folders; see :func:`ood_classnames`.
OOD_CLASSNAMES: dict[str, list[str]] = {
    "textures": DTD_CLASSNAMES,
    "dtd": DTD_CLASSNAMES,
    "inaturalist": INATURALIST_CLASSNAMES,
    "sun": SUN_CLASSNAMES,
    "places": PLACES_CLASSNAMES,
    "places365": PLACES_CLASSNAMES,
    "tiny-textures": ["brick", "brick wall", "grass", "gravel", "stones", "texture"],
    "tiny-objects": [
        "coin", "camera", "cameraman", "photographer", "moon", "page", "text", "book page",
        "galaxy", "hubble deep field", "stars", "retina", "eye fundus", "tissue", "cells",
        "microscopy",
    ],
}  # fmt: skip


# ---------------------------------------------------------------- records
@dataclass(frozen=True)
class ImageRecord:
    """One image: where its pixels come from and what it is.

    ``crop`` is a PIL box ``(left, top, right, bottom)`` in source pixels; ``flip`` mirrors the
    crop horizontally. ``class_idx`` is -1 for evaluation OOD images. ``size`` and ``mtime`` are the
    file's as the data index listed it: a file that differs when read is a bad input, not other pixels.
    ``limits`` are ``(data.max_pixels, data.min_side)``, checked from the header wherever it is read.
    """

    key: str
    class_idx: int
    class_name: str
    split: Literal["train", "test"]
    source: str
    crop: tuple[int, int, int, int] | None = None
    flip: bool = False
    size: int | None = None
    mtime: float | None = None
    limits: tuple[int, int] | None = None


@dataclass(frozen=True)
class BadInput:
    """An input file (or class folder) the listing did not use, and why (``reason`` in BAD_INPUT_REASONS)."""

    source: str
    reason: str
    detail: str
    class_name: str = ""
    split: str = ""

    def as_row(self) -> dict:
        return {"key": "", "source": self.source, "status": "skipped", "reason": self.reason,
                "error": self.detail, "class_name": self.class_name, "split": self.split, "origin": "listing"}


@dataclass
class IDDataset:
    """The ID classes (ordered: index = label) and their images, plus the input files not used."""

    classnames: list[str]
    records: list[ImageRecord]
    bad_inputs: list[BadInput] = field(default_factory=list)
    # each class's id where the source has one (an imagefolder's folder names, e.g. ImageNet
    # wnids): what a named class-name list (ood_core.classnames) looks a class up by
    class_ids: list[str] = field(default_factory=list)

    def train(self) -> list[ImageRecord]:
        return [r for r in self.records if r.split == "train"]

    def test(self) -> list[ImageRecord]:
        return [r for r in self.records if r.split == "test"]

    def by_class(self) -> dict[int, list[ImageRecord]]:
        """``class_idx -> records`` for every class (in class order, empty lists included)."""
        out: dict[int, list[ImageRecord]] = {i: [] for i in range(len(self.classnames))}
        for r in self.records:
            out[r.class_idx].append(r)
        return out


class DataError(ValueError):
    """A dataset is missing or laid out wrongly; the message says what is expected."""


class ImageDecodeError(DataError):
    """One input file cannot be used; ``reason`` (one of BAD_INPUT_REASONS) becomes its row's reason."""

    def __init__(self, path: str | Path, reason: str, detail: str):
        self.path, self.reason, self.detail = str(path), reason, detail
        super().__init__(f"image {path}: {detail} ({reason})")


def slug(text: str) -> str:
    """A key-safe form of ``text``: lower-case ``[a-z0-9_]`` only (no dots, WebDataset-safe)."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s or "x"


# ---------------------------------------------------------------- pixels
def _skimage_dir() -> Path:
    import skimage.data

    return Path(skimage.data.data_dir)


def skimage_path(name: str) -> Path:
    """Path of a photo bundled with scikit-image (by file stem, e.g. ``"chelsea"``)."""
    d = _skimage_dir()
    for ext in (".png", ".jpg"):
        p = d / f"{name}{ext}"
        if p.exists():
            return p
    raise DataError(f"scikit-image has no bundled photo '{name}' in {d}")


@dataclass(frozen=True)
class PixelSource:
    """Pixels made by code, not read from a file: sources ``<scheme>:<spec>`` such as ``world:...``.

    ``version`` enters the data identity, so a renderer change gives new stage keys downstream.
    """

    load: Callable[[str], Image.Image]
    version: str


PIXEL_SOURCES: Registry[PixelSource] = Registry("pixel source", plugins=DATA_PLUGINS)


def pixel_source(source: str) -> PixelSource | None:
    """The registered :class:`PixelSource` of ``source`` (by its ``scheme:`` prefix), else None."""
    scheme, sep, _ = source.partition(":")
    if not sep or not scheme.isalnum() or scheme == "skimage":
        return None
    return PIXEL_SOURCES.get(scheme) if scheme in PIXEL_SOURCES else None


def _source_path(source: str) -> Path:
    if source.startswith("skimage:"):
        return skimage_path(source.split(":", 1)[1])
    return Path(source)


@lru_cache(maxsize=32)
def _decoded(source: str) -> Image.Image:
    # Bundled photos are re-cropped many times; decode each once per process.
    return decode_image(_source_path(source))


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, im).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit and float grey: stretch to 8 bit (a plain convert would clip everything to white)
        arr = np.asarray(im, dtype=np.float64)
        arr = 255.0 * (arr - arr.min()) / max(float(arr.max() - arr.min()), 1.0)
        im = Image.fromarray(arr.astype(np.uint8))
    return im.convert("RGB")


def _check_file(path: Path, listed: tuple[int, float] | None = None) -> int:
    """Size in bytes of the regular file at ``path``; raises ImageDecodeError naming what it is instead.

    With ``listed`` (the size and mtime the data index recorded), a file changed since is refused.
    """
    try:
        st = os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise ImageDecodeError(path, "symlink_loop", "is a symlink loop") from None
        if os.path.islink(path):
            raise ImageDecodeError(path, "dangling_symlink", "is a symlink to a missing file") from None
        if err.errno == errno.ENOENT:
            raise ImageDecodeError(path, "missing_file", "does not exist") from None
        raise ImageDecodeError(path, "unreadable", f"cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ImageDecodeError(path, "not_a_file", "is a directory or special file, not an image file")
    if st.st_size == 0:
        raise ImageDecodeError(path, "empty_file", "is empty (0 bytes)")
    if listed is not None and (st.st_size, st.st_mtime) != listed:
        raise ImageDecodeError(
            path, "changed_since_index",
            f"was replaced after the data index was built ({listed[0]} bytes listed, {st.st_size} now; "
            f"mtime {listed[1]} listed, {st.st_mtime} now); a new run indexes the data anew",
        )  # fmt: skip
    return st.st_size


def _open_header(path: Path, max_pixels: int, min_side: int, listed: tuple[int, float] | None = None) -> Image.Image:
    """Open ``path`` reading the header only; size limits are checked before any pixel is decoded."""
    _check_file(path, listed)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
    except UnidentifiedImageError:
        raise ImageDecodeError(path, "not_an_image", "is not an image PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(path, "too_many_pixels", f"is too large to decode safely ({err})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as err:
        raise ImageDecodeError(path, "unreadable", f"cannot be opened ({type(err).__name__}: {err})") from None
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise ImageDecodeError(path, "too_many_pixels", f"has {w}x{h} pixels, over data.max_pixels={max_pixels}")
    if min(w, h) < min_side:
        im.close()
        raise ImageDecodeError(path, "too_small", f"is {w}x{h} pixels, under data.min_side={min_side}")
    return im


def probe_image(
    path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1, listed: tuple[int, float] | None = None
) -> tuple[int, int]:
    """``(width, height)`` from the header; raises :class:`ImageDecodeError` for an unusable file."""
    with _open_header(Path(path), max_pixels, min_side, listed) as im:
        return im.size


def decode_image(
    path: str | Path, size_hint: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int = 1,
    listed: tuple[int, float] | None = None,
) -> Image.Image:
    """The one guarded decoding path: RGB pixels of ``path`` with EXIF rotation applied.

    Every way a file can be unusable raises :class:`ImageDecodeError` with a ``reason``. With
    ``size_hint`` a JPEG is decoded at the smallest DCT scale still >= that size (``Image.draft``),
    so a huge photo costs little. ``listed``: the size and mtime the data index recorded for the file.
    """
    path = Path(path)
    with _open_header(path, max_pixels, min_side, listed) as im:
        if size_hint and im.format == "JPEG":
            im.draft("RGB", (size_hint, size_hint))
        try:
            im.load()
        except OSError as err:
            reason = "truncated" if "truncated" in str(err).lower() else "decode_error"
            raise ImageDecodeError(path, reason, f"cannot be decoded ({err})") from None
        except (ValueError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombError) as err:
            raise ImageDecodeError(path, "decode_error", f"cannot be decoded ({type(err).__name__}: {err})") from None
        try:
            im2 = ImageOps.exif_transpose(im)
        except Exception:  # noqa: BLE001 - a broken EXIF block must not lose the pixels
            im2 = im
        return _to_rgb(im2 if im2 is not None else im)


def load_image(rec: ImageRecord, size: int | None = None) -> Image.Image:
    """Decode ``rec`` as RGB, apply its crop/flip and, if ``size`` is given, return ``size``×``size``.

    Non-square images are centre-cropped to a square before resizing (the CLIP convention), so
    objects are never squashed. An unusable file raises :class:`ImageDecodeError`.
    """
    made = pixel_source(rec.source)
    if made is not None:
        im = made.load(rec.source)
    elif rec.source.startswith("skimage:"):
        im = _decoded(rec.source).copy()
    else:
        # a crop box is in source pixels: only whole images may be decoded at a reduced scale
        im = decode_image(rec.source, size_hint=size if rec.crop is None else None, listed=_listed(rec),
                          **_limits(rec))
    if rec.crop is not None:
        im = im.crop(rec.crop)
    if rec.flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if size is not None:
        w, h = im.size
        if w != h:
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            im = im.crop((left, top, left + s, top + s))
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BICUBIC)
    return im


def _limits(rec: ImageRecord) -> dict[str, int]:
    return dict(zip(("max_pixels", "min_side"), rec.limits, strict=True)) if rec.limits else {}


def _listed(rec: ImageRecord) -> tuple[int, float] | None:
    return (rec.size, rec.mtime) if rec.size is not None and rec.mtime is not None and rec.mtime >= 0 else None


def usable_images(records: list[ImageRecord], size: int | None = None) -> list[Image.Image]:
    """Decoded images of ``records``, leaving out the ones that cannot be decoded."""
    out = []
    for rec in records:
        try:
            out.append(load_image(rec, size))
        except ImageDecodeError as err:
            log.warning("skipping %s", err)
    return out


@lru_cache(maxsize=65536)
def image_bytes_per_pixel(rec: ImageRecord) -> float:
    """Compressed bytes per pixel: SynOOD's proxy for detail-rich source images.

    Whole files: file size / pixels. Crops: size of the crop encoded as PNG (fixed settings, so
    deterministic) / pixels of the crop. A file that cannot be read ranks last (-1).
    """
    try:
        if rec.crop is None and pixel_source(rec.source) is None:
            path = _source_path(rec.source)
            w, h = probe_image(path, listed=_listed(rec), **_limits(rec))
            return (rec.size if rec.size is not None else os.path.getsize(path)) / float(w * h)
        im = load_image(rec)
    except (ImageDecodeError, OSError):
        return -1.0
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=6, optimize=False)
    return buf.tell() / float(im.size[0] * im.size[1])


# ---------------------------------------------------------------- helpers
def _rng(seed: int, *parts: str) -> np.random.Generator:
    # crc32 of the names, not hash(): Python's str hash is salted per process.
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, *(zlib.crc32(p.encode()) for p in parts)])


def _random_crops(
    width: int, height: int, n: int, rng: np.random.Generator, flip: bool = True
) -> list[tuple[tuple[int, int, int, int], bool]]:
    short = min(width, height)
    out = []
    for _ in range(n):
        side = int(round(short * rng.uniform(0.45, 0.90)))
        x = int(rng.integers(0, width - side + 1))
        y = int(rng.integers(0, height - side + 1))
        f = bool(rng.random() < 0.5) if flip else False
        out.append(((x, y, x + side, y + side), f))
    return out


def _n_test(n: int, fraction: float) -> int:
    # At least one test and one train image per class.
    return min(max(1, int(round(n * fraction))), n - 1) if n >= 2 else 0


# a listed image name: its path (a string: a Path per name costs seconds at a million) and its
# data index entry (size, mtime)
Listed = tuple[str, Entry]


@dataclass
class _Tree:
    """One listed tree: its sub-folders, and the image names directly in each (``""``: the root)."""

    root: Path
    folders: list[str]
    files: dict[str, list[Listed]]
    entries: list[Entry]

    def images(self, folder: str = "") -> list[Listed]:
        return self.files.get(folder, [])

    def all_images(self) -> list[Listed]:
        """Every image name at any depth (files or not: the probe says what is wrong with one)."""
        base = str(self.root)
        return [(f"{base}/{e.path}", e) for e in self.entries if _is_image_name(e.path)]


_IMAGE_SUFFIXES = frozenset(IMAGE_EXTENSIONS)


def _is_image_name(path: str) -> bool:
    # Path(path).suffix's rule (a leading dot is no suffix) without a Path per name
    name = path[path.rfind("/") + 1:]
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in _IMAGE_SUFFIXES


def _tree(root: Path, entries: list[Entry]) -> _Tree:
    folders: list[str] = []
    files: dict[str, list[Listed]] = {}
    base = str(root)
    for e in entries:  # sorted by path, so every folder's names are sorted too
        folder, _, name = e.path.rpartition("/")
        if e.kind == DIR and not folder:
            folders.append(e.path)
        if "/" not in folder and _is_image_name(name):
            files.setdefault(folder, []).append((f"{base}/{e.path}", e))
    return _Tree(root, folders, files, entries)


def _listed_tree(root: Path) -> _Tree:
    """The tree below ``root`` as the data index lists it (once per run, see :mod:`ood_core.dataset_index`)."""
    return _tree(root, listing(str(root)))


def _record(key: str, class_idx: int, class_name: str, split: str, listed: Listed, cfg: DataConfig) -> ImageRecord:
    p, e = listed
    known = e.kind == FILE
    return ImageRecord(key, class_idx, class_name, split, p, size=e.size if known else None,
                       mtime=e.mtime if known else None, limits=(cfg.max_pixels, cfg.min_side))  # fmt: skip


def _usable(
    paths: list[Listed], cfg: DataConfig, limit: int | None, bad: list[BadInput], class_name: str = "", split: str = ""
) -> list[Listed]:
    """The first ``limit`` (all if None) names whose header is usable; the others go to ``bad``.

    Only headers are read, and only until ``limit`` usable files are found, so a 1,300-image class
    costs ``limit`` header reads. A file that decodes badly past its header fails later, as its row.
    """
    out: list[Listed] = []
    for p, e in paths:
        if limit is not None and len(out) >= limit:
            break
        try:
            probe_image(p, cfg.max_pixels, cfg.min_side, listed=(e.size, e.mtime) if e.kind == FILE else None)
        except ImageDecodeError as err:
            bad.append(BadInput(str(p), err.reason, err.detail, class_name, split))
            continue
        out.append((p, e))
    return out


# ---------------------------------------------------------------- ID sources
ID_SOURCES: Registry[Callable[[DataConfig, int], IDDataset]] = Registry("ID source", plugins=DATA_PLUGINS)


@ID_SOURCES.register("skimage")
def skimage_source(cfg: DataConfig, seed: int) -> IDDataset:
    """Seeded random square crops of real photos bundled with scikit-image (no download)."""
    classes = SKIMAGE_ID_CLASSES[: cfg.max_classes] if cfg.max_classes else SKIMAGE_ID_CLASSES
    classnames = [name for _, name in classes]
    records: list[ImageRecord] = []
    n = cfg.images_per_class
    for idx, (photo, name) in enumerate(classes):
        w, h = _decoded(f"skimage:{photo}").size
        # Seeded by the photo, not the index, so max_classes does not change the other crops.
        rng = _rng(seed, "id", photo)
        crops = _random_crops(w, h, n, rng)
        test_idx = set(rng.permutation(n)[: _n_test(n, cfg.test_fraction)].tolist())
        for i, (box, flip) in enumerate(crops):
            records.append(
                ImageRecord(
                    key=f"{slug(name)}_{i:04d}",
                    class_idx=idx,
                    class_name=name,
                    split="test" if i in test_idx else "train",
                    source=f"skimage:{photo}",
                    crop=box,
                    flip=flip,
                )
            )
    return IDDataset(classnames=classnames, records=records)


def _layout_help(root: Path) -> str:
    return (
        f"expected an image folder tree: {root}/train/<class>/*.JPEG (one folder per class, "
        f"e.g. ImageNet WordNet ids like n01440764) and optionally {root}/val/<class>/* for the "
        f"test split (or Food-101's release: {root}/images/<class>/*.jpg with {root}/meta/train.txt and "
        f"meta/test.txt); set data.root to that folder"
    )


def _open_clip_imagenet_classnames() -> tuple[str, ...]:
    # open_clip/zero_shot_metadata.py has no imports; loading it by path skips open_clip's
    # __init__ (which imports torch and takes seconds).
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.classnames='imagenet' needs open_clip (it ships the ImageNet class names)")
    path = Path(list(spec.submodule_search_locations)[0]) / "zero_shot_metadata.py"
    mod_spec = importlib.util.spec_from_file_location("_synth_ood_zero_shot_metadata", path)
    if mod_spec is None or mod_spec.loader is None or not path.is_file():
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return tuple(IMAGENET_CLASSNAMES)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return tuple(module.IMAGENET_CLASSNAMES)


@lru_cache(maxsize=1)
def imagenet_wnid_to_name() -> dict[str, str]:
    """ImageNet-1K wnid -> CLIP class name (open_clip's names, timm's sorted wnid list)."""
    from .lexicon import timm_info_file

    IMAGENET_CLASSNAMES = _open_clip_imagenet_classnames()
    path = timm_info_file("imagenet_synsets.txt")
    wnids = [w.strip() for w in path.read_text().splitlines() if w.strip()]
    if len(wnids) != len(IMAGENET_CLASSNAMES):
        raise DataError(f"{path} has {len(wnids)} wnids, expected {len(IMAGENET_CLASSNAMES)}")
    return dict(zip(wnids, IMAGENET_CLASSNAMES, strict=True))


@ID_SOURCES.register("imagefolder")
def imagefolder_source(cfg: DataConfig, seed: int, probe: Literal["all", "used"] = "all") -> IDDataset:
    """``<root>/train/<class>/*`` (+ optional ``<root>/val/<class>/*``), classes in sorted order.

    ``images_per_class`` is the total per class; ``test_fraction`` of it is test. Test images come
    from ``val/`` when it has the class, else from a seeded split of the (first, sorted) train files.
    Names come from the data index. ``probe="all"`` reads the header of every file it keeps, leaving
    bad ones out; ``"used"`` (a run's stages) reads none: the dataset is a function of the index alone,
    equal in every process of the run, and a file is probed where a stage uses it (a source, a near
    image, an evaluation sample), a bad one becoming that stage's failed row with its reason.
    A root with official split files (Food-101: ``images/<class>/<id>.jpg``, ``meta/train.txt``,
    ``meta/test.txt``) is read through them instead (:func:`split_file_listing`): the test split is
    the official one, whole.
    """
    if not cfg.root:
        raise DataError("data.root is not set for id_source 'imagefolder'; " + _layout_help(Path("<root>")))
    root = Path(cfg.root).expanduser()
    listed_splits = split_file_listing(root)
    if listed_splits is not None:  # Food-101's release: images/<class>/* and meta/{train,test}.txt
        train_by_class, val_by_class = listed_splits
        train_dir = root / "images"
        folders = sorted(train_by_class)
        images_of = lambda folder: train_by_class.get(folder, [])  # noqa: E731
    else:
        train_dir = root / "train"
        if not train_dir.is_dir():
            raise DataError(f"ID folder {train_dir} does not exist; " + _layout_help(root))
        train = _listed_tree(train_dir)
        folders = train.folders
        images_of = train.images
    if not folders:
        raise DataError(f"no class folders in {train_dir}; " + _layout_help(root))
    if cfg.max_classes:
        folders = folders[: cfg.max_classes]
    if cfg.classnames == "imagenet":
        table = imagenet_wnid_to_name()
        unknown = [f for f in folders if f not in table]
        if unknown:
            raise DataError(
                f"data.classnames='imagenet' but {len(unknown)} folder(s) in {train_dir} are not "
                f"ImageNet-1K wnids (e.g. {unknown[:3]}); use data.classnames='folder'"
            )
        classnames = [table[f] for f in folders]
    else:
        classnames = [f.replace("_", " ").strip() for f in folders]

    slugs = [slug(f) for f in folders]
    if len(set(slugs)) != len(slugs):
        slugs = [f"{s}_{i:04d}" for i, s in enumerate(slugs)]
    if listed_splits is None:
        val_by_class = val_files_by_class(root, folders, _listed_tree(root / "val"))
    n = cfg.images_per_class
    records: list[ImageRecord] = []
    bad: list[BadInput] = []
    kept_names: list[str] = []
    kept_ids: list[str] = []
    for folder, name, s in zip(folders, classnames, slugs, strict=True):
        listed = images_of(folder)
        if not listed:
            raise DataError(f"class folder {train_dir / folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        before = len(bad)
        train_files = _usable(listed, cfg, n, bad, name, "train") if probe == "all" else listed[:n]
        if not train_files:
            found = ", ".join(f"{b.source.rsplit('/', 1)[-1]}: {b.reason}" for b in bad[before:][:5])
            msg = (f"class folder {train_dir / folder} has no usable image ({len(listed)} listed; {found}); "
                   f"fix or remove the files, or set data.empty_class=drop to leave the class out")
            if cfg.empty_class == "error":
                raise DataError(msg)
            log.warning("dropping class %r: %s", name, msg)
            bad.append(BadInput(str(train_dir / folder), "class_without_usable_images", msg, name, "train"))
            continue
        idx = len(kept_names)
        kept_names.append(name)
        kept_ids.append(folder)
        val_listed = val_by_class.get(folder, [])
        val_files = _usable(val_listed, cfg, None, bad, name, "test") if probe == "all" else val_listed
        if val_files:
            # a real val split is the evaluation set: keep all of it, and train on up to n images
            tr = train_files[:n]
            te = val_files
        else:
            pool = train_files[:n]
            k = _n_test(len(pool), cfg.test_fraction)
            test_pos = set(_rng(seed, "split", folder).permutation(len(pool))[:k].tolist())
            tr = [p for i, p in enumerate(pool) if i not in test_pos]
            te = [p for i, p in enumerate(pool) if i in test_pos]
        for split, files in (("train", tr), ("test", te)):
            for i, p in enumerate(files):
                records.append(_record(f"{s}_{split}_{i:04d}", idx, name, split, p, cfg))
    if not kept_names:
        raise DataError(f"no class folder in {train_dir} has a usable image; " + _layout_help(root))
    return IDDataset(classnames=kept_names, records=records, bad_inputs=bad, class_ids=kept_ids)


# ---------------------------------------------------------------- val/ layouts
VAL_SOLUTION_CSV = "LOC_val_solution.csv"
DEVKIT_DIR = "ILSVRC2012_devkit_t12"


def _find_upwards(root: Path, name: str, levels: int = 3) -> Path | None:
    # Kaggle's download keeps LOC_val_solution.csv three levels above ILSVRC/Data/CLS-LOC
    for d in [root, *list(root.parents)[:levels]]:
        if (d / name).exists():
            return d / name
    return None


def read_val_solution_csv(path: Path) -> dict[str, str]:
    """``LOC_val_solution.csv`` (``ImageId,PredictionString``; first token is the wnid) -> stem: wnid."""
    import csv

    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise DataError(f"{path}: expected the columns ImageId,PredictionString (Kaggle's ImageNet format)")
    return {r["ImageId"].strip(): r["PredictionString"].split()[0] for r in rows if r["PredictionString"].strip()}


def read_devkit_labels(devkit: Path) -> dict[str, str]:
    """ILSVRC2012 devkit (``data/meta.mat`` + ``data/ILSVRC2012_validation_ground_truth.txt``) -> stem: wnid.

    Line i of the ground truth is the ILSVRC2012_ID of ``ILSVRC2012_val_{i:08d}``; ``meta.mat`` maps
    these ids (not in sorted-wnid order) to wnids.
    """
    from scipy.io import loadmat

    meta = loadmat(str(devkit / "data" / "meta.mat"), squeeze_me=True)["synsets"]
    id_to_wnid = {int(m["ILSVRC2012_ID"]): str(m["WNID"]) for m in meta}
    truth = (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").read_text().split()
    return {f"ILSVRC2012_val_{i:08d}": id_to_wnid[int(t)] for i, t in enumerate(truth, start=1)}


def flat_val_labels(root: Path) -> tuple[dict[str, str], Path] | None:
    """Labels of a flat ``val/`` (ImageNet's stock layout): ``(stem -> wnid, label file)`` or None."""
    csv_path = _find_upwards(root, VAL_SOLUTION_CSV) or (
        root / "val" / VAL_SOLUTION_CSV if (root / "val" / VAL_SOLUTION_CSV).exists() else None
    )
    if csv_path is not None:
        return read_val_solution_csv(csv_path), csv_path
    devkit = _find_upwards(root, DEVKIT_DIR, levels=1)
    if devkit is not None and (devkit / "data" / "meta.mat").exists():
        return read_devkit_labels(devkit), devkit
    return None


SPLIT_FILES = ("meta/train.txt", "meta/test.txt")


def split_file_listing(root: Path) -> tuple[dict[str, list[Listed]], dict[str, list[Listed]]] | None:
    """``({class: train files}, {class: test files})`` from official split files, or None without them.

    Food-101's layout: ``meta/train.txt`` / ``meta/test.txt`` list ``<class>/<id>`` (no extension:
    ``.jpg`` is added) under ``images/``, whose names come from the data index. Files are sorted per
    class; a listed file that the index does not have fails where it is read, as a bad input with its
    reason (``missing_file``), never silently.
    """
    from ood_core.dataset_index import OTHER, Entry

    train_txt, test_txt = (root / f for f in SPLIT_FILES)
    if not (train_txt.is_file() and test_txt.is_file() and (root / "images").is_dir()):
        return None
    images = _listed_tree(root / "images")
    by_rel = {e.path: (p, e) for folder in images.folders for p, e in images.images(folder)}

    def read(path: Path) -> dict[str, list[Listed]]:
        out: dict[str, list[Listed]] = {}
        for ln in path.read_text().splitlines():
            entry = ln.strip()
            if not entry:
                continue
            if "/" not in entry:
                raise DataError(f"{path}: line {entry!r} is not '<class>/<image id>'")
            cls, name = entry.split("/", 1)
            name = name if Path(name).suffix.lower() in IMAGE_EXTENSIONS else name + ".jpg"
            rel = f"{cls}/{name}"
            out.setdefault(cls, []).append(by_rel.get(rel) or (str(root / "images" / rel), Entry(rel, OTHER, -1, -1.0)))
        return {c: sorted(ps, key=lambda p: p[0]) for c, ps in out.items()}

    train, test = read(train_txt), read(test_txt)
    if not train:
        raise DataError(f"{train_txt} lists no images")
    return train, test


def val_files_by_class(root: Path, folders: list[str], val: _Tree) -> dict[str, list[Listed]]:
    """Test images per class folder from ``<root>/val`` (listed as ``val``): ``val/<class>/*`` or
    ImageNet's flat ``val/*``.

    A flat ``val/`` is labelled by ``LOC_val_solution.csv`` or the ILSVRC2012 devkit; without one
    this stops with a :class:`DataError` (never a silent fallback to a split of train).
    """
    val_dir = root / "val"
    if not val.entries:
        return {}
    present = set(val.folders)
    by_folder = {f: val.images(f) for f in folders if f in present}
    if by_folder:
        return by_folder
    flat = val.images()
    if not flat:
        return {}
    found = flat_val_labels(root)
    if found is None:
        raise DataError(
            f"{val_dir} holds {len(flat)} images directly (ImageNet's stock flat layout) but no labels "
            f"were found: put {VAL_SOLUTION_CSV} (Kaggle) in {root} or a parent folder, or the "
            f"{DEVKIT_DIR}/ folder in {root} or {root.parent}; or sort val/ into val/<wnid>/ folders; "
            f"or move val/ away to test on a held-out part of train"
        )
    labels, source = found
    wanted = set(folders)
    out: dict[str, list[Path]] = {}
    stems = [os.path.splitext(os.path.basename(p))[0] for p, _ in flat]
    unlabelled = [p for p, stem in zip(flat, stems, strict=True) if stem not in labels]
    if unlabelled:
        raise DataError(
            f"{len(unlabelled)} of {len(flat)} images in {val_dir} have no label in {source} "
            f"(e.g. {os.path.basename(unlabelled[0][0])}); is it the label file of this val/ folder?"
        )
    for listed, stem in zip(flat, stems, strict=True):
        if labels[stem] in wanted:
            out.setdefault(labels[stem], []).append(listed)
    return out


def load_id_dataset(cfg: DataConfig, seed: int, probe: Literal["all", "used"] = "all") -> IDDataset:
    """Build the ID dataset named by ``cfg.id_source`` (deterministic for ``seed``).

    ``probe="used"`` (a run's stages): a source that lists files reads only the headers of the
    files it must (see :func:`imagefolder_source`); others ignore it.
    """
    source = ID_SOURCES.get(cfg.id_source)
    lazy = probe != "all" and "probe" in inspect.signature(source).parameters
    ds = source(cfg, seed, probe=probe) if lazy else source(cfg, seed)
    keys = [r.key for r in ds.records]
    if len(set(keys)) != len(keys):
        raise DataError(f"ID source '{cfg.id_source}' produced duplicate record keys")
    return ds


# ---------------------------------------------------------------- OOD sets
OOD_SETS: Registry[Callable[[str, DataConfig, int], list[ImageRecord]]] = Registry("OOD set", plugins=DATA_PLUGINS)


def _tiny_ood(name: str, cfg: DataConfig, seed: int) -> list[ImageRecord]:
    photos = TINY_OOD_SOURCES[name]
    # About one ID class worth of images per set, spread over its photos.
    per_photo = max(2, math.ceil(cfg.images_per_class / len(photos)))
    records: list[ImageRecord] = []
    for photo in photos:
        w, h = _decoded(f"skimage:{photo}").size
        for i, (box, flip) in enumerate(_random_crops(w, h, per_photo, _rng(seed, "ood", name, photo))):
            records.append(
                ImageRecord(
                    key=f"{slug(name)}_{slug(photo)}_{i:04d}",
                    class_idx=-1,
                    class_name=name,
                    split="test",
                    source=f"skimage:{photo}",
                    crop=box,
                    flip=flip,
                )
            )
    return records


for _name in TINY_OOD_SOURCES:
    OOD_SETS.register(_name, _tiny_ood)


def _folder_ood(name: str, folder: Path, cfg: DataConfig) -> tuple[list[ImageRecord], list[BadInput]]:
    if not folder.is_dir():
        raise DataError(
            f"OOD set '{name}': folder {folder} does not exist (expected images anywhere below it, "
            f"e.g. {folder}/images/*.jpg)"
        )
    bad: list[BadInput] = []
    listed = _listed_tree(folder).all_images()
    files = _usable(listed, cfg, None, bad, name, "test")  # evaluation samples: all used
    if not files:
        raise DataError(f"OOD set '{name}': no usable images ({', '.join(IMAGE_EXTENSIONS)}) below {folder}")
    # Keys from the folder's own name: "folder:/long/path/to/iNaturalist" -> "inaturalist_000000".
    s = slug(folder.name if name.startswith("folder:") else name)
    return [_record(f"{s}_{i:06d}", -1, name, "test", p, cfg) for i, p in enumerate(files)], bad


def _resolve_folder(name: str, cfg: DataConfig) -> Path | None:
    if name.startswith("folder:"):
        return Path(name.split(":", 1)[1]).expanduser()
    if cfg.ood_root:
        return Path(cfg.ood_root).expanduser() / name
    return None


def load_ood_set(name: str, cfg: DataConfig, seed: int) -> list[ImageRecord]:
    """Records of evaluation OOD set ``name`` (``class_idx=-1``, ``class_name=name``, split test).

    ``name`` is a registered set, ``folder:<path>``, or a folder name under ``cfg.ood_root``.
    """
    return list_ood_set(name, cfg, seed)[0]


# a folder set's records per (set, data settings, seed), with the listing they came from: its
# headers are read once per process and listing (finetune asks for a set's records more than once)
_FOLDER_SETS: dict[tuple, tuple[list[Entry], tuple[list[ImageRecord], list[BadInput]]]] = {}


def list_ood_set(name: str, cfg: DataConfig, seed: int) -> tuple[list[ImageRecord], list[BadInput]]:
    """:func:`load_ood_set` plus the files of the set that were not usable."""
    if name in OOD_SETS:
        return OOD_SETS.get(name)(name, cfg, seed), []
    folder = _resolve_folder(name, cfg)
    if folder is None:
        raise DataError(
            f"unknown OOD set '{name}': use one of {', '.join(OOD_SETS.names())}, "
            f"'folder:<path>', or set data.ood_root to a folder containing '{name}/'"
        )
    key, listed = (name, cfg.model_dump_json(), seed), listing(str(folder))
    memo = _FOLDER_SETS.get(key)
    if memo is None or memo[0] is not listed:
        memo = _FOLDER_SETS[key] = (listed, _folder_ood(name, folder, cfg))
    records, bad = memo[1]
    return list(records), list(bad)


def ood_classnames(name: str, cfg: DataConfig | None = None) -> list[str]:
    """Class names of OOD set ``name`` for leakage checks ([] when unknown).

    Order: the built-in table (case-insensitive; ``Textures``/``dtd`` -> DTD), then a
    ``classnames.txt`` in the set's folder, then its class sub-folder names (``images/<class>/``
    or ``<class>/``).
    """
    key = name.lower()
    if key in OOD_CLASSNAMES:
        return list(OOD_CLASSNAMES[key])
    if name in OOD_SETS and getattr(OOD_SETS.get(name), "classnames", None):
        return list(OOD_SETS.get(name).classnames)  # a registered set that names its classes
    folder = _resolve_folder(name, cfg) if cfg is not None else None
    if folder is None and name.startswith("folder:"):
        folder = Path(name.split(":", 1)[1])
    if folder is None or not folder.is_dir():
        return []
    txt = folder / "classnames.txt"
    if txt.is_file():
        return [ln.strip() for ln in txt.read_text().splitlines() if ln.strip()]
    base = folder / "images" if (folder / "images").is_dir() else folder
    subdirs = sorted(p.name for p in base.iterdir() if p.is_dir())
    return [d.replace("_", " ") for d in subdirs]


# ---------------------------------------------------------------- source selection
def select_sources(dataset: IDDataset, per_class: int, empty_class: str = "drop") -> list[ImageRecord]:
    """SynOOD source selection: per class, the ``per_class`` train images with the most bytes/pixel.

    Classes in dataset order; within a class by bytes/pixel descending, ties by key. Ranking reads
    each train image's header: a class none of whose train images can be read is an error with
    ``empty_class="error"``, else logged (its sources then fail where they are used, as bad inputs).
    """
    out: list[ImageRecord] = []
    for idx, recs in dataset.by_class().items():
        train = [r for r in recs if r.split == "train"]
        ranked = sorted(train, key=lambda r: (-image_bytes_per_pixel(r), r.key))
        if ranked and image_bytes_per_pixel(ranked[0]) < 0:  # cached: no second probe
            msg = (f"class {dataset.classnames[idx]!r} has no usable train image ({len(ranked)} listed, e.g. "
                   f"{ranked[0].source}); fix or remove the files, or set data.empty_class=drop to go on")
            if empty_class == "error":
                raise DataError(msg)
            log.warning("%s: its sources fail as bad inputs", msg)
        out.extend(ranked[:per_class])
    return out

"""A data root with the kinds of bad files a real ImageNet-size folder has: every file gets a defined
outcome (used, or a skipped/failed row with a reason), and the run completes and verifies."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ood_core.config import load_config
from ood_core.data import DataError, ImageDecodeError, decode_image, load_id_dataset, load_image

# file name -> expected outcome: "used", or the listing's skip reason, or the decoder's failure reason
EXPECTED = {
    "alpha/a_truncated.JPEG": "failed:truncated",  # the first of its class, header intact
    "alpha/empty.JPEG": "skipped:empty_file",
    "alpha/text.JPEG": "skipped:not_an_image",
    "alpha/bomb.png": "skipped:too_many_pixels",  # header claims 40,000 x 40,000
    "alpha/over_limit.png": "skipped:too_many_pixels",  # real pixels over data.max_pixels
    "alpha/one_pixel.png": "skipped:too_small",
    "alpha/dangling.JPEG": "skipped:dangling_symlink",
    "alpha/loop.JPEG": "skipped:symlink_loop",
    "alpha/folder.JPEG": "skipped:not_a_file",
    "alpha/grey16.png": "used",  # 16-bit
    "alpha/cmyk.jpg": "used",
    "alpha/palette_alpha.png": "used",
    "alpha/exif_rotated.jpg": "used",  # rotation applied
    "alpha/café au lait ñ.JPEG": "used",  # spaces and non-ASCII letters
    "alpha/good_0.JPEG": "used",
    "Alpha/good_0.JPEG": "used",  # class folders differing only by case ...
    "al-pha/good_0.JPEG": "used",  # ... or punctuation
    "Alpha/good_1.JPEG": "used",
    "al-pha/good_1.JPEG": "used",
    "broken/x.JPEG": "skipped:not_an_image",  # a class whose files are all undecodable
    "broken/y.JPEG": "skipped:empty_file",
}
MAX_PIXELS = 300 * 300


def _photo(seed: int, size=(96, 80)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90, **kw)
    return buf.getvalue()


def _png_header_only(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def build_bad_corpus(root: Path) -> Path:
    """``root/train/<class>/`` with every kind of bad file in EXPECTED."""
    t = root / "train"
    for d in ("alpha", "Alpha", "al-pha", "broken"):
        (t / d).mkdir(parents=True)
    a = t / "alpha"
    (a / "a_truncated.JPEG").write_bytes(_jpeg(_photo(1))[:900])
    (a / "empty.JPEG").write_bytes(b"")
    (a / "text.JPEG").write_text("this is not a picture\n")
    (a / "bomb.png").write_bytes(_png_header_only(40_000, 40_000))
    _photo(2, (400, 400)).save(a / "over_limit.png")
    Image.new("RGB", (1, 1), (9, 9, 9)).save(a / "one_pixel.png")
    os.symlink(a / "does_not_exist.JPEG", a / "dangling.JPEG")
    os.symlink(a / "loop.JPEG", a / "loop.JPEG")
    (a / "folder.JPEG").mkdir()
    grey = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 20).astype(np.uint16)
    Image.fromarray(grey).save(a / "grey16.png")  # mode I;16
    _photo(3).convert("CMYK").save(a / "cmyk.jpg", format="JPEG")
    pal = _photo(4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal.save(a / "palette_alpha.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    (a / "exif_rotated.jpg").write_bytes(_jpeg(_photo(5, (96, 48)), exif=exif.tobytes()))
    (a / "café au lait ñ.JPEG").write_bytes(_jpeg(_photo(6)))
    (a / "good_0.JPEG").write_bytes(_jpeg(_photo(7)))
    for i, d in enumerate(("Alpha", "al-pha")):
        for j in range(2):
            (t / d / f"good_{j}.JPEG").write_bytes(_jpeg(_photo(10 + 2 * i + j)))
    (t / "broken" / "x.JPEG").write_bytes(b"GIF89a-not-really")
    (t / "broken" / "y.JPEG").write_bytes(b"")
    return root


def _cfg(root: Path, tmp: Path, **extra):
    sets = {
        "data.id_source": "imagefolder",
        "data.root": str(root),
        "data.images_per_class": "30",
        "data.max_pixels": str(MAX_PIXELS),
        "data.empty_class": "drop",
        "models.cache_dir": str(tmp / "models"),
        **extra,
    }
    return load_config("tiny", sets)


def test_every_bad_file_has_a_defined_outcome(tmp_path):
    assert len({v for v in EXPECTED.values() if v != "used"}) + 5 >= 12  # >= 12 kinds of bad file
    root = build_bad_corpus(tmp_path / "data")
    ds = load_id_dataset(_cfg(root, tmp_path).data, seed=0)
    train = root / "train"
    outcome: dict[str, str] = {}
    for b in ds.bad_inputs:
        rel = os.path.relpath(b.source, train)
        outcome[rel] = f"skipped:{b.reason}"
    for r in ds.records:
        rel = os.path.relpath(r.source, train)
        try:
            im = load_image(r, 32)
            assert im.mode == "RGB" and im.size == (32, 32)
            outcome[rel] = "used"
        except ImageDecodeError as err:
            outcome[rel] = f"failed:{err.reason}"
    assert outcome.pop("broken") == "skipped:class_without_usable_images"
    assert outcome == EXPECTED
    # the class without a usable image is dropped; the case/punctuation twins are distinct classes
    assert ds.classnames == ["Alpha", "al-pha", "alpha"]
    assert len({r.key for r in ds.records}) == len(ds.records)


def test_conversions_are_applied(tmp_path):
    a = build_bad_corpus(tmp_path / "data") / "train" / "alpha"
    assert decode_image(a / "exif_rotated.jpg").size == (48, 96)  # EXIF orientation 6 applied
    grey = np.asarray(decode_image(a / "grey16.png"))
    assert grey.max() == 255 and grey.min() == 0  # 16-bit stretched, not clipped to white
    assert decode_image(a / "palette_alpha.png").mode == "RGB"
    assert decode_image(a / "cmyk.jpg").mode == "RGB"


def test_huge_jpeg_is_decoded_at_a_reduced_scale(tmp_path):
    path = tmp_path / "big.jpg"
    path.write_bytes(_jpeg(_photo(0, (2400, 1600))))
    assert min(decode_image(path, size_hint=64).size) < 1600 // 4  # draft: 1/8 DCT scale
    assert decode_image(path).size == (2400, 1600)


def test_class_without_usable_image_is_an_error_naming_the_folder_by_default(tmp_path):
    root = build_bad_corpus(tmp_path / "data")
    cfg = _cfg(root, tmp_path, **{"data.empty_class": "error"})
    with pytest.raises(DataError, match=r"train/broken has no usable image.*empty_class=drop"):
        load_id_dataset(cfg.data, seed=0)


@pytest.mark.slow
def test_run_on_the_bad_corpus_completes_records_every_bad_input_and_verifies(tmp_path, capsys):
    import pyarrow.parquet as pq

    from flows.cli import main
    from ood_core.pipeline import resolve_keys, run_local
    from ood_core.storage import StageStore

    root = build_bad_corpus(tmp_path / "data")
    cfg = _cfg(root, tmp_path, **{"sketch.sources_per_class": "3", "sketch.far_labels": "6",
                                   "sketch.far_per_turn": "6", "sketch.lexicon_limit": "200",
                                   "generate.steps": "2", "generate.rounds": "1",
                                   # finetune then reads every ID train image (by default only the sources)
                                   "finetune.synood_data": "all"})
    out = str(tmp_path / "run")
    results = run_local(cfg, out, log=lambda m: None)
    assert set(results) == {"sketch", "generate", "elaborate", "finetune"}
    keys = resolve_keys(cfg)
    fin = StageStore(out, "finetune", keys["finetune"])
    rows = {r["key"]: r for r in fin.read_manifest().to_pylist()}
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert any(r["reason"] == "truncated" and "a_truncated.JPEG" in r["error"] for r in failed)
    # a run reads no header while listing: every bad file is a failed row, with the same reason the
    # listing's probe gives it, where a stage reads it (finetune, at synood_data: all, reads every ID image)
    table = pq.read_table(fin.path("bad_inputs.parquet")).to_pylist()
    by_file = {os.path.relpath(r["source"], root / "train"): (r["status"], r["reason"], r["origin"]) for r in table}
    for rel, want in EXPECTED.items():
        if want != "used":
            assert by_file[rel] == ("failed", want.split(":")[1], "decode"), rel
    assert set(by_file) == {k for k, v in EXPECTED.items() if v != "used"}
    assert results["finetune"]["bad_inputs"]["truncated"] == 1
    # sketch ranks the sources by their headers: the class without a readable image gives its
    # (only) source, which fails where sketch reads it
    sketch = StageStore(out, "sketch", keys["sketch"])
    sketch_bad = pq.read_table(sketch.path("bad_inputs.parquet")).to_pylist()
    assert [os.path.relpath(r["source"], root / "train").split("/")[0] for r in sketch_bad] == ["broken"]
    assert main(["verify", out]) == 0
    assert main(["status", out]) == 0
    assert "bad input" in capsys.readouterr().out


def test_ood_folder_keeps_usable_files_and_lists_the_rest(tmp_path):
    from ood_core.data import list_ood_set

    folder = tmp_path / "inat" / "images"
    folder.mkdir(parents=True)
    (folder / "ok.jpg").write_bytes(_jpeg(_photo(1)))
    (folder / "zero.jpg").write_bytes(b"")
    (folder / "notes.jpg").write_text("not an image")
    cfg = _cfg(tmp_path, tmp_path).data
    records, bad = list_ood_set(f"folder:{tmp_path / 'inat'}", cfg, seed=0)
    assert [Path(r.source).name for r in records] == ["ok.jpg"]
    assert sorted((Path(b.source).name, b.reason) for b in bad) == [("notes.jpg", "not_an_image"), ("zero.jpg", "empty_file")]

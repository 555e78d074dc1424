"""ID data, evaluation OOD sets and SynOOD source selection."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ood_core.config import DataConfig
from ood_core.data import (
    ID_SOURCES,
    OOD_SETS,
    DataError,
    IDDataset,
    ImageRecord,
    image_bytes_per_pixel,
    load_id_dataset,
    load_image,
    load_ood_set,
    ood_classnames,
    select_sources,
)

TINY = DataConfig(images_per_class=8, image_size=32)


def test_registries():
    assert {"skimage", "imagefolder"} <= set(ID_SOURCES.names())
    assert {"tiny-textures", "tiny-objects"} <= set(OOD_SETS.names())


def test_skimage_deterministic_and_seeded():
    a = load_id_dataset(TINY, seed=0)
    b = load_id_dataset(TINY, seed=0)
    c = load_id_dataset(TINY, seed=1)
    assert a == b
    assert [r.crop for r in a.records] != [r.crop for r in c.records]
    assert a.classnames == c.classnames == ["astronaut", "cat", "coffee cup", "rocket", "motorcycle"]


def test_skimage_records_shape():
    ds = load_id_dataset(TINY, seed=0)
    keys = [r.key for r in ds.records]
    assert len(set(keys)) == len(keys)
    assert all("." not in k for k in keys)
    assert "astronaut_0003" in keys
    groups = ds.by_class()
    assert list(groups) == list(range(len(ds.classnames)))
    for idx, recs in groups.items():
        assert len(recs) == 8
        assert {r.class_name for r in recs} == {ds.classnames[idx]}
        n_test = sum(r.split == "test" for r in recs)
        assert n_test == 2  # round(8 * 0.25)
    assert len(ds.train()) + len(ds.test()) == len(ds.records)


def test_max_classes_keeps_crops_of_remaining_classes():
    full = load_id_dataset(TINY, seed=0)
    two = load_id_dataset(TINY.model_copy(update={"max_classes": 2}), seed=0)
    assert two.classnames == full.classnames[:2]
    assert two.records == [r for r in full.records if r.class_idx < 2]


def test_crops_are_real_content():
    ds = load_id_dataset(TINY, seed=0)
    for rec in ds.records[::7]:
        im = load_image(rec, 32)
        assert im.mode == "RGB" and im.size == (32, 32)
        arr = np.asarray(im, dtype=np.float32)
        assert arr.std() > 5.0
    rec = ds.records[0]
    full = load_image(rec)
    left, top, right, bottom = rec.crop
    assert full.size == (right - left, bottom - top)
    side = full.size[0]
    assert 0.44 * 512 <= side <= 0.91 * 512  # astronaut is 512x512


def test_flip_is_applied():
    ds = load_id_dataset(TINY, seed=0)
    rec = next(r for r in ds.records if r.flip)
    from dataclasses import replace

    a = np.asarray(load_image(rec))
    b = np.asarray(load_image(replace(rec, flip=False)))
    assert np.array_equal(a, b[:, ::-1])


def test_select_sources_by_bytes_per_pixel():
    ds = load_id_dataset(TINY, seed=0)
    picked = select_sources(ds, 3)
    assert picked == select_sources(ds, 3)
    assert len(picked) == 3 * len(ds.classnames)
    assert all(r.split == "train" for r in picked)
    for idx, recs in ds.by_class().items():
        mine = [r for r in picked if r.class_idx == idx]
        bpp = [image_bytes_per_pixel(r) for r in mine]
        assert bpp == sorted(bpp, reverse=True)
        rest = [image_bytes_per_pixel(r) for r in recs if r.split == "train" and r not in mine]
        assert min(bpp) >= max(rest)


def test_select_sources_whole_files_and_ties(tmp_path):
    noisy = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(tmp_path / "noisy.png")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "flat.png")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "flat2.png")
    recs = [
        ImageRecord("c_flat", 0, "c", "train", str(tmp_path / "flat.png")),
        ImageRecord("c_noisy", 0, "c", "train", str(tmp_path / "noisy.png")),
        ImageRecord("b_flat", 0, "c", "train", str(tmp_path / "flat2.png")),
    ]
    ds = IDDataset(["c"], recs)
    assert [r.key for r in select_sources(ds, 3)] == ["c_noisy", "b_flat", "c_flat"]


def _tree(root, classes, n, split="train", ext=".png"):
    rng = np.random.default_rng(1)
    for c in classes:
        d = root / split / c
        d.mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{c}.{i}{ext}")


def test_imagefolder_split_from_train(tmp_path):
    _tree(tmp_path, ["zebra_crossing", "apple", "mango"], 6, ext=".JPEG")
    cfg = DataConfig(id_source="imagefolder", root=str(tmp_path), images_per_class=4, max_classes=2)
    ds = load_id_dataset(cfg, seed=0)
    assert ds.classnames == ["apple", "mango"]
    assert len(ds.records) == 8
    assert sum(r.split == "test" for r in ds.records) == 2
    assert all("." not in r.key for r in ds.records)
    assert ds == load_id_dataset(cfg, seed=0)
    im = load_image(ds.records[0], 16)
    assert im.size == (16, 16) and im.mode == "RGB"


def test_imagefolder_with_val_and_imagenet_names(tmp_path):
    _tree(tmp_path, ["n01443537", "n01440764"], 5)
    _tree(tmp_path, ["n01443537", "n01440764"], 3, split="val", ext=".jpg")
    cfg = DataConfig(id_source="imagefolder", root=str(tmp_path), classnames="imagenet", images_per_class=4)
    ds = load_id_dataset(cfg, seed=0)
    assert ds.classnames == ["tench", "goldfish"]
    test = ds.test()
    # a real val split is kept whole for evaluation; training takes up to images_per_class
    assert len(test) == 6 and all("/val/" in r.source for r in test)
    assert len(ds.train()) == 8 and all("/train/" in r.source for r in ds.train())


def test_food101_split_files_are_the_splits(tmp_path):
    """Food-101's release: images/<class>/<id>.jpg listed by meta/train.txt and meta/test.txt."""
    rng = np.random.default_rng(0)
    listing = {"train": ["apple_pie/1005", "apple_pie/0042", "baklava/7", "baklava/9", "baklava/11"],
               "test": ["apple_pie/0133", "baklava/3"]}
    for entry in [*listing["train"], *listing["test"], "baklava/unlisted"]:  # an image no split lists
        (tmp_path / "images" / entry).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{entry}.jpg")
    (tmp_path / "meta").mkdir()
    for split, lines in listing.items():
        (tmp_path / "meta" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    cfg = DataConfig(id_source="imagefolder", root=str(tmp_path), images_per_class=2)
    ds = load_id_dataset(cfg, seed=0)
    assert ds.classnames == ["apple pie", "baklava"]

    def files(split):
        return sorted(r.source.split("/images/", 1)[1] for r in ds.records if r.split == split)

    # the official test split whole; training takes the first images_per_class listed per class (sorted)
    assert files("test") == ["apple_pie/0133.jpg", "baklava/3.jpg"]
    assert files("train") == ["apple_pie/0042.jpg", "apple_pie/1005.jpg", "baklava/11.jpg", "baklava/7.jpg"]
    # without the split files the same root is not a Food-101 tree: the train/ layout is required
    (tmp_path / "meta" / "test.txt").unlink()
    with pytest.raises(DataError, match="meta/train.txt"):
        load_id_dataset(cfg, 0)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="train/<class>"):
        load_id_dataset(DataConfig(id_source="imagefolder", root=str(tmp_path / "nope")), 0)
    with pytest.raises(DataError, match="data.root"):
        load_id_dataset(DataConfig.model_construct(id_source="imagefolder", root=None), 0)
    _tree(tmp_path, ["not_a_wnid"], 2)
    with pytest.raises(DataError, match="not ImageNet"):
        load_id_dataset(DataConfig(id_source="imagefolder", root=str(tmp_path), classnames="imagenet"), 0)


def test_tiny_ood_sets():
    ds = load_id_dataset(TINY, seed=0)
    id_sources = {r.source for r in ds.records}
    all_keys = [r.key for r in ds.records]
    for name in ("tiny-textures", "tiny-objects"):
        recs = load_ood_set(name, TINY, seed=0)
        assert recs == load_ood_set(name, TINY, seed=0)
        assert recs and all(r.class_idx == -1 and r.class_name == name and r.split == "test" for r in recs)
        assert not id_sources & {r.source for r in recs}
        all_keys += [r.key for r in recs]
        im = load_image(recs[-1], 32)
        assert im.mode == "RGB" and np.asarray(im).std() > 1.0
        assert ood_classnames(name)
    assert len(set(all_keys)) == len(all_keys) and all("." not in k for k in all_keys)


def test_folder_ood_sets(tmp_path):
    _tree(tmp_path / "ood", ["banded", "woven"], 2, split="images")
    recs = load_ood_set(f"folder:{tmp_path / 'ood'}", TINY, seed=0)
    assert len(recs) == 4 and recs[0].key == "ood_000000"
    assert all(r.class_idx == -1 and r.class_name == f"folder:{tmp_path / 'ood'}" for r in recs)
    cfg = DataConfig(ood_root=str(tmp_path))
    assert len(load_ood_set("ood", cfg, 0)) == 4
    assert ood_classnames("ood", cfg) == ["banded", "woven"]
    (tmp_path / "ood" / "classnames.txt").write_text("sea slug\nkelp\n")
    assert ood_classnames("ood", cfg) == ["sea slug", "kelp"]
    assert ood_classnames("unknown-set") == []
    assert "woven" in ood_classnames("Textures")
    with pytest.raises(DataError, match="does not exist"):
        load_ood_set("iNaturalist", cfg, 0)
    with pytest.raises(DataError, match="unknown OOD set"):
        load_ood_set("iNaturalist", TINY, 0)

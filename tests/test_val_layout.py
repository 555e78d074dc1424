"""ImageNet's stock flat val/ folder: labelled from LOC_val_solution.csv or the devkit, never guessed."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ood_core.config import load_config
from ood_core.data import DataError, load_id_dataset

WNIDS = ["n01440764", "n01443537"]
# val image i belongs to WNIDS[VAL_CLASS[i]]; deliberately not sorted by class
VAL_CLASS = [1, 0, 1, 1, 0]


def _img(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)


def _imagenet(root):
    for c, wnid in enumerate(WNIDS):
        for i in range(4):
            _img(root / "train" / wnid / f"{wnid}_{i}.JPEG", 10 * c + i)
    for i, _ in enumerate(VAL_CLASS, start=1):
        _img(root / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", 100 + i)
    return root


def _cfg(root):
    return load_config(
        "tiny",
        {"data.id_source": "imagefolder", "data.root": str(root), "data.classnames": "imagenet", "data.images_per_class": "4"},
    ).data


def _test_labels(ds):
    return sorted((r.source.rsplit("/", 1)[1], ds.classnames[r.class_idx]) for r in ds.test())


def _expected():
    names = {"n01440764": "tench", "n01443537": "goldfish"}
    return sorted((f"ILSVRC2012_val_{i:08d}.JPEG", names[WNIDS[c]]) for i, c in enumerate(VAL_CLASS, start=1))


def test_flat_val_with_kaggle_solution_csv(tmp_path):
    # Kaggle's layout: the csv sits three levels above ILSVRC/Data/CLS-LOC
    root = _imagenet(tmp_path / "ILSVRC" / "Data" / "CLS-LOC")
    lines = ["ImageId,PredictionString"]
    lines += [f"ILSVRC2012_val_{i:08d},{WNIDS[c]} 1 2 3 4 {WNIDS[c]} 5 6 7 8" for i, c in enumerate(VAL_CLASS, start=1)]
    (tmp_path / "LOC_val_solution.csv").write_text("\n".join(lines) + "\n")
    ds = load_id_dataset(_cfg(root), 0)
    assert _test_labels(ds) == _expected()
    assert len(ds.train()) == 8 and all("/train/" in r.source for r in ds.train())


def test_flat_val_with_the_devkit_ground_truth(tmp_path):
    from scipy.io import savemat

    root = _imagenet(tmp_path / "imagenet")
    data = root / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    # the devkit's ILSVRC2012_IDs are not the sorted-wnid order: here id 1 is the second wnid
    synsets = np.zeros((2,), dtype=[("ILSVRC2012_ID", "O"), ("WNID", "O")])
    synsets[0] = (1, WNIDS[1])
    synsets[1] = (2, WNIDS[0])
    savemat(str(data / "meta.mat"), {"synsets": synsets})
    ids = {WNIDS[1]: 1, WNIDS[0]: 2}
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{ids[WNIDS[c]]}\n" for c in VAL_CLASS))
    assert _test_labels(load_id_dataset(_cfg(root), 0)) == _expected()


def test_flat_val_without_labels_stops_instead_of_falling_back(tmp_path):
    root = _imagenet(tmp_path / "imagenet")
    with pytest.raises(DataError, match=r"5 images directly .* LOC_val_solution.csv"):
        load_id_dataset(_cfg(root), 0)

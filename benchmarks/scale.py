"""ImageNet-scale bookkeeping, one measurement per function, side by side in one run.

    .venv/bin/python benchmarks/scale.py index --classes 100 --per-class 1300
    .venv/bin/python benchmarks/scale.py index --classes 1000 --per-class 1300   # the full 1.3M tree
    .venv/bin/python benchmarks/scale.py prefect --shards 200   # = benchmarks/prefect_overhead.py
    .venv/bin/python benchmarks/scale.py chunk --classes 1000 --per-class 1300   # a chunk process's start-up

``index``: a ``train/<class>/*.JPEG`` tree of hard links to one small JPEG, in a temporary folder.
"before" is the listing every process paid until the data index (``iterdir`` per class folder, a
header probe per file, then the data identity's ``stat`` per record; twice per process, once more
in every chunk process); "after" is the run's first step (one ``os.scandir`` walk, the dataset from
the listing without a header read, the Parquet index written) and a later process (chunk,
rerun's stages) reading that index.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def build_tree(root: Path, classes: int, per_class: int) -> Path:
    """``root/train/n{i:08d}/{j}.JPEG``: hard links to a 32x32 JPEG (no disk space per file; one
    original per class, as a file system bounds the links to one file, e.g. ext4 at 65,000)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 60, 30)).save(buf, format="JPEG")
    (root / "originals").mkdir(parents=True, exist_ok=True)
    for i in range(classes):
        d = root / "train" / f"n{i:08d}"
        d.mkdir(parents=True, exist_ok=True)
        original = root / "originals" / f"{i}.JPEG"
        original.write_bytes(buf.getvalue())
        for j in range(per_class):
            os.link(original, d / f"{j:06d}.JPEG")
    return root


def old_listing(root: Path, per_class: int) -> int:
    """The listing as it was: iterdir and sort per class, the header of each kept file probed, then
    the data identity's ``getsize`` per record. Returns the records."""
    from ood_core.data import IMAGE_EXTENSIONS, ImageDecodeError, probe_image

    train = root / "train"
    folders = sorted(p.name for p in train.iterdir() if p.is_dir())
    kept = []
    for f in folders:
        names = sorted((p for p in (train / f).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS),
                       key=lambda p: p.as_posix())  # fmt: skip
        usable = []
        for p in names:
            if len(usable) >= per_class:
                break
            try:
                probe_image(p, 64_000_000, 8)
            except ImageDecodeError:
                continue
            usable.append(p)
        kept += usable
    for p in kept:  # identity.py's per-record stat
        os.path.getsize(p)
    return len(kept)


def measure_index(classes: int, per_class: int, workdir: str | None = None) -> dict:
    """Index build: the old listing vs the run's first step and a later process's index read."""
    import pyarrow as pa

    from ood_core import dataset_index
    from ood_core.config import DataConfig
    from ood_core.data import load_id_dataset
    from ood_core.dataset_index import DATA_KEY, adopt, ensure_index
    from ood_core.storage import StageStore  # noqa: F401 - imports (pyarrow, fsspec) outside the timings

    pa.array([0])  # pyarrow's first array from Python imports pandas: a process's start-up, not the index

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        t_build, root = timed(lambda: build_tree(Path(tmp) / "data", classes, per_class))
        data = DataConfig(id_source="imagefolder", root=str(root), images_per_class=per_class, ood_sets=[])
        out = str(Path(tmp) / "run")
        t_old, n_old = timed(lambda: old_listing(root, per_class))

        def first_step():
            dataset_index.forget()
            identity = ensure_index(data, 0, out)
            return identity, load_id_dataset(data, 0, probe="used")

        t_first, (identity, ds) = timed(first_step)

        def later_step():
            dataset_index.forget()
            adopt(data, 0, out, identity)
            return load_id_dataset(data, 0, probe="used")

        t_later, ds2 = timed(later_step)
        assert ds2.records == ds.records and len(ds.records) == n_old
        fs, path = dataset_index.index_path(out, identity)
        return {
            "files": classes * per_class, "tree_build_s": round(t_build, 2),
            "old_listing_s": round(t_old, 2), "old_per_process_s": round(2 * t_old, 2),
            "index_first_step_s": round(t_first, 2), "index_later_step_s": round(t_later, 2),
            "index_bytes": fs.size(path), "records": len(ds.records), DATA_KEY: identity,
        }  # fmt: skip


CHUNK_STARTUP = """
import sys, time
from ood_core.config import DataConfig
from ood_core.data import load_id_dataset
from ood_core.dataset_index import adopt
data = DataConfig(id_source="imagefolder", root=sys.argv[1], images_per_class=int(sys.argv[2]), ood_sets=[])
adopt(data, 0, sys.argv[3], sys.argv[4])
ds = load_id_dataset(data, 0, probe="used")
print(len(ds.records))
"""


def measure_chunk_startup(classes: int, per_class: int, workdir: str | None = None) -> dict:
    """A chunk process's start-up before its first shard: a new interpreter, the pipeline's imports,
    the stored index read and the dataset built from it (what every chunk of a fan-out pays; its
    models' loading is the shard work's own)."""
    import subprocess

    from ood_core import dataset_index
    from ood_core.config import DataConfig
    from ood_core.dataset_index import ensure_index

    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        root = build_tree(Path(tmp) / "data", classes, per_class)
        data = DataConfig(id_source="imagefolder", root=str(root), images_per_class=per_class, ood_sets=[])
        out = str(Path(tmp) / "run")
        dataset_index.forget()
        identity = ensure_index(data, 0, out)
        cmd = [sys.executable, "-c", CHUNK_STARTUP, str(root), str(per_class), out, identity]
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        t, proc = timed(lambda: subprocess.run(cmd, capture_output=True, text=True, env=env, check=True))
        bare, _ = timed(lambda: subprocess.run([sys.executable, "-c", "import ood_core.pipeline"], env=env, check=True))
        assert int(proc.stdout.split()[-1]) == classes * per_class, proc.stdout
        return {"files": classes * per_class, "chunk_startup_s": round(t, 2), "imports_only_s": round(bare, 2)}


def measure_prefect(shards: int, workdir: str | None = None) -> dict:
    """Prefect's per-shard overhead next to the plain loop (``benchmarks/prefect_overhead.py``)."""
    from benchmarks import prefect_overhead  # sets Prefect's temporary home before Prefect is imported

    return prefect_overhead.measure(shards, workdir)


MEASUREMENTS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "index": lambda a: measure_index(a.classes, a.per_class, a.workdir),
    "prefect": lambda a: measure_prefect(a.shards, a.workdir),
    "chunk": lambda a: measure_chunk_startup(a.classes, a.per_class, a.workdir),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("parts", nargs="*", default=list(MEASUREMENTS), choices=list(MEASUREMENTS))
    ap.add_argument("--classes", type=int, default=100)
    ap.add_argument("--per-class", type=int, default=1300)
    ap.add_argument("--shards", type=int, default=200, help="prefect: shards of the trivial stage")
    ap.add_argument("--workdir", default=None, help="where the temporary tree goes (default: the system's)")
    args = ap.parse_args(argv)
    for part in args.parts:
        result = MEASUREMENTS[part](args)
        print(f"{part}: " + ", ".join(f"{k}={v}" for k, v in result.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The dataset index: one listing of the data per run, stored once per data identity.

Every file tree a run reads (the ID ``train/`` and ``val/`` folders of ``data.root``, each folder
OOD set) is listed by :func:`scan`: directory listings only (``os.scandir`` locally, one paginated
``find`` on fsspec URLs such as ``s3://``), names, sizes and modification times, never a file's
header. The listing's hash is the data's identity (see :mod:`ood_core.identity`); the run's first
step stores the listing as ``<run root>/index/<identity>.parquet`` and every later stage, chunk
process and rerun of the same data reads that file instead of listing again. Headers are probed
only where a file is used (:mod:`ood_core.data`), against the size and time recorded here, so a
file replaced after the listing is a bad input where it is read, never a wrong image under an old key.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ood_core.config import DataConfig

log = logging.getLogger("synth_ood.data")

# the run's keys carry the data identity under this name, so every later process reads the index
DATA_KEY = "_data"
INDEX_FOLDER = "index"
# a kind per entry: a regular file (or a link to one), a folder, or something else (a dangling
# link, a loop, a socket); only the probe at use says what is wrong with the last
FILE, DIR, OTHER = "f", "d", "o"


@dataclass(frozen=True)
class Entry:
    """One listed name below a tree's root: relative posix path, kind, size (-1 unknown), mtime."""

    path: str
    kind: str
    size: int
    mtime: float


@dataclass
class DataIndex:
    """Listings of the run's file trees (``{tree: [Entry]}``, sorted by path), named by ``identity``."""

    trees: dict[str, list[Entry]] = field(default_factory=dict)
    identity: str = ""

    def entries(self, tree: str) -> list[Entry]:
        return self.trees.get(tree, [])


def is_url(root: str) -> bool:
    return "://" in root


def _scan_local(root: str) -> list[Entry]:
    out: list[Entry] = []
    seen: set[tuple[int, int]] = set()

    def walk(folder: str, rel: str) -> None:
        try:
            st = os.stat(folder)
        except OSError:
            return
        if (st.st_dev, st.st_ino) in seen:  # a folder symlinked into itself is listed once
            return
        seen.add((st.st_dev, st.st_ino))
        with os.scandir(folder) as it:
            children = sorted(it, key=lambda e: e.name)
        for e in children:
            path = f"{rel}{e.name}"
            try:
                s = e.stat()  # follows a link: its target's size; the entry's own d_type costs nothing
            except OSError:
                out.append(Entry(path, OTHER, -1, -1.0))
                continue
            if stat.S_ISDIR(s.st_mode):
                out.append(Entry(path, DIR, -1, s.st_mtime))
                walk(e.path, f"{path}/")
            else:
                out.append(Entry(path, FILE if stat.S_ISREG(s.st_mode) else OTHER, s.st_size, s.st_mtime))

    walk(root, "")
    out.sort(key=lambda e: e.path)  # by whole path, as the names were always ordered
    return out


def _scan_url(root: str) -> list[Entry]:
    import fsspec

    from ood_core.storage import _info_time

    fs, base = fsspec.core.url_to_fs(root.rstrip("/"))
    base = base.rstrip("/")
    found = fs.find(base, withdirs=True, detail=True)  # paginated listings, no request per file
    out = []
    for path, info in found.items():
        rel = path[len(base):].lstrip("/")
        if not rel:
            continue
        if info.get("type") == "directory":
            out.append(Entry(rel, DIR, -1, -1.0))
        else:
            out.append(Entry(rel, FILE, int(info.get("size") or 0), float(_info_time(info) or -1.0)))
    return sorted(out, key=lambda e: e.path)


def scan(root: str) -> list[Entry]:
    """Every name below ``root`` (recursively, sorted by path) from directory listings only."""
    if is_url(root):
        return _scan_url(root)
    return _scan_local(root) if os.path.isdir(root) else []


def trees_of(data: DataConfig) -> dict[str, str]:
    """``{tree name: root}`` of every file tree the run reads (none for bundled or rendered data)."""
    from ood_core.data import OOD_SETS, _resolve_folder

    trees: dict[str, str] = {}
    if data.id_source == "imagefolder" and data.root:
        root = str(Path(data.root).expanduser()) if not is_url(data.root) else data.root.rstrip("/")
        trees["train"], trees["val"] = f"{root}/train", f"{root}/val"
        if not is_url(root) and os.path.isfile(f"{root}/meta/train.txt"):
            # Food-101's release: images/<class>/* split by meta/{train,test}.txt (their sizes in the identity)
            trees["images"], trees["meta"] = f"{root}/images", f"{root}/meta"
    for name in data.ood_sets:
        if name in OOD_SETS:
            continue
        folder = _resolve_folder(name, data)
        if folder is not None:
            trees[f"ood:{name}"] = str(folder)
    return trees


def tree_digest(entries: list[Entry]) -> str:
    """Hash of a listing: paths, kinds and sizes (not times: a copy of the same data is the same data)."""
    h = hashlib.sha256()
    for e in entries:
        h.update(f"{e.path}\0{e.kind}\0{e.size}\n".encode())
    return h.hexdigest()


# ------------------------------------------------------------ this process's listings
# ``{tree root: entries}``: each tree is listed at most once per process (and once per run: later
# processes adopt the stored index); ``forget`` starts a new run's listing
_LISTED: dict[str, list[Entry]] = {}


def forget() -> None:
    """Drop this process's listings: the next run lists its data anew (it may have changed)."""
    from ood_core import identity

    _LISTED.clear()
    identity.forget()


def listing(root: str) -> list[Entry]:
    """The entries below ``root``: this process's listing (or the adopted index's), else listed now."""
    if root not in _LISTED:
        _LISTED[root] = scan(root)
    return _LISTED[root]


def current(data: DataConfig) -> DataIndex:
    """The listings of ``data``'s trees (see :func:`listing`)."""
    return DataIndex(trees={name: listing(root) for name, root in trees_of(data).items()})


# ------------------------------------------------------------ the stored index
def index_path(run_root: str, identity: str) -> tuple[object, str]:
    """``(fs, path)`` of ``<run root>/index/<identity>.parquet``."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(run_root.rstrip("/"))
    return fs, f"{base.rstrip('/')}/{INDEX_FOLDER}/{identity}.parquet"


def _table(index: DataIndex):
    import pyarrow as pa

    cols: dict[str, list] = {"tree": [], "path": [], "kind": [], "size": [], "mtime": []}
    for tree, entries in sorted(index.trees.items()):
        for e in entries:
            cols["tree"].append(tree)
            cols["path"].append(e.path)
            cols["kind"].append(e.kind)
            cols["size"].append(e.size)
            cols["mtime"].append(e.mtime)
    schema = pa.schema([("tree", pa.string()), ("path", pa.string()), ("kind", pa.string()),
                        ("size", pa.int64()), ("mtime", pa.float64())])
    # from arrays, not pa.table(dict): that path imports pandas (seconds in every writer)
    return pa.Table.from_arrays([pa.array(cols[f.name], f.type) for f in schema], schema=schema)


def write_index(run_root: str, index: DataIndex) -> None:
    """Store ``index`` atomically (a temporary sibling renamed into place, one PUT on object storage)."""
    from ood_core.storage import StageStore, parquet_bytes

    store = StageStore(run_root, INDEX_FOLDER, index.identity)
    store.write_bytes(store.base + ".parquet", parquet_bytes(_table(index)))


def read_index(run_root: str, identity: str) -> DataIndex | None:
    """The stored index ``identity``; None when there is none, or it is truncated or unreadable (logged)."""
    import pyarrow.parquet as pq

    fs, path = index_path(run_root, identity)
    if not fs.exists(path):
        return None
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        cols = table.to_pydict()
        trees: dict[str, list[Entry]] = {}
        for tree, p, kind, size, mtime in zip(cols["tree"], cols["path"], cols["kind"], cols["size"], cols["mtime"],
                                              strict=True):
            trees.setdefault(tree, []).append(Entry(p, kind, size, mtime))
    except Exception as err:  # noqa: BLE001 - a damaged index of any kind is listed again, never trusted
        log.warning("data index %s is truncated or unreadable (%s: %s): listing the data again to rebuild it",
                    path, type(err).__name__, err)
        return None
    return DataIndex(trees=trees, identity=identity)


def ensure_index(data: DataConfig, seed: int, run_root: str, log_fn: Callable[[str], None] | None = None) -> str:
    """The run's first step: the data's identity, its index stored under ``run_root`` (written if absent
    or damaged, never rewritten when intact); returns the identity."""
    from ood_core.identity import data_identity

    identity = data_identity(data, seed)
    stored = read_index(run_root, identity)
    if stored is None:
        write_index(run_root, DataIndex(trees=current(data).trees, identity=identity))
        if log_fn:
            log_fn(f"data index {identity}: {sum(len(v) for v in current(data).trees.values())} entries listed "
                   f"-> {index_path(run_root, identity)[1]}")
    return identity


def adopt(data: DataConfig, seed: int, run_root: str, identity: str) -> None:
    """A later step of a run: use the index ``identity`` its first step stored, without listing.

    A missing or damaged index file is rebuilt from a new listing (logged); if the data changed since
    the run's first step (another identity), that is an error naming both.
    """
    from ood_core import identity as ident

    trees = trees_of(data)
    if ident.remembered(data, seed) == identity and all(r in _LISTED for r in trees.values()):
        return
    stored = read_index(run_root, identity)
    if stored is None:
        for root in trees.values():
            _LISTED.pop(root, None)
        ident.forget()
        found = ident.data_identity(data, seed)
        if found != identity:
            from ood_core.data import DataError

            raise DataError(
                f"the data changed since this run's first step: its index {identity} is gone from "
                f"{index_path(run_root, identity)[1]} and the data now lists as {found}; run again"
            )
        write_index(run_root, DataIndex(trees=current(data).trees, identity=identity))
        return
    for name, root in trees.items():
        _LISTED[root] = stored.entries(name)
    ident.remember(data, seed, identity)

"""Content-addressed stage folders of WebDataset shards and Parquet manifests.

``<root>/<stage>/<key>/``
    ``shards/NNNNNN.tar``          WebDataset shard (members ``<key>.<ext>``, keys without dots)
    ``manifests/NNNNNN.parquet``   one row per candidate, failures included
    ``stats/NNNNNN.json``          written last: the shard's completion marker with sha256s
    ``timings/NNNNNN.json``        the shard's wall-clock figures, outside its content (see below)
    ``artifacts/...``              stage-level outputs (trained weights, metrics, plots)
    ``_SUCCESS.json``              written last for the stage

Every file is written under a temporary name and renamed into place, so a killed process never
leaves a visible partial file; on object storage a single PUT (or a multipart upload completed at
close) is already all-or-nothing, so objects are written straight to their final name. Paths go
through fsspec: ``s3://`` or ``gs://`` roots work too.

Reuse is cheap: a finished shard is trusted by its marker plus the sizes recorded in it and the
rule that no file was modified after its marker (one folder listing per stage, not one read per
shard). Re-hashing every byte is left to ``synth-ood verify``.

A shard's content (tar, manifest, marker) holds no wall-clock value, so a shard recomputed from
scratch is byte-identical to the one it replaces and two workers racing on it write equal bytes.
Timings go to ``timings/``: written before the marker, never hashed or verified, and read as
``{}`` when missing or damaged (a timing is a report, not data).
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import tarfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import ManifestSchema

SUCCESS = "_SUCCESS.json"
TMP_PREFIX = ".tmp-"


class DamagedFileError(ValueError):
    """A JSON record of a run (marker, plan, run record) that does not parse: a kill or a full disk."""
# Rows with these statuses are not training data: their samples go to ``rejected/NNNNNN.tar``
# (kept for the report, with records that have no manifest row such as MLLM transcripts), so
# ``shards/`` holds only what a consumer should use.
REJECTED_STATUSES = frozenset({"rejected", "failed"})

# stores where one PUT is atomic and a rename is a copy plus a delete
OBJECT_STORE_PROTOCOLS = {"s3", "s3a", "gs", "gcs", "abfs", "az", "memory"}


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stage_key(stage: str, schema_version: int, config: dict, upstream: dict[str, str]) -> str:
    """Hash of what determines a stage's output: same inputs, same folder (a world model id counts
    with its build's digest: rebuilt weights give new folders)."""
    from ood_core.identity import pin_model_ids

    payload = canonical_json(
        {"stage": stage, "schema": schema_version, "config": pin_model_ids(config), "upstream": upstream}
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Sample:
    """One WebDataset sample: ``files`` maps an extension (``png``, ``json``, ``npy``) to bytes."""

    key: str
    files: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.key or "." in self.key or "/" in self.key:
            raise ValueError(f"sample key {self.key!r} must be non-empty with no '.' or '/'")


def features_npz(keys: list[str], feats: np.ndarray) -> bytes:
    """A deterministic npz (fixed zip times) of ``keys`` and their ``(n, d)`` float32 features."""
    buf = io.BytesIO()
    feats = np.asarray(feats, dtype=np.float32)
    arrays = {"keys": np.asarray(keys, dtype=str), "feats": feats if feats.ndim == 2 else feats.reshape(len(keys), -1)}
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            member = io.BytesIO()
            np.save(member, arr, allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), member.getvalue())
    return buf.getvalue()


def tar_bytes(samples: list[Sample]) -> bytes:
    """A deterministic tar (fixed mtime/owner) so that equal content hashes equal."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for s in samples:
            for ext in sorted(s.files):
                data = s.files[ext]
                info = tarfile.TarInfo(f"{s.key}.{ext}")
                info.size = len(data)
                info.mtime = 0
                info.mode = 0o644
                info.uname = info.gname = ""
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


# folder (stats, shards, manifests, features) -> file name -> the listing's info
ShardListing = dict[str, dict[str, dict]]


class StageStore:
    """The folder of one stage run, ``<root>/<stage>/<key>``."""

    def __init__(self, root: str, stage: str, key: str):
        self.root = root.rstrip("/")
        self.stage = stage
        self.key = key
        self.fs, base = fsspec.core.url_to_fs(self.root)
        self.base = f"{base.rstrip('/')}/{stage}/{key}"

    # ------------------------------------------------------------ paths
    def url(self) -> str:
        return f"{self.root}/{self.stage}/{self.key}"

    def path(self, *parts: str) -> str:
        return "/".join([self.base, *parts])

    def shard_paths(self, index: int) -> dict[str, str]:
        n = f"{index:06d}"
        return {
            "tar": self.path("shards", f"{n}.tar"),
            "parquet": self.path("manifests", f"{n}.parquet"),
            "stats": self.path("stats", f"{n}.json"),
        }

    def timing_path(self, index: int) -> str:
        """``timings/NNNNNN.json``: the shard's wall-clock figures (not part of its content)."""
        return self.path("timings", f"{index:06d}.json")

    def features_path(self, index: int) -> str:
        """``features/NNNNNN.npz``: the shard's feature array (keys + one (n, d) array), readable
        without its images (written only by stages that give one, e.g. elaborate's embeddings)."""
        return self.path("features", f"{index:06d}.npz")

    def read_features(self, index: int) -> tuple[list[str], np.ndarray] | None:
        """``(keys, features)`` of one shard's feature file; None for a shard written without one
        (its marker names none). A file its marker names but that is missing raises."""
        if "features_sha256" not in self.shard_stats(index):
            return None
        with np.load(io.BytesIO(self.read_bytes(self.features_path(index))), allow_pickle=False) as z:
            return [str(k) for k in z["keys"]], z["feats"]

    def rejected_path(self, index: int) -> str:
        """``rejected/NNNNNN.tar``: the shard's set-aside samples (written only when there are any)."""
        return self.path("rejected", f"{index:06d}.tar")

    # ------------------------------------------------------------ atomic io
    def on_object_store(self) -> bool:
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        return bool(OBJECT_STORE_PROTOCOLS & set(protocols))

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write atomically: one PUT on object storage, else a temporary sibling renamed into place."""
        if self.on_object_store():
            # a killed writer leaves no object (an unfinished multipart upload is invisible), and
            # no temporary object to clean up; a rename would be a copy plus a delete
            self.fs.pipe_file(path, data)
            return
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}-{path.rsplit('/', 1)[1]}"
        try:
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
        except OSError as err:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)  # never leave a partial temporary behind
            if err.errno == errno.ENOSPC:
                raise OSError(errno.ENOSPC, f"no space left on the device writing {path} ({len(data)} bytes): "
                              f"free space under {self.root} and rerun; finished shards are kept") from None
            raise
        self.fs.mv(tmp, path)

    def sweep_temporaries(self, older_than_s: float = 3600.0) -> list[str]:
        """Delete ``.tmp-*`` files a killed writer left in this stage folder; the paths removed.

        Only those older than ``older_than_s``: another worker may be writing one right now.
        """
        if self.on_object_store() or not self.exists(self.base):
            return []
        now = time.time()
        gone = []
        for path, info in self.fs.find(self.base, detail=True).items():
            t = _info_time(info)
            if path.rsplit("/", 1)[-1].startswith(TMP_PREFIX) and t is not None and now - t > older_than_s:
                self.fs.rm(path)
                gone.append(path)
        return gone

    def read_bytes(self, path: str) -> bytes:
        # one GET on object storage: opening a file there costs a HEAD first
        return self.fs.cat_file(path)

    def _read_small(self, path: str) -> bytes:
        """A small file (a marker, a plan) in one request on object storage."""
        if getattr(self.fs, "max_concurrency", 1) > 1:
            # s3fs reads a whole object in concurrent ranges after a HEAD for its size: not for a small one
            return self.fs.cat_file(path, max_concurrency=1)
        return self.read_bytes(path)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, path: str) -> Any:
        """The parsed file; :class:`DamagedFileError` naming it if it is truncated or not JSON."""
        data = self._read_small(path)
        try:
            return json.loads(data)
        except ValueError as err:
            raise DamagedFileError(
                f"{path}: unreadable ({len(data)} bytes, {err}); a kill or a full disk leaves such a file. "
                "A rerun rebuilds it (`synth-ood run` with the same settings), or delete it by hand"
            ) from None

    # ------------------------------------------------------------ shards
    def write_shard(
        self, index: int, samples: list[Sample], rows: list[dict], schema: ManifestSchema, seconds: float,
        extra: dict | None = None, timings: dict | None = None, features: bytes | None = None,
    ) -> dict:
        """Write tar, then manifest, then the timings, then the stats marker (last: it means 'done').

        ``extra`` goes into the marker and must not depend on the clock; ``seconds`` and ``timings``
        go to :meth:`timing_path` only; ``features`` (an npz, :func:`features_npz`) to
        :meth:`features_path`, hashed in the marker. Returns the marker merged with the timings.
        """
        paths = self.shard_paths(index)
        for row in rows:
            row["shard"] = index
        kept, rejected = split_by_status(samples, rows)
        tar = tar_bytes(kept)
        table = schema.table(rows)
        pqb = parquet_bytes(table)
        self.write_bytes(paths["tar"], tar)
        stats = {
            "shard": index,
            "samples": len(kept),
            "rows": len(rows),
            "counts": count_by_status(rows),
            "tar_sha256": sha256_bytes(tar),
            "parquet_sha256": sha256_bytes(pqb),
            "tar_size": len(tar),
            "parquet_size": len(pqb),
            "schema_version": schema.version,
            **(extra or {}),
        }
        if rejected:
            rtar = tar_bytes(rejected)
            self.write_bytes(self.rejected_path(index), rtar)
            stats.update(rejected_samples=len(rejected), rejected_sha256=sha256_bytes(rtar))
        if features is not None:
            self.write_bytes(self.features_path(index), features)
            stats.update(features_sha256=sha256_bytes(features), features_size=len(features))
        self.write_bytes(paths["parquet"], pqb)
        timing = {"seconds": round(seconds, 3), **(timings or {})}
        self.write_json(self.timing_path(index), timing)
        self.write_json(paths["stats"], stats)
        return {**stats, **timing}

    def shard_done(self, index: int, listing: ShardListing | None = None) -> bool:
        """The shard's marker exists (in ``listing`` when given: no request)."""
        if listing is not None:
            return f"{index:06d}.json" in listing["stats"]
        path = self.shard_paths(index)["stats"]
        if self.on_object_store():
            # one request: an existence check of a missing object is a HEAD and a LIST on s3fs
            try:
                self._read_small(path)
            except FileNotFoundError:
                return False
            return True
        return self.exists(path)

    def shard_listing(self) -> ShardListing:
        """The markers and shard files of the stage, one listing per folder (one request per 1,000
        objects on S3): with it a finished shard's reuse check reads its marker and nothing else."""
        return {folder: self._listing(folder) for folder in ("stats", "shards", "manifests", "features")}

    def shard_stats(self, index: int) -> dict:
        return self.read_json(self.shard_paths(index)["stats"])

    def shard_timing(self, index: int) -> dict:
        """The shard's wall-clock figures; ``{}`` when missing or unreadable (they are no content)."""
        try:
            timing = self.read_json(self.timing_path(index))
        except (OSError, ValueError):
            return {}
        return timing if isinstance(timing, dict) else {}

    def shard_indices(self) -> list[int]:
        """Indices of shards whose completion marker exists."""
        d = self.path("stats")
        if not self.exists(d):
            return []
        names = [p.rsplit("/", 1)[1] for p in self.fs.ls(d, detail=False)]
        return sorted(int(n.split(".")[0]) for n in names if n.endswith(".json") and n[0].isdigit())

    def read_manifest(self, index: int | None = None) -> pa.Table:
        """One shard's manifest, or all shards' concatenated in shard order."""
        indices = [index] if index is not None else self.shard_indices()
        tables = [pq.read_table(io.BytesIO(self.read_bytes(self.shard_paths(i)["parquet"]))) for i in indices]
        if not tables:
            raise FileNotFoundError(f"no finished shards in {self.url()}")
        return pa.concat_tables(tables)

    def iter_samples(
        self, index: int | None = None, rejected: bool = True
    ) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Yield ``(key, {ext: bytes})`` from one shard or all finished shards, in order: each shard's
        published samples, then (``rejected=True``) its rejected ones."""
        for i in [index] if index is not None else self.shard_indices():
            paths = self.shard_paths(i)
            tars = [paths["tar"]]
            if rejected and self.exists(self.rejected_path(i)):
                tars.append(self.rejected_path(i))
            for tar in tars:
                yield from self._iter_tar(tar)

    def _iter_tar(self, path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
        data = self.read_bytes(path)
        current: tuple[str, dict[str, bytes]] | None = None
        with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tf:
            for member in tf:
                key, ext = member.name.split(".", 1)
                blob = tf.extractfile(member).read()
                if current and current[0] == key:
                    current[1][ext] = blob
                else:
                    if current:
                        yield current
                    current = (key, {ext: blob})
        if current:
            yield current

    def load_samples(
        self, keys: set[str] | None = None, shards: set[int] | None = None
    ) -> dict[str, dict[str, bytes]]:
        """Samples by key; naming the ``shards`` they are in avoids reading every tar of the stage."""
        indices = sorted(shards) if shards is not None else self.shard_indices()
        return {k: f for i in indices for k, f in self.iter_samples(i) if keys is None or k in keys}

    # ------------------------------------------------------------ stage
    def success_path(self) -> str:
        return self.path(SUCCESS)

    def is_complete(self) -> bool:
        """``_SUCCESS.json`` exists (whether it parses, ``verify`` checks: reuse goes through it)."""
        return self.exists(self.success_path())

    def read_success(self) -> dict:
        return self.read_json(self.success_path())

    def write_success(self, info: dict) -> None:
        self.write_json(self.success_path(), info)

    def clear(self) -> None:
        """Delete the stage folder, ``_SUCCESS.json`` first: a kill mid-delete leaves no marker over
        missing files, so the next run recomputes instead of trusting a half-deleted folder."""
        if self.is_complete():
            self.fs.rm(self.success_path())
        if self.exists(self.base):
            self.fs.rm(self.base, recursive=True)

    # ------------------------------------------------------------ artifacts
    def artifact_files(self, hashed: bool = True) -> dict[str, dict]:
        """``relative path -> {size[, sha256]}`` of every file under ``artifacts/`` (one listing)."""
        base = self.path("artifacts")
        try:
            found = self.fs.find(base, detail=True)
        except FileNotFoundError:
            return {}
        out = {}
        for name, info in sorted(found.items()):
            rel = name[len(base) + 1:]
            if info.get("type") == "directory" or rel.rsplit("/", 1)[-1].startswith(TMP_PREFIX):
                continue
            out[rel] = {"size": info.get("size")}
            if hashed:
                out[rel]["sha256"] = sha256_bytes(self.read_bytes(name))
        return out

    def artifact_problems(self, recorded: dict | None, deep: bool = True) -> list[str]:
        """Artifacts missing, resized or (``deep``) rehashed against ``_SUCCESS.json``'s record."""
        if not recorded:
            return []  # a record from before artifacts were recorded, or a stage that writes none
        found = self.artifact_files(hashed=deep)
        problems = []
        for rel, want in sorted(recorded.items()):
            label = f"{self.url()}/artifacts/{rel}"
            got = found.get(rel)
            if got is None:
                problems.append(f"{label}: missing")
            elif got["size"] != want["size"]:
                problems.append(f"{label}: {got['size']} bytes, {SUCCESS} says {want['size']} (truncated or rewritten)")
            elif deep and got["sha256"] != want["sha256"]:
                problems.append(f"{label}: sha256 differs from {SUCCESS} (corrupted or rewritten)")
        return problems

    def _listing(self, folder: str) -> dict[str, dict]:
        """``name -> info`` of one folder in one listing (one request per 1,000 objects on S3)."""
        d = self.path(folder)
        try:
            infos = self.fs.ls(d, detail=True, refresh=True)  # never a cached listing: others write too
        except FileNotFoundError:
            return {}
        return {info["name"].rstrip("/").rsplit("/", 1)[1]: info for info in infos}

    def _file_info(self, path: str) -> dict | None:
        try:
            return self.fs.info(path)
        except FileNotFoundError:
            return None

    def _cheap_problems(self, index: int, stats: dict, marker: dict | None, files: dict[str, dict | None]) -> list[str]:
        """Trust a finished shard by its marker: files present, sizes as recorded, none newer than the marker."""
        problems = []
        marker_time = _info_time(marker) if marker else None
        for kind, info in files.items():
            folder, ext = {"tar": ("shards", "tar"), "features": ("features", "npz")}.get(kind, ("manifests", kind))
            label = f"{self.url()}/{folder}/{index:06d}.{ext}"
            if info is None:
                problems.append(f"{label}: missing")
            elif f"{kind}_size" in stats and info.get("size") != stats[f"{kind}_size"]:
                problems.append(f"{label}: {info.get('size')} bytes, stats/{index:06d}.json says {stats[f'{kind}_size']}")
            elif marker_time is not None and (t := _info_time(info)) is not None and t > marker_time:
                problems.append(f"{label}: modified after stats/{index:06d}.json (rewritten or corrupted)")
        return problems

    def shard_problems(self, index: int, deep: bool = True, listing: ShardListing | None = None) -> list[str]:
        """Problems of one finished shard: missing files, sha256 mismatch, row/sample counts.

        ``deep=False`` is the cheap check a rerun uses (sizes and modification times, no reads but
        the marker's); with the stage's ``listing`` (:meth:`shard_listing`) that read is its only request.
        """
        return self.check_shard(index, deep, listing)[1]

    def check_shard(
        self, index: int, deep: bool = True, listing: ShardListing | None = None
    ) -> tuple[dict | None, list[str]]:
        """``(marker, problems)`` of :meth:`shard_problems`; the marker is None when it is missing or
        unreadable (so a reused shard's marker is read once)."""
        paths = {**self.shard_paths(index), "rejected": self.rejected_path(index),
                 "features": self.features_path(index)}
        stem = f"{index:06d}"
        if not deep and listing is not None and f"{stem}.json" not in listing["stats"]:
            return None, [f"{self.url()}/stats/{stem}.json: missing"]
        try:
            stats = self.shard_stats(index)
        except (OSError, ValueError) as err:
            return None, [f"{self.url()}/stats/{stem}.json: unreadable ({err})"]
        if not deep and "tar_size" in stats:  # markers written before sizes were recorded get the deep check
            kinds = ("tar", "parquet", "features") if "features_size" in stats else ("tar", "parquet")
            if listing is None:
                files = {kind: self._file_info(paths[kind]) for kind in kinds}
                return stats, self._cheap_problems(index, stats, self._file_info(paths["stats"]), files)
            folders = {"tar": ("shards", "tar"), "parquet": ("manifests", "parquet"), "features": ("features", "npz")}
            files = {kind: listing[folders[kind][0]].get(f"{stem}.{folders[kind][1]}") for kind in kinds}
            return stats, self._cheap_problems(index, stats, listing["stats"][f"{stem}.json"], files)
        problems: list[str] = []
        kinds = ("tar", "parquet", *(k for k in ("rejected", "features") if f"{k}_sha256" in stats))
        for kind in kinds:
            folder, name = paths[kind].rsplit("/", 2)[-2:]
            label = f"{self.url()}/{folder}/{name}"
            if not self.exists(paths[kind]):
                problems.append(f"{label}: missing")
                continue
            data = self.read_bytes(paths[kind])
            if sha256_bytes(data) != stats[f"{kind}_sha256"]:
                problems.append(f"{label}: sha256 differs from stats/{index:06d}.json (corrupted or rewritten)")
            elif kind == "parquet" and (n := pq.read_metadata(io.BytesIO(data)).num_rows) != stats["rows"]:
                problems.append(f"{label}: {n} rows, stats say {stats['rows']}")
            elif kind in ("tar", "rejected"):
                expected = stats["samples"] if kind == "tar" else stats["rejected_samples"]
                try:
                    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tf:
                        n = len({m.name.split(".", 1)[0] for m in tf})
                except tarfile.TarError as err:
                    problems.append(f"{label}: unreadable ({err})")
                else:
                    if n != expected:
                        problems.append(f"{label}: {n} samples, stats say {expected}")
        return stats, problems

    def shard_valid(self, index: int, listing: ShardListing | None = None) -> bool:
        """Finished and (by the cheap check) intact: the only kind of shard a rerun may reuse."""
        # no separate existence check: a missing marker is an unreadable one
        return not self.shard_problems(index, deep=False, listing=listing)

    def invalidate_shard(self, index: int) -> None:
        """Drop a shard's marker (and the stage's, which no longer holds) so the shard reruns."""
        for path in (self.shard_paths(index)["stats"], self.success_path()):
            if self.exists(path):
                self.fs.rm(path)

    def verify(self, deep: bool = True) -> list[str]:
        """Problems found, empty if consistent: missing files, hash mismatches, row counts."""
        problems: list[str] = []
        sizes = None
        expected = None
        if not self.is_complete():
            problems.append(f"{self.url()}: missing {SUCCESS}")
        else:
            try:
                success = self.read_success()
            except DamagedFileError as err:
                problems.append(str(err))  # not reusable: the rerun finalizes again
            else:
                expected, sizes = success.get("shards"), success.get("sizes")
                problems += self.artifact_problems(success.get("artifacts"), deep)
        if deep:
            done = self.shard_indices()
        else:
            markers = {n: i for n, i in self._listing("stats").items() if n.endswith(".json") and n[0].isdigit()}
            done = sorted(int(n.split(".")[0]) for n in markers)
        if expected is not None and done != list(range(expected)):
            missing = sorted(set(range(expected)) - set(done))
            problems.append(f"{self.url()}: shards without stats marker: {missing}")
        if deep:
            for i in done:
                problems += self.shard_problems(i, deep)
        else:
            problems += self._cheap_stage_problems(done, markers, sizes)
        return problems

    def _cheap_stage_problems(
        self, done: list[int], markers: dict[str, dict], sizes: list | None = None
    ) -> list[str]:
        """The cheap check of every finished shard: three listings, plus the sizes ``_SUCCESS.json``
        copied from the markers (else one batched read of the markers)."""
        tars, manifests = self._listing("shards"), self._listing("manifests")
        problems: list[str] = []
        if sizes is not None and done == list(range(len(sizes))) and all(a is not None for pair in sizes for a in pair):
            for i in done:
                stats = {"tar_size": sizes[i][0], "parquet_size": sizes[i][1]}
                marker = markers[f"{i:06d}.json"]
                if len(sizes[i]) > 2 and marker.get("size") != sizes[i][2]:
                    # a truncated or rewritten marker: the shard's deep check decides (and a rerun redoes it)
                    problems.append(f"{self.url()}/stats/{i:06d}.json: {marker.get('size')} bytes, "
                                    f"{SUCCESS} says {sizes[i][2]} (truncated or rewritten)")
                    continue
                files = {"tar": tars.get(f"{i:06d}.tar"), "parquet": manifests.get(f"{i:06d}.parquet")}
                problems += self._cheap_problems(i, stats, markers[f"{i:06d}.json"], files)
            return problems
        paths = [self.shard_paths(i)["stats"] for i in done]
        blobs = self.fs.cat(paths, on_error="return") if paths else {}  # concurrent on object storage
        for i, path in zip(done, paths, strict=True):
            blob = blobs.get(path) if isinstance(blobs, dict) else None
            try:
                if isinstance(blob, Exception) or blob is None:
                    raise OSError(blob)
                stats = json.loads(blob)
            except (OSError, ValueError) as err:
                problems.append(f"{self.url()}/stats/{i:06d}.json: unreadable ({err})")
                continue
            if "tar_size" not in stats:
                problems += self.shard_problems(i, deep=True)
                continue
            files = {"tar": tars.get(f"{i:06d}.tar"), "parquet": manifests.get(f"{i:06d}.parquet")}
            problems += self._cheap_problems(i, stats, markers[f"{i:06d}.json"], files)
        return problems

    def is_valid(self) -> bool:
        """Complete and every shard intact by the cheap check: the only kind of stage a rerun may reuse."""
        return self.is_complete() and not self.verify(deep=False)


def split_by_status(samples: list[Sample], rows: list[dict]) -> tuple[list[Sample], list[Sample]]:
    """(published, set aside) samples. Set aside: rejected or failed rows, and records that are no
    candidate at all (no manifest row, e.g. an MLLM transcript): the training shards stay uniform."""
    status = {r["key"]: r["status"] for r in rows}
    kept = [s for s in samples if s.key in status and status[s.key] not in REJECTED_STATUSES]
    return kept, [s for s in samples if s.key not in status or status[s.key] in REJECTED_STATUSES]


def count_by_status(rows: list[dict]) -> dict[str, dict[str, int]]:
    """``{status: {reason: n}}``."""
    out: dict[str, dict[str, int]] = {}
    for r in rows:
        by_reason = out.setdefault(r["status"], {})
        by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + 1
    return out


def count_by_kind(store: StageStore) -> dict[str, dict[str, dict[str, int]]]:
    """``{kind: {status: {reason: n}}}`` over the finished shards of a stage whose rows have a ``kind``."""
    out: dict[str, dict[str, dict[str, int]]] = {}
    for i in store.shard_indices():
        table = store.read_manifest(i)
        if "kind" not in table.column_names:
            return {}
        cols = table.select(["kind", "status", "reason"]).to_pydict()
        for kind, status, reason in zip(cols["kind"], cols["status"], cols["reason"], strict=True):
            by_reason = out.setdefault(kind or "-", {}).setdefault(status, {})
            by_reason[reason] = by_reason.get(reason, 0) + 1
    return out


def format_counts(counts: dict[str, dict[str, int]], sep: str = ", ") -> str:
    """``kept: 20 (ok 20), rejected: 3 (blank 1, near_duplicate 2)``."""
    return sep.join(
        f"{status}: {sum(r.values())} ({', '.join(f'{k} {v}' for k, v in sorted(r.items()))})"
        for status, r in sorted(counts.items())
    )


def merge_counts(parts: list[dict[str, dict[str, int]]]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for part in parts:
        for status, reasons in part.items():
            for reason, n in reasons.items():
                out.setdefault(status, {})[reason] = out.setdefault(status, {}).get(reason, 0) + n
    return out


def list_stage_runs(root: str, stage: str) -> list[StageStore]:
    """Every key folder under ``<root>/<stage>``, newest first."""
    fs, base = fsspec.core.url_to_fs(root.rstrip("/"))
    d = f"{base.rstrip('/')}/{stage}"
    if not fs.exists(d):
        return []
    stores = []
    for info in fs.ls(d, detail=True):
        if info["type"] == "directory":
            stores.append((info.get("mtime") or info.get("LastModified") or 0, info["name"].rsplit("/", 1)[1]))
    stores.sort(key=lambda t: (_as_time(t[0]), t[1]), reverse=True)
    return [StageStore(root, stage, k) for _, k in stores]


def _info_time(info: dict) -> float | None:
    """Modification time from an fsspec info dict (local ``mtime``, S3 ``LastModified``, memory ``created``)."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        if info.get(key) is not None:
            value = info[key]
            if isinstance(value, str):
                from datetime import datetime

                value = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return _as_time(value)
    return None


def _as_time(value: Any) -> float:
    return value.timestamp() if hasattr(value, "timestamp") else float(value)

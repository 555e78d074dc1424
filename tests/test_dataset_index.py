"""The data is listed once per run: the run's first step stores the index, later steps, chunk
processes and reruns read it; a file changed since is a bad input where it is read; a damaged
index is rebuilt."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from ood_core import dataset_index
from ood_core.config import load_config
from ood_core.data import ImageDecodeError, load_image
from ood_core.dataset_index import DATA_KEY, index_path, trees_of
from ood_core.pipeline import finalize_stage, make_context, plan_stage, resolve_keys, run_local
from ood_core.stages import STAGE_ORDER
from ood_core.storage import StageStore
from tests.test_keys import _dataset as _data
from tests.test_keys import _img

ROOT = Path(__file__).resolve().parents[1]


def _cfg(base: Path, models: Path):
    return load_config("tiny", {
        "models.cache_dir": str(models), "data.id_source": "imagefolder", "data.root": str(base / "id"),
        "data.ood_root": str(base / "ood"), "data.ood_sets": "[Noise]", "data.images_per_class": "6",
        # random pixels and a random tiny CLIP: keep every synthetic image so finetune has data
        "elaborate.max_id_confidence": "1.0", "elaborate.dedup_cosine": "1.0",
    })  # fmt: skip


@pytest.fixture
def listings(tmp_path, monkeypatch):
    """A file with one line (pid, tree root) per listing, in this process and in the chunk processes."""
    path = tmp_path / "listings.txt"
    path.touch()
    scan = dataset_index.scan

    def counted(root):
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {root}\n")
        return scan(root)

    monkeypatch.setattr(dataset_index, "scan", counted)
    dataset_index.forget()
    yield path
    dataset_index.forget()


# a chunk run of `synth-ood-shards` in a process of its own: the shards of its indices (a context
# per shard, as shard_task builds one), then with "finalize" the stage-level step (finalize_task)
CHUNK = """
import json, os, sys, time
from ood_core import dataset_index
scan = dataset_index.scan
def counted(root):
    with open(sys.argv[2], "a") as f:
        f.write(f"{os.getpid()} {root}\\n")
    return scan(root)
dataset_index.scan = counted
from ood_core.config import validate_config
from ood_core.pipeline import finalize_stage, make_context, run_shard
p = json.load(open(sys.argv[1]))
cfg = validate_config(p["cfg"])
for index in p["indices"]:
    run_shard(make_context(cfg, p["root"], p["stage"], p["keys"], log=print), p["stage"], index)
if p["finalize"]:
    finalize_stage(make_context(cfg, p["root"], p["stage"], p["keys"], log=print), p["stage"], p["keys"],
                   p["n_shards"], time.time())
"""


def _chunk(tmp: Path, listing_file: Path, **params) -> None:
    spec = tmp / f"chunk-{params['stage']}-{params['indices'][:1]}.json"
    spec.write_text(json.dumps(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", CHUNK, str(spec), str(listing_file)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _lines(path: Path) -> list[tuple[int, str]]:
    return [(int(pid), root) for pid, root in (ln.split(" ", 1) for ln in path.read_text().splitlines())]


@pytest.mark.slow
def test_a_fan_out_run_lists_the_data_once_and_its_chunk_processes_read_the_index(tmp_path, listings):
    base = _data(tmp_path / "data")
    cfg = _cfg(base, tmp_path / "models")
    out = str(tmp_path / "run")
    # the parent: the run's first step (keys, index), sketch in place, then each GPU stage planned
    # here and its shards run by chunk processes (generate's by two), the last also finalizing
    results = run_local(cfg, out, only=["sketch"], log=lambda m: None)
    keys = resolve_keys(cfg, out)
    for stage in STAGE_ORDER[1:]:
        n = plan_stage(make_context(cfg, out, stage, keys, log=lambda m: None), stage, keys)
        cut = max(1, n // 2) if stage == "generate" else 0
        common = {"stage": stage, "cfg": cfg.to_dict(), "root": out, "keys": keys, "n_shards": n}
        if cut:
            _chunk(tmp_path, listings, **common, indices=list(range(cut)), finalize=False)
        _chunk(tmp_path, listings, **common, indices=list(range(cut, n)), finalize=True)
        results[stage] = finalize_stage(make_context(cfg, out, stage, keys), stage, keys, n, time.time())
    assert all(StageStore(out, s, keys[s]).is_complete() for s in STAGE_ORDER)
    lines = _lines(listings)
    # every tree (train/, val/, the folder OOD set) listed exactly once, all by the parent
    assert sorted(root for _, root in lines) == sorted(trees_of(cfg.data).values())
    assert {pid for pid, _ in lines} == {os.getpid()}
    fs, path = index_path(out, keys[DATA_KEY])
    assert fs.exists(path)
    stamp = fs.info(path)["mtime"]

    # a rerun of the same data: its first step lists once and reads the stored index (never rewrites
    # it); no stage lists again, every stage is reused
    listings.write_text("")
    lines_out: list[str] = []
    rerun = run_local(cfg, out, log=lines_out.append)
    assert set(rerun) == set(STAGE_ORDER) and all("reused" in ln for ln in lines_out), lines_out
    assert sorted(root for _, root in _lines(listings)) == sorted(trees_of(cfg.data).values())
    assert fs.info(path)["mtime"] == stamp
    assert os.listdir(Path(path).parent) == [Path(path).name]


def test_a_later_step_reads_the_index_and_a_changed_data_root_gets_a_new_one(tmp_path, listings):
    base = _data(tmp_path / "data")
    cfg = _cfg(base, tmp_path / "models")
    out = str(tmp_path / "run")
    keys = resolve_keys(cfg, out)
    assert len(_lines(listings)) == len(trees_of(cfg.data)) == 3  # train/, val/, ood Noise/
    # a later process: it knows only the keys; it reads the index, lists nothing
    dataset_index.forget()
    ctx = make_context(cfg, out, "sketch", keys, log=lambda m: None)
    assert len(ctx.dataset.records) == 12 and ctx.dataset.classnames == ["cat", "dog"]
    assert resolve_keys(cfg) == keys  # the identity adopted from the index, not listed again
    assert len(_lines(listings)) == 3
    # a new run on changed data: a new identity, new keys, a new index beside the old one
    _img(base / "id" / "train" / "dog" / "6.png", 77)
    dataset_index.forget()
    changed = resolve_keys(cfg, out)
    assert changed[DATA_KEY] != keys[DATA_KEY] and changed["sketch"] != keys["sketch"]
    assert all(index_path(out, k[DATA_KEY])[0].exists(index_path(out, k[DATA_KEY])[1]) for k in (keys, changed))


def test_a_file_replaced_after_the_index_is_a_bad_input_where_it_is_read(tmp_path, listings):
    from ood_core.data import BAD_INPUT_REASONS
    from ood_core.stages.base import ShardOutput, guarded

    base = _data(tmp_path / "data")
    cfg = _cfg(base, tmp_path / "models")
    out = str(tmp_path / "run")
    keys = resolve_keys(cfg, out)
    ctx = make_context(cfg, out, "sketch", keys, log=lambda m: None)
    recs = {Path(r.source).relative_to(base / "id" / "train").as_posix(): r for r in ctx.dataset.records}
    assert load_image(recs["cat/1.png"], 16).size == (16, 16)
    # replaced by another image of the same name (other bytes, a later mtime), one deleted
    path = base / "id" / "train" / "cat" / "1.png"
    _img(path, 555)
    os.utime(path, (time.time() + 5, time.time() + 5))
    (base / "id" / "train" / "dog" / "2.png").unlink()
    outcome = {}
    for rel in ("cat/1.png", "dog/2.png", "cat/0.png"):
        try:
            load_image(recs[rel], 16)
            outcome[rel] = "used"
        except ImageDecodeError as err:
            outcome[rel] = err.reason
    assert outcome == {"cat/1.png": "changed_since_index", "dog/2.png": "missing_file", "cat/0.png": "used"}
    # in a stage it is a failed row whose reason goes to the stage's bad_inputs table
    shard = ShardOutput()
    guarded(shard, recs["cat/1.png"].key, lambda: load_image(recs["cat/1.png"], 16))
    assert [(r["status"], r["reason"]) for r in shard.rows] == [("failed", "changed_since_index")]
    assert "changed_since_index" in BAD_INPUT_REASONS
    # the chunk processes of the same run keep the index (and the records) of its first step
    dataset_index.forget()
    again = make_context(cfg, out, "sketch", keys, log=lambda m: None)
    assert again.dataset.records == ctx.dataset.records


def test_a_truncated_index_is_rebuilt_with_a_log_line(tmp_path, listings, caplog):
    base = _data(tmp_path / "data")
    cfg = _cfg(base, tmp_path / "models")
    out = str(tmp_path / "run")
    keys = resolve_keys(cfg, out)
    fs, path = index_path(out, keys[DATA_KEY])
    intact = fs.cat_file(path)
    with fs.open(path, "wb") as f:
        f.write(intact[: len(intact) // 2])
    dataset_index.forget()
    with caplog.at_level(logging.WARNING, logger="synth_ood.data"):
        ctx = make_context(cfg, out, "sketch", keys, log=lambda m: None)  # a later process of the run
    assert any("truncated or unreadable" in r.getMessage() and path in r.getMessage() for r in caplog.records)
    assert fs.cat_file(path) == intact  # the same listing, the same bytes
    assert len(ctx.dataset.records) == 12
    assert len(_lines(listings)) == 2 * len(trees_of(cfg.data))  # listed again to rebuild, once
    # the run's first step on a rerun rebuilds it too
    with fs.open(path, "wb") as f:
        f.write(b"PAR1 not a parquet file")
    dataset_index.forget()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="synth_ood.data"):
        assert resolve_keys(cfg, out) == keys
    assert any("truncated or unreadable" in r.getMessage() for r in caplog.records)
    assert fs.cat_file(path) == intact


def test_an_fsspec_url_is_listed_by_one_find_with_sizes_and_folders(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe({"/bucket/data/train/cat/0.png": b"1234", "/bucket/data/train/cat/1.png": b"12",
             "/bucket/data/train/dog/0.png": b"123"})  # fmt: skip
    entries = {e.path: (e.kind, e.size) for e in dataset_index.scan("memory://bucket/data/train")}
    assert entries == {"cat": ("d", -1), "cat/0.png": ("f", 4), "cat/1.png": ("f", 2), "dog": ("d", -1),
                       "dog/0.png": ("f", 3)}  # fmt: skip
    local = tmp_path / "train"
    for rel, data in (("cat/0.png", b"1234"), ("cat/1.png", b"12"), ("dog/0.png", b"123")):
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
    # the same tree listed locally hashes the same: its identity does not depend on where it is stored
    assert dataset_index.tree_digest(dataset_index.scan(str(local))) == dataset_index.tree_digest(
        dataset_index.scan("memory://bucket/data/train"))


def test_a_run_checks_the_size_limits_where_a_file_is_read(tmp_path, listings):
    base = _data(tmp_path / "data")
    Image.new("RGB", (4, 4)).save(base / "id" / "train" / "cat" / "0.png")  # under data.min_side=8
    cfg = _cfg(base, tmp_path / "models")
    out = str(tmp_path / "run")
    ctx = make_context(cfg, out, "sketch", resolve_keys(cfg, out), log=lambda m: None)
    rec = next(r for r in ctx.dataset.records if r.source.endswith("cat/0.png"))  # listed, not probed
    with pytest.raises(ImageDecodeError) as err:
        load_image(rec, 16)
    assert err.value.reason == "too_small"


def test_a_later_step_whose_index_is_gone_and_data_changed_stops_naming_both(tmp_path, listings):
    from ood_core.data import DataError

    base = _data(tmp_path / "data")
    cfg = _cfg(base, tmp_path / "models")
    out = str(tmp_path / "run")
    keys = resolve_keys(cfg, out)
    fs, path = index_path(out, keys[DATA_KEY])
    fs.rm(path)
    _img(base / "ood" / "Noise" / "9.png", 9)
    dataset_index.forget()
    with pytest.raises(DataError, match=f"index {keys[DATA_KEY]} is gone.*now lists as"):
        make_context(cfg, out, "sketch", keys, log=lambda m: None)

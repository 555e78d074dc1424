import io
import tarfile

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from ood_core.storage import Sample, StageStore, stage_key
from schemas import GENERATE


def _write(store: StageStore, index: int, n: int = 3) -> dict:
    samples = [Sample(f"s{index}x{i}", {"json": b'{"a": 1}', "txt": f"hello {i}".encode()}) for i in range(n)]
    rows = [{"key": s.key, "status": "ok", "reason": "ok", "prompt": "p"} for s in samples]
    rows.append({"key": f"s{index}fail", "status": "failed", "reason": "ValueError", "error": "boom"})
    return store.write_shard(index, samples, rows, GENERATE, seconds=0.1)


def test_stage_key_depends_on_config_and_upstream():
    a = stage_key("generate", 1, {"x": 1}, {"sketch": "k1"})
    assert a == stage_key("generate", 1, {"x": 1}, {"sketch": "k1"})
    assert a != stage_key("generate", 1, {"x": 2}, {"sketch": "k1"})
    assert a != stage_key("generate", 1, {"x": 1}, {"sketch": "k2"})
    assert a != stage_key("generate", 2, {"x": 1}, {"sketch": "k1"})


def test_shard_layout_readable_by_webdataset_tarfile_and_pyarrow(tmp_path):
    store = StageStore(str(tmp_path), "generate", "abc")
    stats = _write(store, 0)
    paths = store.shard_paths(0)
    assert stats["rows"] == 4 and stats["samples"] == 3
    assert stats["counts"] == {"ok": {"ok": 3}, "failed": {"ValueError": 1}}
    with tarfile.open(paths["tar"]) as tf:
        assert sorted(tf.getnames())[:2] == ["s0x0.json", "s0x0.txt"]
    keys = [s["__key__"] for s in wds.WebDataset(paths["tar"], shardshuffle=False)]
    assert keys == ["s0x0", "s0x1", "s0x2"]
    table = pq.read_table(paths["parquet"])
    assert table.num_rows == 4 and table.schema.metadata[b"synth_ood.stage"] == b"generate"
    assert table.column("error").to_pylist()[-1] == "boom"
    assert not list(tmp_path.rglob(".tmp-*")), "temporary files must be renamed away"


def test_same_content_same_bytes(tmp_path):
    a, b = StageStore(str(tmp_path / "a"), "generate", "k"), StageStore(str(tmp_path / "b"), "generate", "k")
    assert _write(a, 0)["tar_sha256"] == _write(b, 0)["tar_sha256"]
    assert a.shard_stats(0)["parquet_sha256"] == b.shard_stats(0)["parquet_sha256"]


def test_verify_names_corrupted_shard(tmp_path):
    store = StageStore(str(tmp_path), "generate", "abc")
    _write(store, 0)
    _write(store, 1)
    store.write_success({"shards": 2})
    assert store.verify() == []
    path = store.shard_paths(1)["tar"]
    data = bytearray(open(path, "rb").read())
    data[600] ^= 0xFF
    open(path, "wb").write(bytes(data))
    problems = store.verify()
    assert len(problems) == 1 and "shards/000001.tar" in problems[0] and "sha256" in problems[0]


def test_verify_reports_missing_marker_and_success(tmp_path):
    store = StageStore(str(tmp_path), "generate", "abc")
    _write(store, 0)
    _write(store, 1)
    assert any("_SUCCESS" in p for p in store.verify())
    store.write_success({"shards": 2})
    store.fs.rm(store.shard_paths(0)["stats"])
    assert any("[0]" in p for p in store.verify())


def test_iter_samples_groups_files_by_key(tmp_path):
    store = StageStore(str(tmp_path), "generate", "abc")
    _write(store, 0, n=2)
    _write(store, 1, n=1)
    got = dict(store.iter_samples())
    assert set(got) == {"s0x0", "s0x1", "s1x0"}
    assert got["s0x1"]["txt"] == b"hello 1"
    assert store.read_manifest().num_rows == 5


def test_sample_keys_must_not_contain_dots():
    with pytest.raises(ValueError, match="no '.'"):
        Sample("a.b", {})


def test_memory_filesystem_root():
    store = StageStore("memory://synth-ood-test", "sketch", "k")
    _write(store, 0)
    assert store.shard_done(0) and store.verify()[0].endswith("missing _SUCCESS.json")
    assert io.BytesIO(store.read_bytes(store.shard_paths(0)["tar"])).getbuffer().nbytes > 0


def test_verify_cli_lists_incomplete_folders_but_fails_only_on_damage(tmp_path, capsys):
    from flows.cli import main

    done = StageStore(str(tmp_path), "generate", "done")
    _write(done, 0)
    done.write_success({"shards": 1})
    partial = StageStore(str(tmp_path), "generate", "partial")
    _write(partial, 0)
    assert main(["verify", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 incomplete" in out and "generate/partial" in out
    path = partial.shard_paths(0)["parquet"]
    open(path, "ab").write(b"x")
    assert main(["verify", str(tmp_path)]) == 1
    assert "generate/partial/manifests/000000.parquet" in capsys.readouterr().out


def test_unreadable_stats_is_a_problem_not_a_crash(tmp_path):
    store = StageStore(str(tmp_path), "generate", "k")
    _write(store, 0)
    open(store.shard_paths(0)["stats"], "w").write("{not json")
    assert not store.shard_valid(0)
    assert "unreadable" in store.shard_problems(0)[0]


def _write_judged(store: StageStore, index: int) -> dict:
    samples = [Sample(f"s{i}", {"json": b'{"a": 1}', "png": b"x" * (i + 1)}) for i in range(4)]
    status = ["kept", "rejected", "kept", "failed"]
    rows = [{"key": s.key, "status": st, "reason": "r", "prompt": "p"} for s, st in zip(samples, status, strict=True)]
    return store.write_shard(index, samples, rows, GENERATE, seconds=0.1)


def test_training_shards_hold_kept_samples_only_rejected_ones_go_aside(tmp_path):
    store = StageStore(str(tmp_path), "elaborate", "abc")
    stats = _write_judged(store, 0)
    paths = store.shard_paths(0)
    assert [s["__key__"] for s in wds.WebDataset(paths["tar"], shardshuffle=False)] == ["s0", "s2"]
    assert [s["__key__"] for s in wds.WebDataset(store.rejected_path(0), shardshuffle=False)] == ["s1", "s3"]
    assert stats["samples"] == 2 and stats["rejected_samples"] == 2
    # readers of the stage (report grid, downstream stages) still see every sample
    assert sorted(store.load_samples()) == ["s0", "s1", "s2", "s3"]
    assert sorted(k for k, _ in store.iter_samples(rejected=False)) == ["s0", "s2"]
    store.write_success({"shards": 1})
    assert store.verify() == []
    data = bytearray(open(store.rejected_path(0), "rb").read())
    data[600] ^= 0xFF
    open(store.rejected_path(0), "wb").write(bytes(data))
    problems = store.verify()
    assert len(problems) == 1 and "rejected/000000.tar" in problems[0] and "sha256" in problems[0]


def test_reuse_trusts_marker_and_sizes_without_reading_shards_verify_rehashes(tmp_path, monkeypatch):
    import os

    store = StageStore(str(tmp_path), "generate", "k")
    stats = [_write(store, i) for i in range(3)]
    store.write_success({"shards": 3, "sizes": [[s["tar_size"], s["parquet_size"]] for s in stats]})
    assert store.shard_stats(1)["tar_size"] == os.path.getsize(store.shard_paths(1)["tar"])
    # a same-size flip with the old mtime put back: only a full re-hash can see it
    path = store.shard_paths(1)["tar"]
    st = os.stat(path)
    data = bytearray(open(path, "rb").read())
    data[600] ^= 0xFF
    open(path, "wb").write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    reads: list[str] = []
    real_read = StageStore.read_bytes
    monkeypatch.setattr(StageStore, "read_bytes", lambda self, p: reads.append(p) or real_read(self, p))
    assert store.is_valid() and store.shard_valid(1)
    assert not [p for p in reads if p.endswith((".tar", ".parquet"))], "the cheap check must not read shard data"
    assert [p.rsplit("/", 1)[1] for p in reads if "/stats/" not in p] == ["_SUCCESS.json"]
    assert "sha256" in store.verify()[0]  # `synth-ood verify` re-hashes


def test_cheap_check_catches_truncated_and_rewritten_files(tmp_path):
    import os

    store = StageStore(str(tmp_path), "generate", "k")
    for i in range(3):
        _write(store, i)
    store.write_success({"shards": 3})
    tar = store.shard_paths(0)["tar"]
    open(tar, "r+b").truncate(512)
    parquet = store.shard_paths(2)["parquet"]
    data = open(parquet, "rb").read()
    later = os.stat(store.shard_paths(2)["stats"]).st_mtime_ns + 5_000_000_000
    open(parquet, "wb").write(data)  # same bytes, but written after the marker: not trusted
    os.utime(parquet, ns=(later, later))
    problems = store.verify(deep=False)
    assert any("shards/000000.tar: 512 bytes" in p for p in problems)
    assert any("manifests/000002.parquet: modified after" in p for p in problems)
    assert not store.is_valid() and not store.shard_valid(0) and store.shard_valid(1) and not store.shard_valid(2)


def test_stage_check_uses_sizes_from_success_and_still_sees_a_truncated_shard(tmp_path):
    store = StageStore(str(tmp_path), "generate", "k")
    stats = [_write(store, i) for i in range(2)]
    store.write_success({"shards": 2, "sizes": [[s["tar_size"], s["parquet_size"]] for s in stats]})
    assert store.is_valid()
    open(store.shard_paths(1)["tar"], "r+b").truncate(512)
    assert any("shards/000001.tar: 512 bytes" in p for p in store.verify(deep=False))

"""Hand-made damage a kill or a full disk can leave (issue 18, "Damaged state"): a truncated
``_SUCCESS.json``, stats marker, stage plan, shard plan or ``_runs/latest.json`` is reported by
name, and a rerun with the same settings repairs it, reusing every intact shard."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from flows.cli import cmd_verify  # noqa: E402
from ood_core.config import load_config  # noqa: E402
from ood_core.pipeline import read_run_record, resolve_keys, run_local  # noqa: E402
from tests.test_batching import _overrides  # noqa: E402

STAGES = ("sketch", "generate")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    cfg = load_config("tiny", _overrides(str(tmp_path_factory.mktemp("tiny-models"))))
    root = tmp_path_factory.mktemp("finished") / "run"
    run_local(cfg, str(root), only=list(STAGES), log=lambda m: None)
    return cfg, root, resolve_keys(cfg)


def _copy(finished, tmp_path: Path):
    cfg, root, keys = finished
    dst = tmp_path / "run"
    shutil.copytree(root, dst)
    return cfg, dst, {s: dst / s / keys[s] for s in STAGES}


def _truncate(path: Path) -> bytes:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return data


def _verify(root: Path) -> int:
    return cmd_verify(argparse.Namespace(dir=str(root)))


def _rerun(cfg, root: Path) -> list[str]:
    logs: list[str] = []
    run_local(cfg, str(root), only=list(STAGES), log=logs.append)
    return logs


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "shards").glob("*.tar"))}


def test_a_truncated_success_marker_is_reported_and_rewritten(finished, tmp_path, capsys):
    cfg, root, folders = _copy(finished, tmp_path)
    success = folders["generate"] / "_SUCCESS.json"
    original = _truncate(success)
    tars = _shards(folders["generate"])
    assert _verify(root) == 1
    assert "_SUCCESS.json: unreadable" in capsys.readouterr().out
    _rerun(cfg, root)
    assert _verify(root) == 0
    assert _shards(folders["generate"]) == tars  # no shard recomputed into other bytes
    assert success.read_bytes() != original[: len(original) // 2]


def test_a_truncated_shard_marker_makes_the_rerun_redo_that_shard(finished, tmp_path, capsys):
    cfg, root, folders = _copy(finished, tmp_path)
    marker = folders["generate"] / "stats" / "000000.json"
    original = _truncate(marker)
    assert _verify(root) == 1
    assert "stats/000000.json" in capsys.readouterr().out
    logs = _rerun(cfg, root)
    assert not any("reused" in m and "generate" in m for m in logs), logs  # the stage was not trusted
    assert _verify(root) == 0
    assert marker.read_bytes() == original  # recomputed: byte-identical


def test_truncated_plans_are_planned_again(finished, tmp_path):
    cfg, root, folders = _copy(finished, tmp_path)
    g = folders["generate"]
    plan = (g / "plans" / "000000.json").read_bytes()
    _truncate(g / "plan.json")
    _truncate(g / "plans" / "000000.json")
    # the shard must rerun, so that its frozen plan is read
    (g / "stats" / "000000.json").unlink()
    (g / "_SUCCESS.json").unlink()
    _rerun(cfg, root)
    assert _verify(root) == 0
    assert (g / "plans" / "000000.json").read_bytes() == plan


def test_a_truncated_run_record_falls_back_to_the_history(finished, tmp_path):
    cfg, root, _ = _copy(finished, tmp_path)
    latest = root / "_runs" / "latest.json"
    _truncate(latest)
    record = read_run_record(str(root))
    assert record is not None and record["keys"] == finished[2]


def test_old_temporaries_are_swept_and_fresh_ones_kept(tmp_path):
    from ood_core.storage import StageStore

    store = StageStore(str(tmp_path), "generate", "k")
    store.write_json(store.path("stats", "000000.json"), {"rows": 1})
    folder = tmp_path / "generate" / "k" / "stats"
    old, fresh = folder / ".tmp-aaaa-000001.json", folder / ".tmp-bbbb-000002.json"
    old.write_bytes(b"{")
    fresh.write_bytes(b"{")
    os.utime(old, (1e9, 1e9))
    assert store.sweep_temporaries() == [str(old)]
    assert not old.exists() and fresh.exists() and (folder / "000000.json").exists()


def test_a_full_disk_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    import errno

    from ood_core.storage import StageStore

    store = StageStore(str(tmp_path), "generate", "k")
    real_open = store.fs.open

    def full(path, mode="rb", **kw):
        f = real_open(path, mode, **kw)
        if "w" in mode:
            f.write(b"partial")
            f.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return f

    monkeypatch.setattr(store.fs, "open", full)
    with pytest.raises(OSError, match="no space left on the device writing .*000000.json.*free space"):
        store.write_json(store.path("stats", "000000.json"), {"rows": 1})
    assert not list((tmp_path / "generate" / "k" / "stats").iterdir())

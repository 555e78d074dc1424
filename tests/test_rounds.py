"""Generation rounds: new data per round with sketch reused, `keep_last` pruning, `status` listing."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ood_core.config import ConfigError, load_config
from ood_core.pipeline import resolve_keys
from ood_core.rounds import list_rounds, prune_rounds, record_round, resolve_round
from ood_core.storage import StageStore


def test_round_changes_generate_and_later_keys_but_not_sketch():
    base = resolve_keys(load_config("tiny"))
    a = resolve_keys(load_config("tiny", {"generate.round": "2026-11-21"}))
    b = resolve_keys(load_config("tiny", {"generate.round": "2026-11-22"}))
    assert base["sketch"] == a["sketch"] == b["sketch"]
    for stage in ("generate", "elaborate", "finetune"):
        assert len({base[stage], a[stage], b[stage]}) == 3
    with pytest.raises(ConfigError, match="generate.round"):
        load_config("tiny", {"generate.round": "a/b"})


def test_date_round_is_the_scheduled_date():
    assert resolve_round("@date", datetime(2026, 11, 22, 2, 0, tzinfo=UTC)) == "2026-11-22"
    assert resolve_round("manual-1") == "manual-1" and resolve_round(None) == ""


def _fake_round(root: str, name: str, keys: dict[str, str]) -> None:
    for stage, key in keys.items():
        StageStore(root, stage, key).write_json(StageStore(root, stage, key).path("_SUCCESS.json"), {})
    record_round(root, name, keys)


def test_keep_last_prunes_old_rounds_but_never_shared_or_current_folders(tmp_path):
    root = str(tmp_path)
    _fake_round(root, "r1", {"sketch": "s", "generate": "g1", "elaborate": "e1", "finetune": "f1"})
    _fake_round(root, "r2", {"sketch": "s", "generate": "g2", "elaborate": "e2", "finetune": "f1"})
    _fake_round(root, "r3", {"sketch": "s", "generate": "g3", "elaborate": "e3", "finetune": "f3"})
    assert [r["round"] for r in list_rounds(root)] == ["r1", "r2", "r3"]
    assert prune_rounds(root, 2, current="r3", log=lambda _m: None) == ["r1"]
    assert not (tmp_path / "generate" / "g1").exists() and not (tmp_path / "elaborate" / "e1").exists()
    assert (tmp_path / "finetune" / "f1").exists()  # r2, a kept round, uses it too
    assert (tmp_path / "sketch" / "s").exists()
    assert [r["round"] for r in list_rounds(root)] == ["r2", "r3"]
    # the current round is never pruned, even when it is not among the newest
    assert prune_rounds(root, 1, current="r2", log=lambda _m: None) == []
    with pytest.raises(ValueError, match="keep_last"):
        prune_rounds(root, 0, current="r3")


CLI = [sys.executable, "-m", "flows.cli"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=os.environ.copy())
    assert proc.returncode == 0, f"synth-ood {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_ino) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_two_nightly_rounds_reuse_sketch_make_new_images_and_keep_last_prunes(tmp_path):
    out, models = tmp_path / "out", str(tmp_path / "models")
    run = ["run", "--preset", "tiny", "--out", str(out), "--set", f"models.cache_dir={models}", "--only", "sketch,generate"]
    # the first two rounds in-process (quicker); the third goes through the Prefect flow's pruning task
    _cli(*run, "--round", "2026-11-21", "--no-prefect")
    keys_a = resolve_keys(load_config("tiny", {"models.cache_dir": models, "generate.round": "2026-11-21"}))
    sketch_before = _files(out / "sketch")
    _cli(*run, "--round", "2026-11-22", "--no-prefect")
    keys_b = resolve_keys(load_config("tiny", {"models.cache_dir": models, "generate.round": "2026-11-22"}))
    assert _files(out / "sketch") == sketch_before  # sketch reused, not rewritten
    tar_a = (out / "generate" / keys_a["generate"] / "shards" / "000000.tar").read_bytes()
    tar_b = (out / "generate" / keys_b["generate"] / "shards" / "000000.tar").read_bytes()
    assert tar_a != tar_b  # a new round makes new images
    assert "rounds: 2026-11-21, 2026-11-22 (latest run)" in _cli("status", str(out)).stdout

    _cli(*run, "--round", "2026-11-22", "--keep-last", "1")
    assert not (out / "generate" / keys_a["generate"]).exists()
    assert (out / "generate" / keys_b["generate"] / "_SUCCESS.json").exists()
    assert _files(out / "sketch") == sketch_before
    assert [r["round"] for r in list_rounds(str(out))] == ["2026-11-22"]

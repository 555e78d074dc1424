"""Generation rounds: new data per round with sketch reused, `keep_last` pruning, `status` listing."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ood_core.config import ConfigError, load_config
from ood_core.pipeline import resolve_keys, run_local
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


def _window_cfg(name: str, window: int = 2, **extra):
    return load_config("tiny", {"generate.round": name, "finetune.rounds_window": window, **extra})


def test_finetune_key_hashes_the_earlier_rounds_of_its_window(tmp_path):
    root = str(tmp_path)
    # no earlier round yet: the same set (this round alone) gives the key of a window of 1
    assert resolve_keys(_window_cfg("r2"), root) == resolve_keys(_window_cfg("r2", window=1))
    r1 = resolve_keys(_window_cfg("r1"))
    _fake_round(root, "r1", r1)
    k2 = resolve_keys(_window_cfg("r2"), root)
    assert k2["elaborate@r1"] == r1["elaborate"]
    assert k2["finetune"] != resolve_keys(_window_cfg("r2", window=1))["finetune"]  # a new round in the set
    base = resolve_keys(_window_cfg("r2"))
    assert all(k2[s] == base[s] for s in ("sketch", "generate", "elaborate"))  # only finetune reads the window
    assert resolve_keys(_window_cfg("r2"), root) == k2  # same set, same key
    _fake_round(root, "r2", k2)
    r3 = resolve_keys(_window_cfg("r3", window=3))
    _fake_round(root, "r3", r3)
    # a rerun of r2 (already recorded) still reads only the rounds recorded before it
    assert resolve_keys(_window_cfg("r2"), root) == k2
    k4 = resolve_keys(_window_cfg("r4"), root)
    assert [k for k in k4 if "@" in k] == ["elaborate@r3"]  # the newest K - 1 earlier rounds
    assert sorted(k for k in resolve_keys(_window_cfg("r4", window=3), root) if "@" in k) == [
        "elaborate@r2", "elaborate@r3"]
    # a round of another sketch (other negatives) or with an unfinished elaborate is not read
    _fake_round(root, "r5", {**resolve_keys(_window_cfg("r5")), "sketch": "other"})
    r6 = resolve_keys(_window_cfg("r6"))
    _fake_round(root, "r6", r6)
    StageStore(root, "elaborate", r6["elaborate"]).clear()
    assert [k for k in resolve_keys(_window_cfg("r7"), root) if "@" in k] == ["elaborate@r3"]


def test_keep_last_below_the_window_is_rejected_before_any_work(tmp_path, capsys):
    from flows.cli import main

    with pytest.raises(ValueError, match="keep_last 1 is smaller than finetune.rounds_window 2"):
        run_local(_window_cfg("r1"), str(tmp_path / "a"), keep_last=1)
    assert not (tmp_path / "a").exists()
    argv = ["run", "--out", str(tmp_path / "b"), "--round", "r1", "--keep-last", "1", "--set", "finetune.rounds_window=2"]
    assert main(argv) == 2
    assert "set keep_last to at least 2" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_prune_keeps_the_earlier_rounds_a_kept_finetune_reads(tmp_path):
    root = str(tmp_path)
    _fake_round(root, "r1", {"sketch": "s", "generate": "g1", "elaborate": "e1", "finetune": "f1"})
    _fake_round(root, "r2", {"sketch": "s", "generate": "g2", "elaborate": "e2", "elaborate@r1": "e1", "finetune": "f2"})
    # e.g. r2 rerun after newer rounds: r2 is current, its finetune reads r1's elaborate folder
    assert prune_rounds(root, 1, current="r2", log=lambda _m: None) == ["r1"]
    assert (tmp_path / "elaborate" / "e1").exists()
    assert not (tmp_path / "generate" / "g1").exists() and not (tmp_path / "finetune" / "f1").exists()


@pytest.fixture(scope="module")
def two_rounds(tmp_path_factory):
    """Rounds A then B of the tiny preset in-process, finetune over a window of 2 (shrunk generate)."""
    root = str(tmp_path_factory.mktemp("window") / "out")
    shrink = {"models.cache_dir": str(tmp_path_factory.mktemp("models")), "generate.steps": 1,
              "generate.rounds": 1, "generate.t2i_steps": 1}
    cfgs = {r: _window_cfg(r, **shrink) for r in ("A", "B")}
    keys, results = {}, {}
    for r, cfg in cfgs.items():
        keys[r] = resolve_keys(cfg, root)
        results[r] = run_local(cfg, root, log=lambda _m: None, check=False)
    return root, cfgs, keys, results


@pytest.mark.slow
def test_finetune_trains_on_the_kept_images_of_the_last_rounds(two_rounds):
    root, cfgs, keys, results = two_rounds
    assert "rounds" not in results["A"]["finetune"]["summary"]  # the first round has no earlier one
    assert keys["B"]["elaborate@A"] == keys["A"]["elaborate"]
    assert results["B"]["finetune"]["summary"]["rounds"] == {"elaborate": keys["B"]["elaborate"],
                                                             "elaborate@A": keys["A"]["elaborate"]}
    assert results["B"]["finetune"]["upstream"]["elaborate@A"] == keys["A"]["elaborate"]
    report = StageStore(root, "finetune", keys["B"]["finetune"]).path("artifacts", "report.md")
    assert "trained on the kept images of this round and of A" in Path(report).read_text()

    def synthetic(round_name: str) -> list[str]:
        rows = StageStore(root, "finetune", keys[round_name]["finetune"]).read_manifest().to_pylist()
        return [r["key"] for r in rows if r["role"] == "synthetic"]

    def kept(round_name: str) -> set[str]:
        rows = StageStore(root, "elaborate", keys[round_name]["elaborate"]).read_manifest().to_pylist()
        return {r["key"] for r in rows if r["status"] == "kept"}

    a, b = synthetic("A"), synthetic("B")
    earlier = [k for k in b if k.startswith(f"r{keys['A']['elaborate'][:10]}_")]
    assert a and earlier and len(b) == len(a) + len(set(b) - set(earlier))
    assert {k.split("_", 1)[1] for k in earlier} == set(a) <= kept("A")  # round A's images, as A trained on them
    assert set(b) - set(earlier) <= kept("B")
    assert results["B"]["finetune"]["summary"]["train"]["samples"] > results["A"]["finetune"]["summary"]["train"]["samples"]
    # the same rounds resolve to the same key: a rerun reuses every stage
    assert resolve_keys(cfgs["B"], root) == keys["B"]
    again = run_local(cfgs["B"], root, log=lambda _m: None, check=False)
    assert again["finetune"]["key"] == keys["B"]["finetune"] and again["finetune"] == results["B"]["finetune"]


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

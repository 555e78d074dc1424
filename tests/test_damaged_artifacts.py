"""Stage-level outputs (issue 18, items 5 and 6): ``artifacts/`` are recorded with their hashes in
``_SUCCESS.json``, so a truncated adapter or a deleted report fails ``verify`` and a rerun repairs
it; ``--force`` removes the marker before the folder, so a kill mid-delete leaves no marker over
missing files; a copied output folder prints its own report path, not the old one."""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from flows.cli import _print_summary, cmd_verify  # noqa: E402
from ood_core.config import load_config  # noqa: E402
from ood_core.pipeline import resolve_keys, run_local  # noqa: E402
from ood_core.storage import StageStore  # noqa: E402
from tests.test_batching import _overrides  # noqa: E402


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    cfg = load_config("tiny", _overrides(str(tmp_path_factory.mktemp("tiny-models"))))
    root = tmp_path_factory.mktemp("finished") / "run"
    run_local(cfg, str(root), log=lambda m: None)
    return cfg, root, resolve_keys(cfg)


def _copy(finished, tmp_path: Path):
    cfg, root, keys = finished
    dst = tmp_path / "run"
    shutil.copytree(root, dst)
    return cfg, dst, keys


def _verify(root: Path) -> int:
    return cmd_verify(argparse.Namespace(dir=str(root)))


def test_success_records_every_artifact_with_its_hash(finished):
    _, root, keys = finished
    store = StageStore(str(root), "finetune", keys["finetune"])
    recorded = store.read_success()["artifacts"]
    assert {"adapter.safetensors", "report.md"} <= set(recorded)
    assert recorded == store.artifact_files()


@pytest.mark.parametrize("damage", ["truncate adapter.safetensors", "delete report.md"])
def test_damaged_artifacts_fail_verify_and_a_rerun_repairs_them(finished, tmp_path, capsys, damage):
    cfg, root, keys = _copy(finished, tmp_path)
    how, name = damage.split()
    path = root / "finetune" / keys["finetune"] / "artifacts" / name
    original = path.read_bytes()
    if how == "truncate":
        path.write_bytes(original[: len(original) // 2])
    else:
        path.unlink()
    assert _verify(root) == 1
    assert f"artifacts/{name}" in capsys.readouterr().out
    logs: list[str] = []
    run_local(cfg, str(root), log=logs.append)
    assert not any(m.startswith("[finetune] reused") for m in logs), logs
    assert any(m.startswith("[generate] reused") for m in logs), logs  # only the damaged stage reran
    assert _verify(root) == 0
    assert path.read_bytes() == original  # the same run's bytes, not merely a file of that name


def test_a_marker_left_over_deleted_artifacts_and_stats_is_not_trusted(finished, tmp_path, capsys):
    """The state a kill in the middle of the old ``--force`` delete left: marker kept, files gone."""
    cfg, root, keys = _copy(finished, tmp_path)
    folder = root / "elaborate" / keys["elaborate"]
    shutil.rmtree(folder / "artifacts")
    shutil.rmtree(folder / "stats")
    assert _verify(root) == 1
    run_local(cfg, str(root), log=lambda m: None)
    assert _verify(root) == 0
    assert (folder / "artifacts").is_dir()


def test_force_removes_the_success_marker_before_the_folder(finished, tmp_path, monkeypatch):
    _, root, keys = _copy(finished, tmp_path)
    store = StageStore(str(root), "finetune", keys["finetune"])
    real_rm = store.fs.rm

    def killed_in_recursive_delete(path, recursive=False, **kw):
        if recursive:
            raise KeyboardInterrupt  # the kill arrives before a single file of the folder went
        return real_rm(path, recursive=recursive, **kw)

    monkeypatch.setattr(store.fs, "rm", killed_in_recursive_delete)
    with pytest.raises(KeyboardInterrupt):
        store.clear()
    assert not store.is_complete()


def test_a_copied_output_folder_prints_its_own_report_path(finished, tmp_path, capsys):
    cfg, root, _ = _copy(finished, tmp_path)
    results = run_local(cfg, str(root), log=lambda m: None)  # every stage reused from the copy
    _print_summary(results, str(root))
    out = capsys.readouterr().out
    report = next(line for line in out.splitlines() if "report:" in line).split("report:")[1].strip()
    assert report.startswith(str(root)), report
    assert Path(report).is_file()

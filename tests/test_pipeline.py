"""End to end on the tiny preset through the real CLI and real Prefect (ephemeral API)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from ood_core.config import load_config
from ood_core.pipeline import read_run_record, resolve_keys, run_local
from ood_core.stages import STAGE_ORDER

pytestmark = pytest.mark.slow
CLI = [sys.executable, "-m", "flows.cli"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([*CLI, *args], capture_output=True, text=True, env=os.environ.copy())
    if check and proc.returncode != 0:
        raise AssertionError(f"synth-ood {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("models"))


def tiny_args(out: Path, model_cache: str, *extra: str) -> list[str]:
    return ["run", "--preset", "tiny", "--out", str(out), "--set", f"models.cache_dir={model_cache}", *extra]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """(mtime_ns, inode) of every file under root: a rewrite changes both."""
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_ino)
        for p in root.rglob("*")
        if p.is_file() and "_runs" not in p.parts
    }


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, model_cache):
    out = tmp_path_factory.mktemp("run") / "tiny"
    proc = cli(*tiny_args(out, model_cache))
    return out, proc


def test_first_run_leaves_four_complete_verified_stages(tiny_run):
    out, proc = tiny_run
    record = read_run_record(str(out))
    for stage in STAGE_ORDER:
        folder = out / stage / record["keys"][stage]
        assert (folder / "_SUCCESS.json").exists(), stage
        tars = sorted(folder.glob("shards/*.tar"))
        assert tars, stage
        for tar in tars:
            with tarfile.open(tar) as tf:
                names = tf.getnames()
            assert all(n.count(".") >= 1 and "." not in n.split(".")[0] for n in names)
            # a shard whose every candidate was rejected publishes an empty tar (its samples are in rejected/)
            samples = wds.WebDataset(str(tar), shardshuffle=False, empty_check=False)
            assert len(list(samples)) == len({n.split(".")[0] for n in names})
        for parquet in folder.glob("manifests/*.parquet"):
            table = pq.read_table(parquet)
            assert {"key", "status", "reason", "error"} <= set(table.column_names)
    assert cli("verify", str(out)).returncode == 0
    assert "FPR95" in proc.stdout and "AUROC" in proc.stdout
    assert proc.stdout.count("starting Prefect's local API") == 1
    art = out / "finetune" / record["keys"]["finetune"] / "artifacts"
    for name in ("metrics.json", "report.md", "roc.png", "score_histograms.png", "adapter.safetensors",
                 "tuned_negatives.safetensors"):
        assert (art / name).stat().st_size > 0, name


def test_tiny_run_has_the_mm_ood_far_branch_end_to_end(tiny_run):
    import json

    from ood_core.stages.elaborate import read_outlier_table
    from ood_core.storage import StageStore

    out, _ = tiny_run
    keys = read_run_record(str(out))["keys"]
    gen = StageStore(str(out), "generate", keys["generate"]).read_manifest().to_pylist()
    assert {r["kind"] for r in gen} == {"boundary", "far", "multi_os"}
    assert all(r["model_id"] == "tiny://sd-t2i" and r["prompt_id"] == "photo" for r in gen if r["kind"] == "far")
    elab_store = StageStore(str(out), "elaborate", keys["elaborate"])
    elab = elab_store.read_manifest().to_pylist()
    assert len(elab) == sum(r["status"] == "ok" for r in gen)  # (multi_os rejects candidates in generate)
    for r in elab:  # the MLLM fields of every image
        assert r["mllm_model"] == "tiny://llava" and r["answer_describe"] is not None
        assert r["id_visible"] in ("yes", "no", "unclear") and json.loads(r["prompt_ids"])[0] == "describe_v1"
    table = read_outlier_table(elab_store)
    assert {r["image_key"] for r in table if r["origin"] == "elaborate"} == {r["key"] for r in elab if r["kind"] == "far"}
    fin = StageStore(str(out), "finetune", keys["finetune"]).read_success()["summary"]
    assert {"eoe", "mm_ood"} <= set(fin["metrics"])
    assert fin["outlier_labels"]["eoe"] != fin["outlier_labels"]["mm_ood"]  # different label sets


def test_status_shows_counts_by_kind(tiny_run):
    out, _ = tiny_run
    proc = cli("status", str(out))
    assert "kind boundary:" in proc.stdout and "kind far:" in proc.stdout


def test_report_has_every_method_with_its_temperature_and_the_leaked_labels(tiny_run):
    import json

    out, _ = tiny_run
    record = read_run_record(str(out))
    art = out / "finetune" / record["keys"]["finetune"] / "artifacts"
    metrics = json.loads((art / "metrics.json").read_text())
    report = (art / "report.md").read_text()
    expected_t = {"mcm": 1, "energy": 0.01, "max_logit": 1, "neglabel": 0.01, "eoe": 1, "mm_ood": 0.01,
                  "synood": 0.01, "multi_os": 0.01}
    assert set(metrics["results"]) == set(expected_t)
    for method, t in expected_t.items():
        assert metrics["temperatures"][method] == pytest.approx(t)
        assert f"| {method} | {t:g} |" in report, method
    # a far label of the tiny preset names an evaluation OOD class (the preset's
    # sketch.eval_ood_names): it is listed in the report and is in no label set
    leaked = metrics["leaked_labels"]
    assert leaked and "## Leaked labels" in report
    sketch = out / "sketch" / record["keys"]["sketch"]
    rows = [r for p in sorted(sketch.glob("manifests/*.parquet")) for r in pq.read_table(p).to_pylist()]
    for label in leaked:
        assert f"`{label}`" in report
        assert not [r for r in rows if r["text"] == label and r["status"] == "kept"], label
    # rejected: for leaking, or for an earlier hygiene reason (the leakage flag is set either way)
    assert {r["status"] for r in rows if r["text"] in leaked} == {"rejected"}
    assert all(r["leakage"] for r in rows if r["text"] in leaked)


def _tar_json(paths) -> dict[str, object]:
    import json

    return {s["__key__"]: json.loads(s["json"]) if "json" in s else None
            for t in sorted(paths) for s in wds.WebDataset(str(t), shardshuffle=False, empty_check=False)}


def test_published_stage_folders_load_with_webdataset_and_datasets(tiny_run):
    import datasets

    out, _ = tiny_run
    keys = read_run_record(str(out))["keys"]
    classnames = ["astronaut", "cat", "coffee cup", "rocket", "motorcycle"]
    n_rejected = 0
    for stage in STAGE_ORDER:
        folder = out / stage / keys[stage]
        status = {r["key"]: r["status"] for r in pq.read_table(folder / "manifests").to_pylist()}
        published = _tar_json(folder.glob("shards/*.tar"))
        aside = _tar_json(folder.glob("rejected/*.tar"))
        # training shards: kept / ok candidates only; everything else is set aside for the report
        assert published and all(status[k] not in ("rejected", "failed") for k in published), stage
        assert all(status.get(k) in (None, "rejected", "failed") for k in aside), stage
        n_rejected += sum(status.get(k) == "rejected" for k in aside)
        for meta in published.values():
            if isinstance(meta, dict) and meta.get("class_idx", -1) >= 0:
                assert meta["class_name"] == classnames[meta["class_idx"]], stage
        # as the README says: the stage folder's dataset card, or the webdataset builder on its shards
        ds = datasets.load_dataset(str(folder), split="train")
        assert len(ds) == len(published), stage
        if aside:
            assert len(datasets.load_dataset(str(folder), "rejected", split="train")) == len(aside)
    assert n_rejected > 0
    elaborate = out / "elaborate" / keys["elaborate"]
    ds = datasets.load_dataset("webdataset", data_files={"train": str(elaborate / "shards" / "*.tar")}, split="train")
    meta = ds[0]["json"]
    assert meta["status"] == "kept" and meta["label_text"] == meta["neg_label"] and meta["class_name"] in classnames


def test_second_run_recomputes_nothing(tiny_run, model_cache):
    out, _ = tiny_run
    before = snapshot(out)
    proc = cli(*tiny_args(out, model_cache))
    assert snapshot(out) == before
    assert "done in" not in proc.stdout + proc.stderr  # no shard ran


def test_status_reports_every_stage_done(tiny_run):
    out, _ = tiny_run
    proc = cli("status", str(out))
    for stage in STAGE_ORDER:
        assert f"{stage}" in proc.stdout
    assert proc.stdout.count(" done ") == 4
    assert "kept" in proc.stdout and "rejected" in proc.stdout


def test_deleted_shard_marker_reruns_only_that_shard(tiny_run, model_cache):
    out, _ = tiny_run
    key = read_run_record(str(out))["keys"]["sketch"]
    folder = out / "sketch" / key
    (folder / "stats" / "000001.json").unlink()
    (folder / "_SUCCESS.json").unlink()
    before = snapshot(out)
    cli(*tiny_args(out, model_cache))
    after = snapshot(out)
    changed = {p for p in after if before.get(p) != after[p]}
    prefix = f"sketch/{key}/"
    rejected = {"rejected/000001.tar"} if (folder / "rejected" / "000001.tar").exists() else set()
    assert {p[len(prefix):] for p in changed if p.startswith(prefix)} == {
        "shards/000001.tar", "manifests/000001.parquet", "timings/000001.json", "stats/000001.json", "_SUCCESS.json",
        *rejected,
    }
    # downstream keys did not change, so nothing downstream was recomputed
    assert all(p.startswith(prefix) for p in changed), sorted(changed)
    assert cli("verify", str(out)).returncode == 0


def test_changed_generate_setting_reuses_sketch_only(tiny_run, model_cache):
    out, _ = tiny_run
    old = read_run_record(str(out))["keys"]
    sketch_before = {p: v for p, v in snapshot(out).items() if p.startswith(f"sketch/{old['sketch']}/")}
    cli(*tiny_args(out, model_cache, "--set", "generate.rounds=1"))
    new = read_run_record(str(out))["keys"]
    assert new["sketch"] == old["sketch"]
    for stage in ("generate", "elaborate", "finetune"):
        assert new[stage] != old[stage]
        assert (out / stage / new[stage] / "_SUCCESS.json").exists()
        assert (out / stage / old[stage] / "_SUCCESS.json").exists()  # old results are kept
    after = {p: v for p, v in snapshot(out).items() if p.startswith(f"sketch/{old['sketch']}/")}
    assert after == sketch_before


def test_corrupted_byte_fails_verify_and_a_rerun_repairs_only_that_shard(tiny_run, model_cache):
    out, _ = tiny_run
    key = resolve_keys(load_config("tiny", {"models.cache_dir": model_cache}))["generate"]
    folder = out / "generate" / key
    tar = folder / "shards" / "000000.tar"
    original = tar.read_bytes()
    content = {name: (folder / name).read_bytes() for name in ("manifests/000000.parquet", "stats/000000.json")}
    data = bytearray(original)
    data[len(data) // 2] ^= 0x01
    tar.write_bytes(bytes(data))
    proc = cli("verify", str(out), check=False)
    assert proc.returncode == 1
    assert f"generate/{key}/shards/000000.tar" in proc.stdout and "sha256" in proc.stdout

    before = snapshot(out)
    cli(*tiny_args(out, model_cache))
    after = snapshot(out)
    changed = {p for p in after if before.get(p) != after[p]}
    prefix = f"generate/{key}/"
    assert {p[len(prefix):] for p in changed} == {
        "shards/000000.tar", "manifests/000000.parquet", "timings/000000.json", "stats/000000.json", "_SUCCESS.json",
    }, sorted(changed)
    assert tar.read_bytes() == original  # same seed, same bytes
    # the manifest and marker too: they hold no wall-clock value (timings/ does)
    assert {name: (folder / name).read_bytes() for name in content} == content
    assert cli("verify", str(out)).returncode == 0


def test_force_recomputes_that_stage_and_what_reads_it(tiny_run, model_cache):
    out, _ = tiny_run
    keys = resolve_keys(load_config("tiny", {"models.cache_dir": model_cache}))
    before = snapshot(out)
    cli(*tiny_args(out, model_cache, "--force", "elaborate"))
    after = snapshot(out)
    changed = {p for p in after if before.get(p) != after[p]}
    # elaborate and finetune (which reads it) are rewritten; sketch and generate are not touched
    recomputed = (f"elaborate/{keys['elaborate']}/", f"finetune/{keys['finetune']}/")
    assert changed and all(p.startswith(recomputed) for p in changed), sorted(changed)
    assert f"elaborate/{keys['elaborate']}/shards/000000.tar" in changed
    assert f"finetune/{keys['finetune']}/_SUCCESS.json" in changed
    assert cli("verify", str(out)).returncode == 0


def test_only_a_stage_whose_upstream_is_missing_names_it(tmp_path, model_cache):
    proc = cli(*tiny_args(tmp_path / "empty", model_cache, "--only", "generate"), check=False)
    assert proc.returncode == 2
    assert "'generate' needs 'sketch'" in proc.stderr and "--only" in proc.stderr
    # checked before the flow starts: one line, no Prefect traceback
    assert "Traceback" not in proc.stdout + proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_bad_config_fails_before_any_work(tmp_path):
    proc = cli("run", "--preset", "tiny", "--out", str(tmp_path / "x"), "--set", "generate.roundz=2", check=False)
    assert proc.returncode == 2
    assert "generate.roundz" in proc.stderr and "rounds" in proc.stderr
    assert not (tmp_path / "x").exists()


def _manifest_hash(root: Path, stage: str, key: str) -> str:
    h = hashlib.sha256()
    for p in sorted((root / stage / key / "manifests").glob("*.parquet")):
        h.update(p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_sketch_manifest_hash(tmp_path, model_cache):
    cfg = load_config("tiny", {"models.cache_dir": model_cache})
    key = resolve_keys(cfg)["sketch"]
    run_local(cfg, str(tmp_path / "a"), only=["sketch"], log=lambda m: None)
    run_local(cfg, str(tmp_path / "b"), only=["sketch"], log=lambda m: None)
    assert _manifest_hash(tmp_path / "a", "sketch", key) == _manifest_hash(tmp_path / "b", "sketch", key)
    other = load_config("tiny", {"models.cache_dir": model_cache, "seed": "1"})
    other_key = resolve_keys(other)["sketch"]
    assert other_key != key
    run_local(other, str(tmp_path / "c"), only=["sketch"], log=lambda m: None)
    assert _manifest_hash(tmp_path / "c", "sketch", other_key) != _manifest_hash(tmp_path / "a", "sketch", key)


def test_stage_counts_and_report_published_as_prefect_artifacts(tiny_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.stage_tasks import artifact_key

    out, _ = tiny_run
    key = {s: artifact_key(s, str(out)) for s in STAGE_ORDER}  # per stage and output root
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(key.values()))))
    by_key = {a.key: a.data for a in arts}
    assert set(by_key) == set(key.values())
    assert "| kept |" in by_key[key["sketch"]]
    assert "FPR95" in by_key[key["finetune"]] and "AUROC" in by_key[key["finetune"]]
    assert "base64" not in by_key[key["finetune"]]  # plots linked, not inlined

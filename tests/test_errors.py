"""Errors name the bad input and what to check."""

import pytest

from flows.cli import main
from ood_core.config import load_config
from ood_core.pipeline import StageNotReady, run_local


def test_unloadable_model_fails_the_stage_naming_the_model(tmp_path):
    cfg = load_config("tiny", {"models.cache_dir": str(tmp_path / "m"), "models.mllm.name": str(tmp_path / "nope")})
    with pytest.raises(RuntimeError) as err:
        run_local(cfg, str(tmp_path / "run"), only=["sketch"], log=lambda m: None)
    msg = str(err.value)
    assert "mllm" in msg and str(tmp_path / "nope") in msg and "models.mllm" in msg
    assert not list((tmp_path / "run").glob("sketch/*/_SUCCESS.json"))


def test_only_downstream_stage_without_upstream_names_the_missing_stage(tmp_path):
    cfg = load_config("tiny", {"models.cache_dir": str(tmp_path / "m")})
    with pytest.raises(StageNotReady, match="'finetune' needs 'sketch'"):
        run_local(cfg, str(tmp_path / "run"), only=["finetune"], log=lambda m: None)


def test_missing_imagefolder_names_the_folder(tmp_path):
    cfg = load_config("tiny", {"data.id_source": "imagefolder", "data.root": str(tmp_path / "imagenet")})
    from ood_core.preflight import PreflightError

    # found by the preflight now, before any model load (it was a DataError from the first stage)
    with pytest.raises(PreflightError, match=r"imagenet/train does not exist.*set data.root"):
        run_local(cfg, str(tmp_path / "run"), only=["sketch"], log=lambda m: None)


def test_passing_failure_fails_the_shard_instead_of_recording_a_failed_row(tmp_path, monkeypatch):
    from ood_core.models import RetryableError
    from ood_core.stages.sketch import SketchStage
    from ood_core.storage import StageStore

    def endpoint_down(self, ctx, out, item, key):
        raise RetryableError("MLLM endpoint http://127.0.0.1:9/v1 failed: ConnectError")

    monkeypatch.setattr(SketchStage, "_context", endpoint_down)
    cfg = load_config("tiny", {"models.cache_dir": str(tmp_path / "m")})
    with pytest.raises(RetryableError, match="ConnectError"):
        run_local(cfg, str(tmp_path / "run"), only=["sketch"], log=lambda m: None)
    from ood_core.pipeline import resolve_keys

    store = StageStore(str(tmp_path / "run"), "sketch", resolve_keys(cfg)["sketch"])
    n = store.read_json(store.path("plan.json"))["shards"]
    context_shards = [i for i in range(n) if store.read_json(store.path("plans", f"{i:06d}.json"))[0]["kind"] == "context"]
    assert context_shards and not set(context_shards) & set(store.shard_indices())
    monkeypatch.undo()
    run_local(cfg, str(tmp_path / "run"), only=["sketch"], log=lambda m: None)
    assert store.is_valid()


def test_flow_with_only_on_missing_upstream_fails_at_once_naming_it(tmp_path):
    """`-p only='["elaborate"]'` on a root without generate's folder: the flow fails before any work."""
    from flows.synth_ood import synth_ood
    from ood_core.pipeline import resolve_keys
    from ood_core.storage import StageStore

    out = tmp_path / "run"
    overrides = {"models.cache_dir": str(tmp_path / "m")}
    sketch = StageStore(str(out), "sketch", resolve_keys(load_config("tiny", overrides))["sketch"])
    sketch.write_json(sketch.success_path(), {})  # sketch done, generate missing
    with pytest.raises(StageNotReady) as err:
        synth_ood.fn(preset="tiny", out=str(out), only=["elaborate"], overrides=overrides)
    msg = str(err.value)
    assert "stage 'elaborate' needs 'generate'" in msg and str(out / "generate") in msg
    assert """-p only='["generate", "elaborate"]'""" in msg
    # no preflight, run record or stage folder (the data index is the run's first step, before the check)
    assert sorted(p.name for p in out.iterdir()) == ["index", "sketch"]


# ---------------------------------------------------------------- the CLI: one line, --debug for the traceback
def _failure(capsys) -> str:
    """The one ``synth-ood:`` line a failed command printed (library warnings may precede it)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("synth-ood:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]


def _endpoint_run(tmp_path, url: str, *more: str) -> list[str]:
    sets = {"models.cache_dir": str(tmp_path / "m"), "models.mllm.backend": "openai", "models.mllm.name": "m",
            "models.mllm.base_url": url, "models.mllm.api_key_env": "SYNTHOOD_ERRORS_KEY",
            "models.endpoint.backoff_initial": "0.01", "models.endpoint.backoff_max": "0.02"}
    args = ["run", "--preset", "tiny", "--out", str(tmp_path / "run"), "--only", "sketch", "--no-prefect", *more]
    return args + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]


@pytest.mark.parametrize(
    "script,default,reply",
    [([], "429", "HTTP 429"), (["500"] * 6, "ok", "HTTP 500")],
    ids=["all_429", "500_first_6"],
)
def test_an_endpoint_down_without_prefect_is_one_line_naming_the_shard(script, default, reply, tmp_path, capsys):
    from tests.fault_server import FaultServer

    with FaultServer(script, default=default) as srv:
        assert main(_endpoint_run(tmp_path, srv.url)) == 1
    line = _failure(capsys)
    assert line.startswith(f"synth-ood: sketch shard 0 ({tmp_path / 'run' / 'sketch'}/")
    assert "EndpointDown" in line and srv.url in line and reply in line and "failed after 6 attempts" in line
    assert "rerun the same command to resume" in line and line.endswith("(--debug: traceback)")


def test_all_401_fails_the_preflight_or_is_one_line_naming_the_candidates(tmp_path, capsys, monkeypatch):
    from tests.fault_server import FaultServer

    monkeypatch.setenv("SYNTHOOD_ERRORS_KEY", "sk-errors-0a1b2c3d4e")
    with FaultServer(default="401", models="401") as srv:  # /models refuses the key too: found in seconds
        assert main(_endpoint_run(tmp_path, srv.url)) == 2
        assert not srv.log  # no chat request was sent
    line = _failure(capsys)
    assert "preflight" in line and "rejected the key from $SYNTHOOD_ERRORS_KEY" in line and "sk-errors" not in line
    with FaultServer(default="401") as srv:  # a server whose model list is open: every candidate fails
        assert main(_endpoint_run(tmp_path, srv.url)) == 1
    line = _failure(capsys)
    assert "sketch shard" in line and "candidates failed" in line and "HTTP 401" in line and "sk-errors" not in line


def test_a_full_disk_is_one_line_naming_the_root(tmp_path, capsys, monkeypatch):
    import errno

    from fsspec.implementations.local import LocalFileSystem

    real_open = LocalFileSystem._open

    def full(self, path, mode="rb", **kw):
        if "w" in mode and "/shards/.tmp-" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(self, path, mode, **kw)

    monkeypatch.setattr(LocalFileSystem, "_open", full)
    out = tmp_path / "run"
    args = ["run", "--preset", "tiny", "--out", str(out), "--only", "sketch", "--no-prefect",
            "--set", f"models.cache_dir={tmp_path / 'm'}"]
    assert main(args) == 1
    line = _failure(capsys)
    assert line.startswith("synth-ood: no space left on the device writing ") and "/shards/000000.tar" in line
    assert f"free space under {out}" in line and "[Errno" not in line


def test_an_open_clip_load_error_is_one_line_naming_the_setting_and_debug_shows_the_traceback(tmp_path, capsys):
    weights = tmp_path / "clip.bin"
    weights.write_bytes(b"not a checkpoint")
    args = ["run", "--preset", "tiny", "--out", str(tmp_path / "run"), "--only", "sketch", "--no-prefect",
            "--set", f"models.cache_dir={tmp_path / 'm'}", "--set", f"models.clip.pretrained={weights}"]
    assert main(args) == 1
    line = _failure(capsys)
    assert line.startswith(f"synth-ood: could not load the clip model 'synthood-tiny-vit:{weights}'")
    assert "Check models.clip.pretrained" in line
    assert main(["--debug", *args]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ModelLoadError" in err
    assert err.strip().splitlines()[-1].startswith("synth-ood: could not load the clip model")
    assert main([*args, "--debug"]) == 1 and "Traceback" in capsys.readouterr().err  # after the command too


def test_an_interrupt_is_one_line_with_what_to_do(tmp_path, capsys, monkeypatch):
    import ood_core.pipeline

    def interrupted(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(ood_core.pipeline, "run_local", interrupted)
    try:
        rc = main(["run", "--out", str(tmp_path / "run"), "--no-prefect", "--set", f"models.cache_dir={tmp_path / 'm'}"])
    except KeyboardInterrupt:
        pytest.fail("the interrupt came out of the CLI as a traceback")
    assert rc == 130
    assert "rerun the same command to resume" in _failure(capsys)


def test_prefect_console_lines_keep_their_message_but_not_the_traceback():
    import io
    import logging

    from prefect.logging.handlers import PrefectConsoleHandler

    from flows.cli import console_without_tracebacks

    logger = logging.getLogger("synth-ood-test-console")
    logger.propagate = False
    console, other = io.StringIO(), io.StringIO()
    logger.handlers = [PrefectConsoleHandler(stream=console), logging.StreamHandler(other)]
    console_without_tracebacks(logger)
    console_without_tracebacks(logger)  # idempotent
    try:
        raise ValueError("planted failure")
    except ValueError:
        logger.error("Task run failed with exception: planted", exc_info=True)
    assert "Task run failed with exception: planted" in console.getvalue()
    assert "Traceback" not in console.getvalue() and "planted failure" not in console.getvalue()
    assert "Traceback" in other.getvalue() and "planted failure" in other.getvalue()  # e.g. the API's handler


@pytest.mark.slow
def test_a_failed_prefect_run_prints_no_traceback_and_ends_with_one_line(tmp_path):
    """Under Prefect (the default), the console keeps Prefect's one-line state messages only."""
    import os
    import subprocess
    import sys

    from tests.fault_server import FaultServer

    with FaultServer(default="429") as srv:
        args = _endpoint_run(tmp_path, srv.url)
        args.remove("--no-prefect")
        proc = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-4000:]
    last = proc.stderr.strip().splitlines()[-1]
    # Prefect's "Stopping temporary server" may follow: the synth-ood line is the last of ours
    ours = [line for line in proc.stderr.splitlines() if line.startswith("synth-ood:")]
    assert len(ours) == 1 and "sketch shard 0" in ours[0] and "HTTP 429" in ours[0], (ours, last)


def test_the_failure_line_is_scrubbed_and_flat():
    from flows.cli import failure_line

    err = ConnectionError("cannot reach http://alice:pw-line-secret@10.0.0.1/v1\n  retrying gave up")
    line = failure_line(err)
    assert line.startswith("synth-ood: ConnectionError: cannot reach http://") and "\n" not in line
    assert "pw-line-secret" not in line and line.endswith("retrying gave up")

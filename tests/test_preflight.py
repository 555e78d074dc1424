"""Preflight: every problem a run would meet late is reported before any model is loaded."""

from __future__ import annotations

import socket

import pytest

from flows.cli import main
from ood_core.config import load_config
from ood_core.pipeline import run_local
from ood_core.preflight import PreflightError, preflight
from ood_core.stages.base import ModelHub


@pytest.fixture(autouse=True)
def _no_models_loaded():
    ModelHub.release()
    yield
    ModelHub.release()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tiny_preset_passes(tmp_path):
    cfg = load_config("tiny", {"models.cache_dir": str(tmp_path / "m")})
    assert preflight(cfg, str(tmp_path / "out")) == ["data", "ood_sets", "models", "output"]
    assert not ModelHub._cache


def test_every_problem_is_listed_at_once_before_any_model_loads(tmp_path):
    cfg = load_config(
        "tiny",
        {
            "models.cache_dir": str(tmp_path / "m"),
            "data.ood_sets": "[tiny-textures, iNaturalist]",
            "models.diffusion.name": str(tmp_path / "no-such-model"),
            "models.mllm.backend": "openai",
            "models.mllm.base_url": f"http://127.0.0.1:{_free_port()}/v1",
        },
    )
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PreflightError) as err:
        run_local(cfg, str(blocker / "out"), log=lambda m: None)
    msg = str(err.value)
    assert "4 problem(s)" in msg
    assert "unknown OOD set 'iNaturalist'" in msg and "data.ood_root" in msg
    assert "no-such-model does not exist" in msg
    assert "endpoint http://127.0.0.1:" in msg and "not reachable" in msg
    assert "is not writable" in msg
    assert not ModelHub._cache  # nothing was loaded
    assert not (tmp_path / "m").exists()  # not even a tiny model was built


def test_missing_data_root_and_ood_folder(tmp_path):
    (tmp_path / "ood").mkdir()
    cfg = load_config(
        "tiny",
        {
            "data.id_source": "imagefolder",
            "data.root": str(tmp_path / "imagenet"),
            "data.ood_root": str(tmp_path / "ood"),
            "data.ood_sets": "[SUN]",
        },
    )
    with pytest.raises(PreflightError) as err:
        preflight(cfg, str(tmp_path / "out"))
    assert f"{tmp_path / 'imagenet' / 'train'} does not exist" in str(err.value)
    assert f"folder of OOD set 'SUN' does not exist: {tmp_path / 'ood' / 'SUN'}" in str(err.value)


def test_offline_hub_id_not_in_the_cache_says_how_to_preseed(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = load_config("tiny", {"models.diffusion.name": "sd2-community/stable-diffusion-2-inpainting"})
    with pytest.raises(PreflightError) as err:
        preflight(cfg, str(tmp_path / "out"))
    msg = str(err.value)
    assert "models.diffusion.name: 'sd2-community/stable-diffusion-2-inpainting' is not in" in msg
    assert "hf download sd2-community/stable-diffusion-2-inpainting" in msg and "HF_HUB_OFFLINE" in msg


def test_offline_hub_id_in_the_cache_passes(tmp_path, monkeypatch):
    """A pre-seeded HF cache (the layout `hf download` writes) is found with HF_HUB_OFFLINE=1."""
    from huggingface_hub import constants

    repo = "sd2-community/stable-diffusion-2-inpainting"
    hub = tmp_path / "hub"
    snap = hub / "models--sd2-community--stable-diffusion-2-inpainting" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "model_index.json").write_text("{}")
    (snap.parent.parent / "refs").mkdir()
    (snap.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    cfg = load_config("tiny", {"models.diffusion.name": repo})
    assert "models" in preflight(cfg, str(tmp_path / "out"))
    # models.cache_dir, when set, is the cache looked in instead
    cfg = load_config("tiny", {"models.diffusion.name": repo, "models.cache_dir": str(tmp_path / "elsewhere")})
    with pytest.raises(PreflightError, match="models.cache_dir="):
        preflight(cfg, str(tmp_path / "out"))


def test_cli_stops_with_one_message_and_no_traceback(tmp_path, capsys):
    rc = main(["run", "--preset", "tiny", "--out", str(tmp_path / "out"), "--no-prefect", "--set", "data.ood_sets=[Places]"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "unknown OOD set 'Places'" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "sketch").exists()


def test_a_removed_hub_id_names_its_mirror(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = load_config("tiny", {"models.diffusion.name": "stabilityai/stable-diffusion-2-inpainting"})
    with pytest.raises(PreflightError, match="removed from the hub.*sd2-community/stable-diffusion-2-inpainting"):
        preflight(cfg, str(tmp_path / "out"))


@pytest.mark.parametrize("preset", ["imagenet", "food101"])
def test_presets_name_no_removed_model(preset):
    from ood_core.preflight import MOVED_IDS

    cfg = load_config(preset)
    assert cfg.models.diffusion.name == "sd2-community/stable-diffusion-2-inpainting"
    assert not {cfg.models.mllm.name, cfg.models.diffusion.name} & set(MOVED_IDS)

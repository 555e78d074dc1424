"""Malformed presets are one ``synth-ood:`` line naming file, line and column; exit 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from flows.cli import main

BAD_PRESETS = {
    "unclosed": ("data:\n  ood_sets: [a, b\nmodels: {}\n", ":3:7:", "expected ',' or ']'"),
    "tabs": ("data:\n\tid_source: skimage\n", ":2:1:", "tabs cannot indent"),
    "list": ("- data\n- models\n", ":1:1:", "not a list"),
    "scalar": ("just a string\n", ":1:1:", "not a single value"),
    "python_tag": ("seed: !!python/object/apply:os.system ['echo owned']\n", ":1:7:", "python/object"),
}


@pytest.mark.parametrize("name", sorted(BAD_PRESETS))
def test_malformed_preset_is_one_line(name, tmp_path, capsys):
    text, where, what = BAD_PRESETS[name]
    preset = tmp_path / f"{name}.yaml"
    preset.write_text(text)
    assert main(["run", "--preset", str(preset), "--out", str(tmp_path / "out"), "--no-prefect"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"synth-ood: {preset}{where}") and what in err[0], err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_malformed_preset_under_prefect_cli_has_no_traceback(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text(BAD_PRESETS["python_tag"][0])
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--preset", str(preset), "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr + proc.stdout
    assert proc.stderr.strip().startswith(f"synth-ood: {preset}:1:7:") and "owned" not in proc.stdout


def test_unparseable_set_value_is_one_line(tmp_path, capsys):
    assert main(["run", "--preset", "tiny", "--out", str(tmp_path / "o"), "--set", "data.ood_sets=[a, b"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--set data.ood_sets=[a, b" in err[0]


def test_no_pickles_anywhere_in_the_project():
    """Weights and tensors load without executing code: no pickle, no torch.load without weights_only."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sources = [p for d in ("ood_core", "flows", "tasks", "schemas") for p in (root / d).rglob("*.py")]
    assert sources
    for p in sources:
        text = p.read_text()
        assert not re.search(r"^\s*(import|from)\s+(c?pickle|dill|joblib)\b", text, re.M), p
        assert "allow_pickle=True" not in text, p
        assert "torch.save(" not in text, p
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (p, call)


def test_api_key_from_a_named_secret_store_or_the_environment(monkeypatch):
    from ood_core import secrets

    monkeypatch.setattr(secrets, "_RESOLVER", None)
    with pytest.raises(secrets.SecretError, match="needs the Prefect runner"):
        secrets.resolve_api_key("X", "my-block")
    monkeypatch.setattr(secrets, "_RESOLVER", {"my-block": "sk-from-block-1234"}.__getitem__)
    assert secrets.resolve_api_key("X", "my-block") == "sk-from-block-1234"
    assert secrets.scrub("echo sk-from-block-1234") == "echo ***"  # a resolved key is scrubbed from now on
    with pytest.raises(secrets.SecretError, match="'other'") as err:
        secrets.resolve_api_key("X", "other")
    assert err.value.__cause__ is None
    monkeypatch.setenv("SYNTHOOD_ENV_KEY", "sk-from-env-5678")
    assert secrets.resolve_api_key("SYNTHOOD_ENV_KEY") == "sk-from-env-5678"


def test_prefect_tasks_install_the_secret_block_resolver():
    from ood_core import secrets
    from tasks import stage_tasks

    assert secrets._RESOLVER is stage_tasks._prefect_secret


# ---------------------------------------------------------------- inverted ranges, duplicate keys
def _preset(tmp_path, text: str):
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    return preset


def test_inverted_energy_band_in_a_preset_names_the_key_and_its_line(tmp_path, capsys):
    preset = _preset(tmp_path, "seed: 0\nelaborate:\n  dedup_cosine: 0.99\n  energy_band: [-1.0, -5.0]\n")
    out = tmp_path / "out"
    assert main(["run", "--preset", str(preset), "--out", str(out), "--no-prefect"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"synth-ood: invalid configuration: {preset}:4:3: ")
    assert "'elaborate.energy_band'" in err[0] and "(-1) is above" in err[0] and "(-5)" in err[0]
    assert not out.exists()  # refused before any work, not in finetune minutes later


@pytest.mark.parametrize(
    "overrides,key,where",
    [
        ({"elaborate.energy_band": "[0.5, -0.5]"}, "'elaborate.energy_band'", "override elaborate.energy_band="),
        ({"models.endpoint.backoff_initial": "5", "models.endpoint.backoff_max": "1"},
         "models.endpoint.backoff_initial (5) is above models.endpoint.backoff_max (1)", "override models.endpoint."),
        ({"data.min_side": "100", "data.max_pixels": "5000"}, "data.min_side squared (10000) is above data.max_pixels",
         "override data."),
        ({"elaborate.energy_band": "[.nan, 1]"}, "'elaborate.energy_band'", "override elaborate.energy_band="),
    ],
    ids=["energy_band", "backoff", "min_side-max_pixels", "nan"],
)
def test_every_inverted_pair_of_settings_is_refused(overrides, key, where):
    from ood_core.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config("tiny", overrides)
    assert key in str(err.value) and where in str(err.value) and "swap or fix" in str(err.value)


def test_ordered_ranges_pass():
    from ood_core.config import load_config

    cfg = load_config("tiny", {"elaborate.energy_band": "[-5, -1]", "models.endpoint.backoff_initial": "1",
                               "models.endpoint.backoff_max": "1"})
    assert cfg.elaborate.energy_band == (-5.0, -1.0)


@pytest.mark.parametrize(
    "text,where",
    [
        ("sketch:\n  far_labels: 3\n  shard_size: 4\n  far_labels: 5\n", ":4:3:"),
        ("sketch: {far_labels: 3, far_labels: 4}\n", ":1:25:"),
        ("seed: 1\nsketch: {far_labels: 3}\nseed: 2\n", ":3:1:"),
    ],
    ids=["block", "flow", "top-level"],
)
def test_duplicate_key_in_a_preset_names_the_key_file_and_both_lines(text, where, tmp_path, capsys):
    preset = _preset(tmp_path, text)
    assert main(["run", "--preset", str(preset), "--out", str(tmp_path / "out"), "--no-prefect"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"synth-ood: {preset}{where} duplicate key '"), err
    key = "seed" if text.startswith("seed") else "sketch.far_labels"
    assert f"duplicate key '{key}' (first at line " in err[0]
    assert not (tmp_path / "out").exists()


def test_a_merge_key_overriding_its_anchor_is_not_a_duplicate(tmp_path):
    from ood_core.config import load_config

    preset = _preset(tmp_path, (
        "models:\n  mllm: &m {backend: transformers, name: 'tiny://llava', max_new_tokens: 24}\n"
        "elaborate:\n  mllm: {<<: *m, max_new_tokens: 8}\n"
    ))
    cfg = load_config(str(preset))
    assert cfg.elaborate.mllm.max_new_tokens == 8 and cfg.models.mllm.max_new_tokens == 24


def test_duplicate_set_keys_are_refused(tmp_path, capsys):
    out = str(tmp_path / "o")
    # --only finetune: had the duplicate passed, the missing upstream would stop the run at once
    run = ["run", "--out", out, "--no-prefect", "--only", "finetune"]
    assert main([*run, "--set", "sketch.far_labels=3", "--set", "sketch.far_labels=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["synth-ood: --set sketch.far_labels given twice (sketch.far_labels=3 and sketch.far_labels=5); "
                   "give it once"]
    assert main([*run, "--set", "data.ood_sets={a: 1, a: 2}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "duplicate key 'a' in the value" in err[0]
    assert not (tmp_path / "o").exists()

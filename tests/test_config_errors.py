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

"""Overrides as users type them: `--set KEY=VALUE` strings and JSON values from `prefect deployment run -p`."""

from __future__ import annotations

import json

import pytest

from ood_core.config import ConfigError, load_config


def _deployment_schema() -> dict:
    """The parameter schema Prefect stores for the `synth-ood` deployments (what `-p` is checked against)."""
    from prefect.utilities.callables import parameter_schema_from_entrypoint

    return parameter_schema_from_entrypoint("flows/synth_ood.py:synth_ood").model_dump_for_openapi()


def test_json_numbers_booleans_and_lists_pass_prefects_parameter_check():
    from prefect.utilities.schema_tools.validation import validate

    # exactly what `prefect deployment run -p overrides='{"generate.rounds": 4, ...}'` sends
    params = {"overrides": json.loads('{"generate.rounds": 4, "elaborate.energy_band": [-3, 5], "sketch.near_images": 0}')}
    assert validate(params, _deployment_schema(), raise_on_error=True) == []
    cfg = load_config("tiny", params["overrides"])
    assert cfg.generate.rounds == 4 and cfg.elaborate.energy_band == (-3.0, 5.0) and cfg.sketch.near_images == 0


def test_json_values_and_set_strings_give_the_same_config():
    typed = load_config("tiny", {"generate.rounds": 4, "generate.strength": 0.5, "elaborate.energy_band": [-3, 5]})
    strings = load_config("tiny", ["generate.rounds=4", "generate.strength=0.5", "elaborate.energy_band=[-3, 5]"])
    assert typed == strings


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"generate.rounds": 0}, "bad value for 'generate.rounds'"),
        ({"generate.rounds": [1, 2]}, "bad value for 'generate.rounds'"),
        ({"generate.mask": True}, "bad value for 'generate.mask'"),
        ({"generate.round_s": 4}, "unknown key 'generate.round_s'"),
    ],
)
def test_bad_json_values_get_the_configs_own_messages(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny", overrides)

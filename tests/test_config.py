import pytest

from ood_core.config import ConfigError, available_presets, load_config


def test_presets_validate():
    assert {"tiny", "imagenet", "food101"} <= set(available_presets())
    for name in ("tiny", "imagenet", "food101"):
        cfg = load_config(name)
        assert cfg.preset == name


def test_food101_preset_is_mm_ood_paper_setting_and_the_old_one_has_a_name():
    cfg = load_config("food101")
    # the OOD sets EOE (args_pool.py) and MCM use for Food-101, LLaVA-1.5 (the paper's headline), L = 500
    assert cfg.data.ood_sets == ["iNaturalist", "SUN", "Places", "Textures"]
    assert cfg.models.mllm.name == "llava-hf/llava-1.5-7b-hf"
    assert cfg.sketch.far_labels == 500
    old = load_config("food101-cub-dogs-pets")
    assert old.data.ood_sets == ["CUB-200", "Stanford-Dogs", "Oxford-Pets"]
    assert old.models.mllm.name == "Qwen/Qwen2-VL-7B-Instruct" and old.sketch.far_labels == 100
    assert old.data.root == cfg.data.root and old.data.images_per_class == cfg.data.images_per_class


def test_set_overrides_any_field_with_typed_values():
    cfg = load_config("tiny", ["generate.rounds=1", "elaborate.energy_band=[-3, 5]", "models.device=cpu"])
    assert cfg.generate.rounds == 1
    assert cfg.elaborate.energy_band == (-3.0, 5.0)


def test_unknown_key_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["generate.roundz=2"])
    msg = str(err.value)
    assert "generate.roundz" in msg and "rounds" in msg and "strength" in msg


def test_bad_value_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config("tiny", ["models.device=tpu"])
    assert "models.device" in str(err.value) and "'cuda'" in str(err.value)
    with pytest.raises(ConfigError, match="generate.rounds"):
        load_config("tiny", ["generate.rounds=0"])


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("nope")


def test_malformed_override():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_config("tiny", ["generate.rounds"])


def test_value_combinations_fail_before_any_work():
    with pytest.raises(ConfigError, match="models.mllm.base_url"):
        load_config("tiny", ["models.mllm.backend=openai"])
    with pytest.raises(ConfigError, match="data.root"):
        load_config("tiny", ["data.id_source=imagefolder"])
    cfg = load_config("tiny", ["models.mllm.backend=openai", "models.mllm.base_url=http://127.0.0.1:8000/v1"])
    assert cfg.models.mllm.base_url.endswith("/v1")

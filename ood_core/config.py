"""Typed run configuration: presets in YAML, validated before any work starts.

A preset lives in ``deploy/presets/<name>.yaml``. ``load_config`` reads it, applies
``--set a.b=value`` overrides and validates the result into :class:`RunConfig`. Any unknown
key or bad value raises :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PRESET_DIR = Path(__file__).resolve().parent.parent / "deploy" / "presets"


class ConfigError(ValueError):
    """A preset or override is invalid; the message names the key and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- models
class ClipSpec(_Strict):
    backend: Literal["open_clip"] = "open_clip"
    name: str = "ViT-B-16"
    pretrained: str = "openai"


class MLLMSpec(_Strict):
    backend: Literal["transformers", "openai"] = "transformers"
    name: str = "llava-hf/llava-1.5-7b-hf"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_new_tokens: int = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0.0)

    @model_validator(mode="after")
    def _endpoint_needs_url(self) -> MLLMSpec:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs models.mllm.base_url (e.g. http://host:8000/v1)")
        return self


class DiffusionSpec(_Strict):
    backend: Literal["sd-inpaint"] = "sd-inpaint"
    name: str = "stabilityai/stable-diffusion-2-inpainting"
    resolution: int = Field(512, ge=16)


class ModelsConfig(_Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    cache_dir: str = "~/.cache/synth-ood/models"
    clip: ClipSpec = ClipSpec()
    mllm: MLLMSpec = MLLMSpec()
    diffusion: DiffusionSpec = DiffusionSpec()


# ---------------------------------------------------------------- data
class DataConfig(_Strict):
    id_source: Literal["skimage", "imagefolder"] = "skimage"
    root: str | None = None
    classnames: Literal["imagenet", "folder"] = "folder"
    max_classes: int | None = Field(None, ge=1)
    images_per_class: int = Field(24, ge=2)
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    image_size: int = Field(64, ge=16)
    ood_sets: list[str] = ["tiny-textures", "tiny-objects"]
    ood_root: str | None = None

    @model_validator(mode="after")
    def _folder_needs_root(self) -> DataConfig:
        if self.id_source == "imagefolder" and not self.root:
            raise ValueError("id_source 'imagefolder' needs data.root (a folder with train/<class>/ images)")
        return self


# ---------------------------------------------------------------- stages
class SketchConfig(_Strict):
    far_labels: int = Field(100, ge=0)
    far_per_turn: int = Field(50, ge=1)
    near_per_class: int = Field(3, ge=0)
    near_images: int = Field(0, ge=0)
    max_label_words: int = Field(3, ge=1)
    lexicon: Literal["wordnet", "imagenet21k"] = "imagenet21k"
    lexicon_limit: int | None = Field(None, ge=1)
    neg_keep_fraction: float = Field(0.15, gt=0.0, le=1.0)
    neg_percentile: float = Field(95.0, ge=0.0, le=100.0)
    overlap_cosine: float = Field(0.85, ge=0.0, le=1.0)
    sources_per_class: int = Field(50, ge=1)
    context_max_chars: int = Field(73, ge=1)
    eval_ood_names: list[str] = []
    shard_size: int = Field(64, ge=1)


class GenerateConfig(_Strict):
    steps: int = Field(20, ge=1)
    strength: float = Field(0.6, gt=0.0, le=1.0)
    guidance: float = Field(8.0, ge=0.0)
    rounds: int = Field(3, ge=1)
    lr: float = Field(10.0, ge=0.0)
    m_out: float = -5.0
    mask: Literal["full", "box"] = "full"
    shard_size: int = Field(16, ge=1)
    # the generation round (e.g. a nightly run's date; not the `rounds` of noise optimisation):
    # folded into generate's seed and key, so each round makes new data while sketch is reused
    round: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$")


class ElaborateConfig(_Strict):
    max_id_confidence: float = Field(0.9, ge=0.0, le=1.0)
    energy_band: tuple[float, float] | None = None
    dedup_cosine: float = Field(0.98, ge=0.0, le=1.0)
    shard_size: int = Field(64, ge=1)


class FinetuneConfig(_Strict):
    epochs: int = Field(3, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(1e-5, ge=0.0)
    text_epochs: int = Field(5, ge=0)
    text_lr: float = Field(2e-2, gt=0.0)
    logit_scale: float = Field(100.0, gt=0.0)
    neglabel_groups: int = Field(100, ge=1)
    neglabel_tau: float = Field(0.01, gt=0.0)
    mcm_temperature: float = Field(1.0, gt=0.0)
    fpr_convention: Literal["openood", "mcm"] = "openood"
    loss: Literal["ce", "ce+contrastive"] = "ce"  # ce+contrastive: the Multi-OS objective


class RunConfig(_Strict):
    preset: str = "custom"
    seed: int = 0
    data: DataConfig = DataConfig()
    models: ModelsConfig = ModelsConfig()
    sketch: SketchConfig = SketchConfig()
    generate: GenerateConfig = GenerateConfig()
    elaborate: ElaborateConfig = ElaborateConfig()
    finetune: FinetuneConfig = FinetuneConfig()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


# ---------------------------------------------------------------- loading
def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _set_path(tree: dict, dotted: str, raw: Any) -> None:
    """Set ``a.b.c``; a string is parsed as YAML (``--set``), JSON values (numbers, lists) are kept."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is a value, not a section")
        node = child
    value = yaml.safe_load(raw) if isinstance(raw, str) and raw != "" else raw
    # YAML reads 2026-11-22 as a date; no config field is a date, so such a value stays text
    node[keys[-1]] = raw if isinstance(value, datetime.date) else value


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["a.b=1", ...]`` -> ``{"a.b": "1"}``; values are parsed as YAML scalars later."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set generate.rounds=2")
        key, value = item.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def _explain(err: ValidationError, model: type[BaseModel]) -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _section(model, e["loc"][:-1])
            allowed = ", ".join(sorted(parent.model_fields)) if parent else "?"
            lines.append(f"unknown key '{key}' (allowed here: {allowed})")
        elif e["type"] == "value_error":
            lines.append(f"bad combination in '{key}': {e['msg'].removeprefix('Value error, ')}")
        else:
            lines.append(f"bad value for '{key}': {e['msg']} (got {e.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _section(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(
            field.annotation, BaseModel
        ):
            return None
        model = field.annotation
    return model


def validate_config(tree: dict[str, Any]) -> RunConfig:
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err, RunConfig)) from None


def load_config(preset: str, overrides: dict[str, Any] | list[str] | None = None) -> RunConfig:
    """Load ``deploy/presets/<preset>.yaml`` (or a YAML path) and apply dotted overrides.

    Override values are strings as typed after ``--set`` or JSON values as typed after
    ``prefect deployment run -p overrides='{"generate.rounds": 4}'``; both are validated by the config.
    """
    path = Path(preset)
    if not path.suffix:
        path = PRESET_DIR / f"{preset}.yaml"
    if not path.exists():
        raise ConfigError(
            f"unknown preset '{preset}': choose one of {', '.join(available_presets())} "
            f"or pass a path to a YAML file"
        )
    tree = yaml.safe_load(path.read_text()) or {}
    tree.setdefault("preset", path.stem)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _set_path(tree, key, value)
    return validate_config(tree)

"""Typed run configuration: presets in YAML, validated before any work starts.

A preset lives in ``deploy/presets/<name>.yaml``. ``load_config`` reads it, applies
``--set a.b=value`` overrides and validates the result into :class:`RunConfig`. Any unknown
key or bad value raises :class:`ConfigError` naming the key and what is allowed.
"""

from __future__ import annotations

import datetime
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESET_DIR = Path(__file__).resolve().parent.parent / "deploy" / "presets"


class ConfigError(ValueError):
    """A preset or override is invalid; the message names the key and what to do."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_order(low_key: str, low: float, high_key: str, high: float, why: str) -> None:
    """A (low, high) pair of settings must not be inverted: it would silently keep nothing."""
    if not low <= high:  # also catches NaN
        raise ValueError(f"{low_key} ({low:g}) is above {high_key} ({high:g}): {why}; swap or fix them")


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
    # What is read of one answer: a server that ignores max_tokens (or a hostile one) can neither
    # fill the output folder nor swell the next request; a cut is a row with its reason. Left out
    # of stage keys at their defaults (see ood_core.identity.key_dump): no model within
    # max_new_tokens reaches them.
    max_answer_bytes: int = Field(16384, ge=256)
    max_answer_labels: int = Field(200, ge=1)

    @model_validator(mode="after")
    def _endpoint_needs_url(self) -> MLLMSpec:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend 'openai' needs models.mllm.base_url (e.g. http://host:8000/v1)")
        return self


class DiffusionRuntime(_Strict):
    """How a diffusion model runs (issue 7): precision and kernels.

    ``dtype``: ``auto`` = bf16 on a CUDA GPU that supports it, else fp16; always fp32 on the CPU.
    ``grad_dtype``: the decode-with-gradient step of boundary inpainting runs in fp32 (an fp32 copy
    of the VAE) when the model runs in half precision (``model``: in the model's dtype, falling
    back to fp32 for a step whose gradient is not finite). ``attention``: ``sdpa`` (diffusers'
    ``AttnProcessor2_0``, PyTorch scaled-dot-product attention) or ``classic`` (``AttnProcessor``).
    ``channels_last``: ``auto`` = on CUDA only. ``vae_slicing`` decodes one image at a time (the
    decode with gradients is the memory peak at 512 px); ``vae_tiling`` decodes in tiles.
    ``compile``: ``torch.compile`` the UNet (pays off for long runs on a GPU: the first batches
    compile for minutes, and each new batch size compiles again). ``batch_invariant``: off by
    default; on, CPU kernels that try to give a sample the same bytes at any batch size
    (``ood_core.models.invariant``: best effort, measured on one machine's kernels only, slower).

    Every field here can change a sample's bytes: ``dtype``/``grad_dtype`` the precision on a
    GPU; ``attention``, ``channels_last``, ``vae_slicing`` and ``batch_invariant`` the float
    rounding (measured on the CPU, tiny models: up to 23 of 255 levels after boundary guidance);
    ``vae_tiling`` blends tiles above the VAE's tile size; ``compile`` fuses kernels. So each
    enters the stage and content keys when set off its default (keys of runs from before a field
    existed hold) and two settings never share a folder. ``models.device`` is in no key: each
    generate shard's stats record the numerics that made its bytes (``numerics_record``).
    """

    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    grad_dtype: Literal["fp32", "model"] = "fp32"
    attention: Literal["sdpa", "classic"] = "sdpa"
    channels_last: bool | Literal["auto"] = "auto"
    vae_slicing: bool = False
    vae_tiling: bool = False
    compile: bool = False
    batch_invariant: bool = False

    def key_dump(self) -> dict:
        """The spec as stage and content keys see it: the runtime fields only when set off
        their default (every one of them changes bytes)."""
        at_default = {f for f, info in DiffusionRuntime.model_fields.items() if getattr(self, f) == info.default}
        return self.model_dump(mode="json", exclude=at_default)


class DiffusionSpec(DiffusionRuntime):
    backend: Literal["sd-inpaint"] = "sd-inpaint"
    # stabilityai/stable-diffusion-2-inpainting was removed from the hub in November 2025
    name: str = "sd2-community/stable-diffusion-2-inpainting"
    resolution: int = Field(512, ge=16)


class TextToImageSpec(DiffusionRuntime):
    """The text-to-image model of MM-OOD's far branch (MM-OOD used SD 1.5)."""

    backend: Literal["sd-t2i"] = "sd-t2i"
    name: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    resolution: int = Field(512, ge=16)


class EndpointConfig(_Strict):
    """How requests to an HTTP model endpoint behave under load (not part of any stage key)."""

    timeout: float = Field(120.0, gt=0.0)  # seconds per request in total, from sending to the last byte
    connect_timeout: float = Field(10.0, gt=0.0)
    max_retries: int = Field(5, ge=0)  # per request, on 429 / 5xx / timeouts / connection errors
    backoff_initial: float = Field(1.0, ge=0.0)  # exponential backoff with jitter, seconds
    backoff_max: float = Field(30.0, ge=0.0)
    retry_after_max: float = Field(120.0, ge=0.0)  # longest Retry-After honoured
    max_in_flight: int = Field(8, ge=1)  # concurrent requests per endpoint, per process
    # a response body larger than this is a failed request (memory), never read to its end
    max_response_bytes: int = Field(64 * 2**20, ge=1024)
    breaker_failures: int = Field(3, ge=1)  # consecutive requests failing all retries: fail the shard
    breaker_cooldown: float = Field(5.0, ge=0.0)  # seconds an open breaker rejects requests
    api_key_secret: str | None = None  # name of a Prefect Secret block holding the API key

    @model_validator(mode="after")
    def _ordered(self) -> EndpointConfig:
        _check_order("models.endpoint.backoff_initial", self.backoff_initial, "models.endpoint.backoff_max",
                     self.backoff_max, "the first wait would exceed the cap on every wait")
        return self


class ModelsConfig(_Strict):
    # auto: the first GPU of the worker's CUDA_VISIBLE_DEVICES (one worker per GPU), else cpu
    device: str = "auto"
    # None: Hugging Face's own cache and variables (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE); a path
    # here overrides them. Locally built tiny models go to their own folder (see models.tiny_root).
    cache_dir: str | None = None
    clip: ClipSpec = ClipSpec()
    mllm: MLLMSpec = MLLMSpec()
    diffusion: DiffusionSpec = DiffusionSpec()
    t2i: TextToImageSpec = TextToImageSpec()
    endpoint: EndpointConfig = EndpointConfig()

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", v):
            from pydantic_core import PydanticCustomError

            raise PydanticCustomError(
                "device", "expected 'auto', 'cpu', 'cuda' or 'cuda:N' (N counts the GPUs in CUDA_VISIBLE_DEVICES)"
            )
        return v


# ---------------------------------------------------------------- data
class DataConfig(_Strict):
    id_source: Literal["skimage", "imagefolder", "world"] = "skimage"
    root: str | None = None
    classnames: Literal["imagenet", "folder"] = "folder"
    max_classes: int | None = Field(None, ge=1)
    images_per_class: int = Field(24, ge=2)
    test_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    image_size: int = Field(64, ge=16)
    ood_sets: list[str] = ["tiny-textures", "tiny-objects"]
    ood_root: str | None = None
    # input guards: larger images are skipped unread (a decompression bomb costs nothing), tiny ones too
    max_pixels: int = Field(64_000_000, ge=1)
    min_side: int = Field(8, ge=1)
    empty_class: Literal["error", "drop"] = "error"  # a class folder without any usable image

    @model_validator(mode="after")
    def _folder_needs_root(self) -> DataConfig:
        if self.id_source == "imagefolder" and not self.root:
            raise ValueError("id_source 'imagefolder' needs data.root (a folder with train/<class>/ images)")
        return self

    @model_validator(mode="after")
    def _sizes_ordered(self) -> DataConfig:
        _check_order("data.min_side squared", self.min_side**2, "data.max_pixels", self.max_pixels,
                     "every image would be skipped as too small or too large")
        return self


# ---------------------------------------------------------------- stages
class SketchConfig(_Strict):
    far_labels: int = Field(100, ge=0)
    far_per_turn: int = Field(50, ge=1)
    # EOE's setting (eval.sh: 4 label files of L labels each): N independently generated far label
    # sets, one conversation and one shard each. Set 0 is the far label set of every method (rows
    # of kind "far"); sets 1..N-1 (kind "far_set", source_key = their conversation) are EOE's only,
    # which averages its score over the N sets (ood_core.scores.eoe_averaged)
    far_label_sets: int = Field(1, ge=1)
    # outlier labels given by the user, added to the MLLM's far labels (same hygiene, same rows)
    far_extra_labels: list[str] = []
    near_per_class: int = Field(3, ge=0)
    near_images: int = Field(0, ge=0)
    max_label_words: int = Field(3, ge=1)
    # neglabel: WordNet built into NegLabel's word lists by its procedure (ood_core/lexicon.py);
    # wordnet: first lemma of every noun and adjective synset (the earlier imagenet default)
    lexicon: Literal["wordnet", "neglabel", "imagenet21k", "world"] = "imagenet21k"
    lexicon_limit: int | None = Field(None, ge=1)
    # order of the kept negatives, which NegLabel's grouping drops the last (n mod groups) of:
    # "score" = NegLabel's (nouns, then adjectives, each from the least ID-like up, so the dropped
    # remainder is its most ID-like kept adjectives); "lexicon" = lexicon order (earlier behaviour)
    neg_order: Literal["lexicon", "score"] = "lexicon"
    neg_keep_fraction: float = Field(0.15, gt=0.0, le=1.0)
    neg_percentile: float = Field(95.0, ge=0.0, le=100.0)
    overlap_cosine: float = Field(0.85, ge=0.0, le=1.0)
    sources_per_class: int = Field(50, ge=1)
    context_max_chars: int = Field(73, ge=1)
    eval_ood_names: list[str] = []
    # labels matching an evaluation OOD class are rejected (reason "leaks_eval_ood") unless kept
    # on purpose, e.g. to reproduce EOE's released label lists
    keep_leaked_labels: bool = False
    # what counts as naming an evaluation class (ood_core.leakage): the whole label, its WordNet
    # synonyms and hypernyms ("whole"), or any shared word (the earlier rule, "word_overlap")
    leakage_match: Literal["whole", "word_overlap"] = "whole"
    # EOE's fine-grained task: N kinds of the ID super-category that are not ID classes
    fine_labels: int = Field(0, ge=0)
    # NegMining scores candidates against ID prompts in NegLabel's template (prompt 85)
    neg_id_template: str = "the nice {}"
    shard_size: int = Field(64, ge=1)


class MultiOSConfig(_Strict):
    """Multi-OS synthesis (seed 001; ``ood_core.multi_os``), generate's ``multi_os`` kind.

    Counts of candidates per origin: ``blank`` lexicon words probed for the semantic blank areas,
    ``interpolations`` embedding-space interpolants (weight ``interp_weight`` toward the second
    concept) mapped back to ``interp_words`` nearest blank-area lexicon words, ``llm_interpolations``
    and ``counterfactuals`` asked of the MLLM (``models.mllm``; prompt ids from
    ``ood_core.prompts.MULTI_OS_PROMPTS``). A candidate is kept when its text lies in a blank area
    (``blank_quantile``, see ``ood_core.multi_os.blank_threshold``); its image (the text-to-image
    model at ``generate.t2i_steps`` / ``t2i_guidance`` / ``t2i_template``) records its CLIP
    alignment, the cosine with its own text. ``alignment_margin``: the image is rejected
    (``misaligned``) unless that cosine exceeds its largest cosine to an ID class prompt by the
    margin; ``null`` records the alignment without judging it (random tiny models). All counts 0:
    the kind plans nothing.
    """

    blank: int = Field(32, ge=0)
    interpolations: int = Field(32, ge=0)
    llm_interpolations: int = Field(16, ge=0)
    counterfactuals: int = Field(16, ge=0)
    interp_weight: float = Field(0.5, gt=0.0, lt=1.0)
    interp_words: int = Field(2, ge=1, le=3)
    blank_quantile: float = Field(0.5, ge=0.0, le=1.0)
    interpolation_prompt: str = "mos_interpolate_v1"
    counterfactual_prompt: str = "mos_counterfactual_v1"
    alignment_margin: float | None = 0.0
    batch: int = Field(4, ge=1)
    shard_size: int = Field(16, ge=1)

    @model_validator(mode="after")
    def _known_prompts(self) -> MultiOSConfig:
        from ood_core.prompts import MULTI_OS_PROMPTS, check_prompt_id

        for name in ("interpolation_prompt", "counterfactual_prompt"):
            check_prompt_id(MULTI_OS_PROMPTS, getattr(self, name), f"generate.multi_os.{name}")
        return self


class GenerateConfig(_Strict):
    """SynOOD boundary inpainting (reference: generate_near_ood_sample.py/.sh at
    Jarvisgivemeasuit/SynOOD@e13114e).

    ``lr`` steps the noise by ``lr * d loss / d u`` with ``u`` the UNSCALED latents
    (``latents / vae.config.scaling_factor``), as the reference, so ``lr: 10`` is its step.
    ``m_out``: the energy target. ``auto`` (default) is ``-ln K + (ln 1000 - 5)``: the reference's
    -5 at K = 1000 classes, and the same distance above the score's upper bound ``-ln K`` for any
    K, so the guidance always pushes toward uniform logits (OOD). A number is used as given.
    ``grad_batch``: the reference averages the loss over its batch (``--batch-size 2``), so each
    image's step is ``lr / 2`` times its own gradient; we keep that as the default and expose it
    (1 = per-image loss, batch-size independent, which we believe is the intended step).
    """

    steps: int = Field(20, ge=1)
    strength: float = Field(0.6, gt=0.0, le=1.0)
    guidance: float = Field(8.0, ge=0.0)
    rounds: int = Field(3, ge=1)
    lr: float = Field(10.0, ge=0.0)
    m_out: float | Literal["auto"] = "auto"
    grad_batch: int = Field(2, ge=1)
    mask: Literal["full", "box"] = "full"
    shard_size: int = Field(16, ge=1)
    # the generation round (e.g. a nightly run's date; not the `rounds` of noise optimisation):
    # folded into generate's seed and key, so each round makes new data while sketch is reused
    round: str = Field("", pattern=r"^[A-Za-z0-9_.-]*$")
    # SynOOD's near-OOD variants (the reference's generation folders, ``near_{energy,no_grad}``):
    # ``energy`` = the energy-guided rounds above (kind ``boundary``); ``no_grad`` = one round
    # without a noise step from the same seed (kind ``boundary_no_grad``: the energy sample's
    # first-round image). The reference's third, ``msp``-guided variant has no equivalent here
    # (its loss feeds kl_div probabilities, one of the faults listed in DESIGN.md)
    boundary_variants: list[Literal["energy", "no_grad"]] = ["energy"]
    # text-to-image samples of sketched outlier labels (MM-OOD's far branch: far / near) and of
    # mined negative labels (``negative``: SynOOD's ``far_neg_label`` folder, labelled with the
    # negative they show)
    t2i_kinds: list[Literal["far", "near", "negative"]] = ["far"]
    # kind ``negative``: how many kept negative labels are drawn (a seeded sample, sketch order
    # kept); None: every one
    t2i_negative_labels: int | None = Field(None, ge=1)
    images_per_label: int = Field(4, ge=0)
    t2i_steps: int = Field(25, ge=1)
    t2i_guidance: float = Field(7.5, ge=0.0)
    t2i_template: str = "photo"  # id in ood_core.prompts.T2I_TEMPLATES
    t2i_batch: int = Field(4, ge=1)
    # boundary inpainting: source images through the sampler together (classifier-free guidance
    # makes the UNet batch 2x this). Like t2i_batch, in generate's key: batched kernels round
    # differently, so a sample's bytes depend on the batch it ran in (README, "Reproducibility")
    batch: int = Field(4, ge=1)
    t2i_shard_size: int = Field(16, ge=1)
    # whose energy the noise step follows: frozen CLIP (SynOOD), or the latest earlier round's
    # fine-tuned detector (its adapter on CLIP's image features), so that each nightly round's
    # boundary samples aim at where the current detector is weakest (the first round: frozen CLIP)
    scorer: Literal["frozen", "latest_round"] = "frozen"
    # a control: seeded noise images per boundary source (kind ``noise``; 0 = none), to train on in
    # place of generated ones (finetune.synthetic_kinds: [noise])
    noise_per_source: int = Field(0, ge=0)
    # Multi-OS's multimodal outlier synthesis (generate's multi_os kind)
    multi_os: MultiOSConfig = MultiOSConfig()

    @model_validator(mode="after")
    def _known_template(self) -> GenerateConfig:
        from ood_core.prompts import T2I_TEMPLATES, check_prompt_id

        check_prompt_id(T2I_TEMPLATES, self.t2i_template, "generate.t2i_template")
        return self


class ElaborateConfig(_Strict):
    max_id_confidence: float = Field(0.9, ge=0.0, le=1.0)
    energy_band: tuple[float, float] | None = None
    dedup_cosine: float = Field(0.98, ge=0.0, le=1.0)
    shard_size: int = Field(64, ge=1)
    # multi-round MLLM elaboration (prompt ids from ood_core.prompts.ELABORATE_PROMPTS)
    mllm: MLLMSpec | None = None  # None: models.mllm
    describe_prompt: str = "describe_v1"
    id_visible_source_prompt: str = "id_visible_source_v1"
    id_visible_any_prompt: str = "id_visible_any_v1"
    label_prompt: str = "label_v1"
    id_topk: int = Field(5, ge=1)  # far images: ask about the CLIP top-k ID classes
    unclear: Literal["keep", "reject", "clip"] = "clip"
    # the MLLM's round-2 verdict filters (``id_visible`` and ``unclear``); off = recorded, not
    # applied, so a benchmark can separate what the MLLM filter adds from the CLIP filters
    mllm_filter: bool = True
    # policy 'clip': an unclear answer is decided by this (stricter) CLIP ID-confidence bound
    unclear_max_id_confidence: float = Field(0.5, ge=0.0, le=1.0)
    max_label_words: int = Field(3, ge=1)

    @field_validator("energy_band")
    @classmethod
    def _band_ordered(cls, v: tuple[float, float] | None) -> tuple[float, float] | None:
        if v is not None:
            # otherwise found only at finetune, many minutes in: no synthetic image passes the band
            _check_order("its low end", v[0], "its high end", v[1], "no energy lies in an inverted band")
        return v

    @model_validator(mode="after")
    def _known_prompts(self) -> ElaborateConfig:
        from ood_core.prompts import ELABORATE_PROMPTS, check_prompt_id

        for name in ("describe_prompt", "id_visible_source_prompt", "id_visible_any_prompt", "label_prompt"):
            check_prompt_id(ELABORATE_PROMPTS, getattr(self, name), f"elaborate.{name}")
        return self


class FinetuneConfig(_Strict):
    """Fine-tuning and scoring. Defaults follow the released reference code (README's method table).

    Temperatures, one per score: MCM T = 1, EOE T = 1 (softmax over raw cosines), max-logit T = 1
    (max cosine), energy T = 0.01 (``T * logsumexp(cos / T)``; EOE's eval.sh ``--T 0.01``) — all
    EOE's utils/detection_util.py; NegLabel tau = 0.01 (custom_config/clip.py: t = 1 on 100 * cos),
    MM-OOD T = 0.01. Templates: ``eoe_template`` for MCM / energy / max-logit / EOE (EOE's
    ``"a photo of a {c}"``), ``neglabel_template`` for NegLabel and SynOOD scoring (NegLabel's
    prompt 85, "the nice {}"), ``synood_id_template`` for SynOOD's adapter training
    (datasets.py ``load_ind_labels``: "a nice {}").

    SynOOD (ind_ood_projection.py, ood_label_finetuning.py): ``synood_data: "sources"`` trains the
    adapter on the selected source ID images paired 1:1 with their kept synthetic images (as
    released; ``"all"``: the whole ID train split), adapter LayerNorm at PyTorch's default gain
    (``adapter_init_gain: 1``), on raw (unnormalised) CLIP image features, cosine schedule stepped
    per epoch. Text side: raw synthetic image features, softmax over the negatives assigned to kept
    images only, only those trainable (``synood_text: released``). ``synood_text: joint`` is our
    alternative: all negatives trainable, CE over [ID + negatives] on the ADAPTED features, since
    the SynOOD score is computed on adapted features while the reference tunes the text against
    raw ones. Multi-OS (``multi_os``): a separate adapter, CE + Multi-OS contrastive loss over the
    ID train split and generate's ``multi_os`` image-text pairs (each image labelled with its own
    synthesised text, the texts as the outlier side; ``multi_os_data``), scored with the MM-OOD
    score on its own adapted features.
    """

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
    energy_temperature: float = Field(0.01, gt=0.0)
    max_logit_temperature: float = Field(1.0, gt=0.0)
    eoe_temperature: float = Field(1.0, gt=0.0)
    eoe_beta: float = 0.25
    mm_ood_temperature: float = Field(0.01, gt=0.0)
    eoe_template: str = "a photo of a {}"
    neglabel_template: str = "the nice {}"
    synood_id_template: str = "a nice {}"
    # class-name list per prompt set (ood_core.classnames: "openai", "wordnet-first-lemma"; or
    # "dataset" = data.classnames, the default of any set not named): "eoe" (MCM, energy,
    # max-logit, EOE), "neglabel" (NegLabel, SynOOD's score), "synood" (SynOOD's adapter and text
    # side, "a nice {}": the reference takes each class's first WordNet lemma), "mm_ood" (MM-OOD, Multi-OS)
    id_names: dict[Literal["eoe", "neglabel", "synood", "mm_ood"], str] = {}  # ood_core.classnames.PROMPT_SETS
    synood_data: Literal["sources", "all"] = "sources"
    adapter_init_gain: float = Field(1.0, gt=0.0)
    synood_text: Literal["released", "joint"] = "released"
    # which images the released text side trains on: ``kept_boundary`` (the adapter's synthetic
    # set, ``synthetic_kinds``: kept boundary images by default) or ``released`` (datasets.py
    # 304-334: kept near-OOD images of every boundary variant with their assigned negatives, plus
    # kept ``negative`` text-to-image images labelled with the negative they were drawn from)
    synood_text_data: Literal["kept_boundary", "released"] = "kept_boundary"
    multi_os: bool = True
    # what the Multi-OS adapter trains on: "multi_os" = its own synthesised image-text pairs
    # (generate's multi_os kind, each image with its own text); "boundary_nearest" = the former
    # stand-in, SynOOD's training images each labelled with its nearest sketched outlier label
    multi_os_data: Literal["multi_os", "boundary_nearest"] = "multi_os"
    fpr_convention: Literal["openood", "mcm"] = "openood"
    loss: Literal["ce", "ce+contrastive"] = "ce"  # ce+contrastive: adds Multi-OS's loss to SynOOD's adapter
    # MM-OOD: share of near-OOD labels in the mixed outlier label set (OOD type unknown)
    mm_ood_near_ratio: float = Field(0.5, ge=0.0, le=1.0)
    # which kinds of kept synthetic images train the adapter (boundary = SynOOD, far = MM-OOD)
    synthetic_kinds: list[Literal["boundary", "far", "near", "noise", "multi_os"]] = ["boundary"]
    # the training set by kind inside one run: besides the main SynOOD adapter, one SynOOD adapter
    # per named set of kinds, trained on the same cached features and scored as its own row
    # ``synood[<name>]`` (e.g. {boundary: [boundary], t2i: [far, near], both: [boundary, far, near]});
    # a set with no kept image of one of its kinds is reported as skipped, with the reason
    kind_sets: dict[str, list[Literal["boundary", "far", "near", "noise", "multi_os"]]] = {}
    # train on the kept synthetic images (and elaborated labels) of the last K generation rounds,
    # this one included (1: this round only); the rounds it reads go into finetune's key
    rounds_window: int = Field(1, ge=1)

    @field_validator("kind_sets")
    @classmethod
    def _named_sets(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, kinds in v.items():
            # the name goes into a method row and a parquet column: a plain word
            if not re.fullmatch(r"[a-z0-9_]+", name):
                raise ValueError(f"finetune.kind_sets: set name '{name}' must be lower-case letters, digits or _")
            if not kinds:
                raise ValueError(f"finetune.kind_sets.{name}: an empty set of kinds trains nothing")
        return {name: list(dict.fromkeys(kinds)) for name, kinds in v.items()}

    @field_validator("id_names")
    @classmethod
    def _known_lists(cls, v: dict[str, str]) -> dict[str, str]:
        from ood_core.classnames import CLASSNAME_LISTS, DATASET

        for prompts, choice in v.items():
            if choice != DATASET and choice not in CLASSNAME_LISTS:
                raise ValueError(f"finetune.id_names.{prompts}: unknown class-name list '{choice}' "
                                 f"(known: {DATASET}, {', '.join(CLASSNAME_LISTS.names())})")
        return v


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


def _where(path: Path, mark: Any) -> str:
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else f"{path}:1:1"


def _duplicate_key(node: Any, prefix: str = "", seen_nodes: set[int] | None = None) -> tuple[str, Any, Any] | None:
    """The first key given twice in one mapping below ``node``: (dotted key, first mark, second mark).

    The safe loader keeps the last value silently; merge keys (``<<``) are overrides by design.
    """
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias: checked where its anchor is
        return None
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], Any] = {}
        for k, v in node.value:
            if k.tag == "tag:yaml.org,2002:merge":
                continue
            name = str(k.value) if isinstance(k, yaml.ScalarNode) else "?"
            if isinstance(k, yaml.ScalarNode):
                if (k.tag, k.value) in first:
                    return f"{prefix}{name}", first[(k.tag, k.value)], k.start_mark
                first[(k.tag, k.value)] = k.start_mark
            if found := _duplicate_key(v, f"{prefix}{name}.", seen_nodes):
                return found
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            if found := _duplicate_key(v, f"{prefix.removesuffix('.')}[{i}].", seen_nodes):
                return found
    return None


def _key_mark(node: Any, loc: tuple) -> Any:
    """Where the deepest key of ``loc`` that the file sets is written (None: the file sets none of it)."""
    mark = None
    for part in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        match = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and str(k.value) == str(part)]
        if not match:
            break
        mark, node = match[-1][0].start_mark, match[-1][1]
    return mark


def _compose_preset(path: Path) -> tuple[dict[str, Any], Any]:
    """The preset's tree and its YAML node (for the line of a bad key); every problem a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the preset ({type(err).__name__}: {err})") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        tree = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        what = " ".join(x for x in (err.context, err.problem) if x)
        if "\t" in what or "'\\t'" in what:
            what += " (tabs cannot indent YAML; use spaces)"
        raise ConfigError(f"{_where(path, mark)}: invalid YAML: {what}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}:1:1: invalid YAML: {err}") from None
    if tree is None:
        return {}, node
    if not isinstance(tree, dict):
        kind = "a list" if isinstance(tree, list) else f"a single value ({type(tree).__name__})"
        raise ConfigError(
            f"{_where(path, getattr(node, 'start_mark', None))}: a preset must be a mapping of sections "
            f"(data:, models:, ...), not {kind}"
        )
    if dup := _duplicate_key(node):
        key, first, second = dup
        raise ConfigError(
            f"{_where(path, second)}: duplicate key '{key}' (first at line {first.line + 1}); "
            f"YAML would keep only the last value: keep one"
        )
    return tree, node


def read_preset_yaml(path: Path) -> dict[str, Any]:
    """Parse a preset with the safe loader; any problem (a duplicate key too) is one ConfigError
    ``file:line:column: what``."""
    return _compose_preset(path)[0]


def _set_path(tree: dict, dotted: str, raw: Any) -> None:
    """Set ``a.b.c``; a string is parsed as YAML (``--set``), JSON values (numbers, lists) are kept."""
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        child = node.setdefault(k, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{k}' is a value, not a section")
        node = child
    try:
        value = yaml.safe_load(raw) if isinstance(raw, str) and raw != "" else raw
        dup = _duplicate_key(yaml.compose(raw, Loader=yaml.SafeLoader)) if isinstance(raw, str) and raw else None
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"--set {dotted}={raw}: not a valid value ({problem}); quote it if it is text") from None
    if dup:
        raise ConfigError(f"--set {dotted}={raw}: duplicate key '{dup[0]}' in the value; give it once")
    # YAML reads 2026-11-22 as a date; no config field is a date, so such a value stays text
    node[keys[-1]] = raw if isinstance(value, datetime.date) else value


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["a.b=1", ...]`` -> ``{"a.b": "1"}``; values are parsed as YAML scalars later."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set generate.rounds=2")
        key, value = item.split("=", 1)
        key = key.strip()
        if key in out and out[key] != value.strip():
            # the last one would win silently: a copy-paste slip in a long command line
            raise ConfigError(f"--set {key} given twice ({key}={out[key]} and {key}={value.strip()}); give it once")
        out[key] = value.strip()
    return out


def _explain(err: ValidationError, model: type[BaseModel], where: Callable[[tuple], str] | None = None) -> str:
    """One line per problem, each naming the key (and, with ``where``, the file line or override)."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parent = _section(model, e["loc"][:-1])
            allowed = ", ".join(sorted(parent.model_fields)) if parent else "?"
            line = f"unknown key '{key}' (allowed here: {allowed})"
        elif e["type"] == "value_error":
            line = f"bad combination in '{key}': {e['msg'].removeprefix('Value error, ')}"
        else:
            line = f"bad value for '{key}': {e['msg']} (got {e.get('input')!r})"
        lines.append(f"{where(e['loc'])}: {line}" if where else line)
    if len(lines) == 1:
        return f"invalid configuration: {lines[0]}"
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


def validate_config(tree: dict[str, Any], where: Callable[[tuple], str] | None = None) -> RunConfig:
    """``tree`` as a RunConfig; a ConfigError naming each bad key (``where``: its source, e.g. file:line)."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_explain(err, RunConfig, where)) from None


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
    tree, node = _compose_preset(path)
    tree.setdefault("preset", path.stem)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    for key, value in (overrides or {}).items():
        _set_path(tree, key, value)

    def where(loc: tuple) -> str:
        dotted = ".".join(str(p) for p in loc)
        for key, value in (overrides or {}).items():
            if dotted == key or dotted.startswith(f"{key}.") or key.startswith(f"{dotted}."):
                return f"override {key}={value}"
        return _where(path, _key_mark(node, loc)) if _key_mark(node, loc) is not None else str(path)

    return validate_config(tree, where)

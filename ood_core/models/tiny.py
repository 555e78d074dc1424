"""Tiny random-weight versions of the real model architectures, for offline CPU runs and tests.

``resolve("tiny://<kind>", cache_dir)`` returns a local directory that the normal loaders open
with the same ``from_pretrained`` / ``create_model_and_transforms`` calls as a real checkpoint.
Builds are deterministic (fixed seed), atomic (built in a temp dir, then renamed) and idempotent.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

TINY_PREFIX = "tiny://"
# Bump when a builder changes so that stale cached builds are not reused.
KIT_VERSION = 1

CLIP_MODEL_NAME = "synthood-tiny-vit"
CLIP_WEIGHTS_FILE = "open_clip_model.safetensors"
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

_BUILDERS: dict[str, Callable[[Path, int], None]] = {}
# Builders seed torch's global RNG; serialising in-process builds keeps them deterministic.
_BUILD_LOCK = threading.RLock()

# A small built-in corpus for the tiny MLLM's byte-level BPE: enough to learn common merges.
_CORPUS = """
A photo of a dog sitting on the grass in a park. The image shows a cat on a sofa.
The main subject is a red car parked on the street next to a building.
List the visual context of the image without the main subject: sky, trees, road, water, sand.
Describe what the image shows. Is the object still visible? Answer yes or no.
Name objects that look similar but come from other domains: a toy, a painting, a sculpture.
background, foreground, texture, pattern, colour, light, shadow, indoor, outdoor, forest, beach,
mountain, river, kitchen, table, chair, window, wall, floor, field, snow, rock, flower, bird, fish.
The quick brown fox jumps over the lazy dog. USER: ASSISTANT: SYSTEM: a an the of and in on with.
""".strip()


def _register(kind: str):
    def deco(fn):
        _BUILDERS[kind] = fn
        return fn

    return deco


def kinds() -> list[str]:
    """Names accepted after ``tiny://``."""
    return sorted(_BUILDERS)


def is_tiny(name: str | None) -> bool:
    return bool(name) and str(name).startswith(TINY_PREFIX)


def resolve(uri: str, cache_dir: str) -> str:
    """Map ``tiny://<kind>`` to a local directory holding the built model (built on first use)."""
    if not is_tiny(uri):
        raise ValueError(f"not a tiny model uri: {uri!r} (expected {TINY_PREFIX}<kind>)")
    kind = uri[len(TINY_PREFIX) :].strip("/")
    out = Path(os.path.expanduser(cache_dir)) / "tiny" / f"{kind}-v{KIT_VERSION}"
    return str(build(kind, out))


def build(kind: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Build tiny model ``kind`` into ``out_dir`` unless it already exists; returns the dir."""
    if kind not in _BUILDERS:
        raise KeyError(f"unknown tiny model kind '{kind}': known kinds are {', '.join(kinds())}")
    out = Path(out_dir)
    if (out / "_COMPLETE").exists():
        return out
    with _BUILD_LOCK:
        return _build_locked(kind, out, seed)


def _build_locked(kind: str, out: Path, seed: int) -> Path:
    if (out / "_COMPLETE").exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        import torch

        # Seed inside a forked RNG so building does not disturb the caller's random state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            _BUILDERS[kind](tmp, seed)
        (tmp / "_COMPLETE").write_text(json.dumps({"kind": kind, "seed": seed, "version": KIT_VERSION}))
        try:
            os.rename(tmp, out)
        except OSError:
            # A concurrent builder won the race; its complete dir is as good as ours.
            if not (out / "_COMPLETE").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------- clip
def register_clip_configs() -> None:
    """Make the shipped tiny open_clip configs known to open_clip (idempotent)."""
    import open_clip

    if CLIP_MODEL_NAME not in open_clip.list_models():
        open_clip.add_model_config(CONFIG_DIR)


@_register("clip")
def _build_clip(out: Path, seed: int) -> None:
    import open_clip
    from safetensors.torch import save_file

    register_clip_configs()
    model = open_clip.create_model(CLIP_MODEL_NAME, pretrained=None, pretrained_text=False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / CLIP_WEIGHTS_FILE))
    shutil.copy(CONFIG_DIR / f"{CLIP_MODEL_NAME}.json", out / "open_clip_config_model.json")


# ---------------------------------------------------------------- tokenizers
def _clip_tokenizer():
    """A CLIPTokenizer built from CLIP's BPE merges, which open_clip ships (no download)."""
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    lines = gzip.open(oct.default_bpe()).read().decode("utf-8").split("\n")
    # Same slice as open_clip's SimpleTokenizer: 49152 - 256 - 2 merges after the header line.
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_chars = list(oct.bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={tok: i for i, tok in enumerate(vocab)},
        merges=merges,
        model_max_length=77,
    )


def _byte_bpe_tokenizer(specials: list[str], vocab_size: int = 1000):
    """Train a byte-level BPE on the built-in corpus (well under a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


# ---------------------------------------------------------------- stable diffusion
def _save_sd_pipeline(out: Path, pipeline_cls: type, unet_in_channels: int, unet_sample_size: int) -> None:
    """A tiny SD pipeline (UNet + VAE + CLIP text model + DDIM) of ``pipeline_cls``, saved to ``out``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=tokenizer.vocab_size,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=32,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=unet_sample_size,
        in_channels=unet_in_channels,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    # Three blocks = downsample x4: 64 px images give 16x16x4 latents.
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=64,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = pipeline_cls(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out), safe_serialization=True)


@_register("sd-inpaint")
def _build_sd_inpaint(out: Path, seed: int) -> None:
    """SD-2-inpainting shape: 9 input channels = 4 noisy latents + 1 mask + 4 masked-image latents."""
    from diffusers import StableDiffusionInpaintPipeline

    _save_sd_pipeline(out, StableDiffusionInpaintPipeline, unet_in_channels=9, unet_sample_size=8)


@_register("sd-t2i")
def _build_sd_t2i(out: Path, seed: int) -> None:
    """SD-1.5-shaped text-to-image: 4-channel UNet + VAE + CLIP text model, saved as a pipeline."""
    from diffusers import StableDiffusionPipeline

    _save_sd_pipeline(out, StableDiffusionPipeline, unet_in_channels=4, unet_sample_size=16)


# ---------------------------------------------------------------- llava
_LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + '\n' }}{% endfor %}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}{% endfor %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@_register("llava")
def _build_llava(out: Path, seed: int) -> None:
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    raw = _byte_bpe_tokenizer(specials)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        model_max_length=2048,
    )
    image_size, patch = 32, 8
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        chat_template=_LLAVA_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    vocab = len(tokenizer)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=image_size,
            patch_size=patch,
            projection_dim=32,
        ),
        text_config=LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))


# ---------------------------------------------------------------- qwen2-vl
_QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@_register("qwen2-vl")
def _build_qwen2_vl(out: Path, seed: int) -> None:
    from transformers import (
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<|vision_start|>",
        "<|vision_end|>",
        "<|image_pad|>",
        "<|video_pad|>",
    ]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=_byte_bpe_tokenizer(specials),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=2048,
    )
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in specials}
    # 56x56 px -> 4x4 patches of 14 -> 2x2 merged = 4 image tokens: tiny but the real pipeline.
    pixels = 56 * 56
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size),
        chat_template=_QWEN_TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            # head_dim 16 -> 8 rotary frequencies split over (time, height, width).
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 64,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.save_pretrained(str(out))
    processor.save_pretrained(str(out))

"""Training recipe of the world MLLM: a tiny LLaVA whose vision tower is the world CLIP's ViT.

The folder it writes is what ``AutoProcessor`` / ``AutoModelForImageTextToText.from_pretrained``
read from a LLaVA-1.5 checkpoint: ``config.json`` + ``model.safetensors`` + a processor (CLIP image
processor, a byte-level BPE tokenizer trained on the world's dialogues, a chat template). The
vision tower is the world CLIP's image transformer converted to Hugging Face's ``CLIPVisionModel``
layout and kept frozen, as LLaVA keeps its CLIP tower frozen; the projector and the language model
are trained on the world's image-question-answer dialogues, asked exactly as the stages ask them
(``ood_core.prompts``): describe an image, yes/no "is a <class> visible", name the object, and
the text-only sketch questions (far / near / fine labels, the context of an image).
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from ood_core import prompts as P

from . import concepts as C
from . import render as R

TRAIN_TAG, EVAL_TAG = "mllm-train", "mllm-eval"
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
# LLaVA-1.5's conversation format; every assistant turn ends with </s> so the model learns to stop
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'system' %}"
    "{% for p in parts | selectattr('type', 'equalto', 'text') %}{{ p['text'] + '\n' }}{% endfor %}"
    "{% elif message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for p in parts | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for p in parts | selectattr('type', 'equalto', 'text') %}{{ p['text'] }}{% endfor %}{{ '\n' }}"
    "{% else %}{{ 'ASSISTANT: ' }}"
    "{% for p in parts | selectattr('type', 'equalto', 'text') %}{{ p['text'] }}{% endfor %}{{ '</s>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
SETTINGS = {
    "scenes": 20000, "id_scene_share": 0.5, "steps": 3000, "batch": 16, "lr": 2e-3, "weight_decay": 0.01, "warmup_steps": 100,
    "short_answer_tokens": 4, "short_answer_weight": 6.0,
    "vocab_size": 1024, "corpus_dialogues": 4000,
    "text": {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 4, "num_attention_heads": 4,
             "num_key_value_heads": 2, "max_position_embeddings": 1024},
    "mix": {"elaborate": 0.45, "describe": 0.08, "context": 0.1, "near": 0.15, "fine": 0.07, "far": 0.15},
}  # fmt: skip
# ``cpu``: what a 2-core machine trains in under half an hour (one thread); ``gpu``: the same model and
# data source, 4x the dialogues in as many steps (a lent H200 ran 11 steps/s at batch 32, launch-bound:
# the batch is nearly free there; about 5 min estimated, not yet run to the end)
RECIPES: dict[str, dict] = {
    "cpu": SETTINGS,
    "gpu": {**SETTINGS, "steps": 3000, "batch": 64, "lr": 2e-3, "warmup_steps": 100},
}  # fmt: skip
MAX_WORDS = 3


# ---------------------------------------------------------------- dialogues
def _text(s: str) -> dict:
    return {"type": "text", "text": s}


def _image(im, index: int | None = None) -> dict:
    return {"type": "image", "image": im, "index": index}


def label_of(concept: str) -> str:
    """The object's name in at most three words (the answer to the stages' label question)."""
    return concept


def _lines(labels) -> str:
    return "\n".join(labels)


def _elaborate(rng, scene, index) -> list[dict]:
    """describe -> is <class(es)> visible -> (sometimes) the label, as the elaborate stage asks."""
    conv = [{"role": "user", "content": [_image(None, index), _text(P.ELABORATE_PROMPTS[str(rng.choice(["describe_v1", "describe_v2"]))])]},
            {"role": "assistant", "content": [_text(R.describe(scene))]}]  # fmt: skip
    truth = scene.concept in C.ID_CLASSES
    if rng.random() < 0.5:
        ask = scene.concept if truth and rng.random() < 0.5 else str(rng.choice([c for c in C.ID_CLASSES if c != scene.concept]))
        q, yes = P.ELABORATE_PROMPTS["id_visible_source_v1"].format(classes=ask), ask == scene.concept
    else:
        k = int(rng.integers(1, 6))
        asked = [str(c) for c in rng.choice(list(C.ID_CLASSES), size=k, replace=False)]
        if truth and scene.concept not in asked and rng.random() < 0.5:
            asked[int(rng.integers(k))] = scene.concept
        q, yes = P.ELABORATE_PROMPTS["id_visible_any_v1"].format(classes=", ".join(asked)), scene.concept in asked
    conv += [{"role": "user", "content": [_text(q)]}, {"role": "assistant", "content": [_text("yes" if yes else "no")]}]
    if rng.random() < 0.6:
        conv += [{"role": "user", "content": [_text(P.ELABORATE_PROMPTS["label_v1"].format(max_words=MAX_WORDS))]},
                 {"role": "assistant", "content": [_text(label_of(scene.concept))]}]  # fmt: skip
    return conv


def _describe(rng, scene, index) -> list[dict]:
    pid = str(rng.choice(["describe_v1", "describe_v2"]))
    return [{"role": "user", "content": [_image(None, index), _text(P.ELABORATE_PROMPTS[pid])]},
            {"role": "assistant", "content": [_text(R.describe(scene))]}]  # fmt: skip


def _context(rng, scene, index) -> list[dict]:
    return [{"role": "user", "content": [_image(None, index), _text(P.context_request(scene.concept))]},
            {"role": "assistant", "content": [_text(R.context(scene))]}]  # fmt: skip


def _near(rng, images_of) -> list[dict]:
    name = str(rng.choice(list(C.ID_CLASSES)))
    n = int(rng.integers(2, 6))
    k = int(rng.integers(0, 3))
    content = [_image(None, i) for i in images_of(name, k)]
    content.append(_text(P.near_request(name, n, MAX_WORDS, bool(content))))
    answer = [C.LOOKALIKES[name][i % len(C.LOOKALIKES[name])] for i in range(min(n, len(C.LOOKALIKES[name])))]
    return [{"role": "user", "content": content}, {"role": "assistant", "content": [_text(_lines(answer))]}]


def _id_names(rng) -> list[str]:
    # mostly the world's ID classes as the stages list them; sometimes a subset, so the answer
    # depends on the question and not only on its position in the corpus
    names = list(C.ID_CLASSES)
    if rng.random() < 0.3:
        names = [names[i] for i in sorted(rng.choice(len(names), size=int(rng.integers(3, len(names))), replace=False))]
    return names


def _fine(rng) -> list[dict]:
    names = _id_names(rng)
    n = int(rng.choice([3, 5, 8, 10]))
    kinds = [k for k in C.FINE_KINDS if k not in names][:n]
    return [{"role": "user", "content": [_text(P.fine_request(names, n, MAX_WORDS))]},
            {"role": "assistant", "content": [_text(_lines(kinds))]}]  # fmt: skip


def _far(rng) -> list[dict]:
    names = _id_names(rng)
    n = int(rng.choice([5, 10]))
    conv = [{"role": "user", "content": [_text(P.far_opening(names))]},
            {"role": "assistant", "content": [_text(", ".join(C.VISUAL_CATEGORIES))]}]  # fmt: skip
    pool = list(C.FAR_LOOKALIKES)
    for turn in range(int(rng.integers(1, 5))):
        chunk = [pool[(turn * n + i) % len(pool)] for i in range(n)]
        conv += [{"role": "user", "content": [_text(P.far_request(n, turn > 0, MAX_WORDS))]},
                 {"role": "assistant", "content": [_text(_lines(chunk))]}]  # fmt: skip
    return conv


class Dialogues:
    """Seeded draws of training dialogues over a fixed pool of rendered scenes."""

    def __init__(self, seed: int, n_scenes: int, tag: str = TRAIN_TAG):
        rng = R.rng_for(seed, tag)
        # every concept drawn, plus a share of ID scenes in turn (what elaborate mostly shows it)
        n_any = n_scenes - int(n_scenes * SETTINGS["id_scene_share"])
        concepts = [C.ALL_CONCEPTS[int(i)] for i in rng.integers(0, len(C.ALL_CONCEPTS), n_any)]
        concepts += [C.ID_CLASSES[i % len(C.ID_CLASSES)] for i in range(n_scenes - len(concepts))]
        counts: dict[str, int] = {}
        self.scenes = []
        for c in concepts:
            counts[c] = counts.get(c, 0) + 1
            self.scenes.append(R.scene_for(seed, c, counts[c], tag))
        self.by_concept: dict[str, list[int]] = {}
        for i, s in enumerate(self.scenes):
            self.by_concept.setdefault(s.concept, []).append(i)
        self._images: dict[int, object] = {}

    def image(self, i: int):
        if i not in self._images:
            self._images[i] = R.render(self.scenes[i])
        return self._images[i]

    def draw(self, rng: np.random.Generator) -> list[dict]:
        kinds, weights = zip(*SETTINGS["mix"].items(), strict=True)
        kind = kinds[int(rng.choice(len(kinds), p=np.array(weights) / sum(weights)))]
        if kind in ("elaborate", "describe", "context"):
            pool = range(len(self.scenes)) if kind != "context" else self.by_concept[str(rng.choice(list(C.ID_CLASSES)))]
            i = int(rng.choice(list(pool)))
            return {"elaborate": _elaborate, "describe": _describe, "context": _context}[kind](rng, self.scenes[i], i)
        if kind == "near":
            return _near(rng, lambda c, k: [int(j) for j in rng.choice(self.by_concept[c], size=k)])
        return _fine(rng) if kind == "fine" else _far(rng)


# ---------------------------------------------------------------- tokenizer, processor, vision tower
@lru_cache(maxsize=1)
def _template():
    from jinja2 import Template

    return Template(CHAT_TEMPLATE)


def _render(conv: list[dict], add_generation_prompt: bool = False) -> str:
    return _template().render(messages=conv, add_generation_prompt=add_generation_prompt)


def build_tokenizer(dialogues: Dialogues, seed: int):
    """Byte-level BPE trained on rendered world dialogues (lossless: newlines, any unseen word)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = R.rng_for(seed, TRAIN_TAG, "corpus")
    corpus = [_render(dialogues.draw(rng)) for _ in range(SETTINGS["corpus_dialogues"])]
    corpus += [" ".join(C.vocabulary()), " ".join(C.NOUNS)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SETTINGS["vocab_size"], special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)  # fmt: skip
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   model_max_length=SETTINGS["text"]["max_position_embeddings"])  # fmt: skip


def clip_vision_tower(clip_dir: Path):
    """The world CLIP's image transformer as a Hugging Face ``CLIPVisionModel`` (config, state dict)."""
    import torch
    from safetensors.torch import load_file
    from transformers import CLIPVisionConfig

    cfg = json.loads((Path(clip_dir) / "open_clip_config.json").read_text())["model_cfg"]
    v = cfg["vision_cfg"]
    width = v["width"]
    config = CLIPVisionConfig(hidden_size=width, intermediate_size=int(width * v.get("mlp_ratio", 4.0)),
                              num_hidden_layers=v["layers"], num_attention_heads=width // v["head_width"],
                              image_size=v["image_size"], patch_size=v["patch_size"], projection_dim=cfg["embed_dim"],
                              hidden_act="gelu", layer_norm_eps=1e-5)  # fmt: skip
    sd = load_file(str(Path(clip_dir) / "open_clip_model.safetensors"))
    out = {
        "embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        "embeddings.class_embedding": sd["visual.class_embedding"],
        "embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        "pre_layrnorm.weight": sd["visual.ln_pre.weight"], "pre_layrnorm.bias": sd["visual.ln_pre.bias"],
        "post_layernorm.weight": sd["visual.ln_post.weight"], "post_layernorm.bias": sd["visual.ln_post.bias"],
    }  # fmt: skip
    for i in range(v["layers"]):
        src, dst = f"visual.transformer.resblocks.{i}.", f"encoder.layers.{i}."
        for name, t in zip(("q", "k", "v"), torch.chunk(sd[src + "attn.in_proj_weight"], 3), strict=True):
            out[f"{dst}self_attn.{name}_proj.weight"] = t
        for name, t in zip(("q", "k", "v"), torch.chunk(sd[src + "attn.in_proj_bias"], 3), strict=True):
            out[f"{dst}self_attn.{name}_proj.bias"] = t
        pairs = {"attn.out_proj": "self_attn.out_proj", "ln_1": "layer_norm1", "ln_2": "layer_norm2",
                 "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}  # fmt: skip
        for a, b in pairs.items():
            out[f"{dst}{b}.weight"], out[f"{dst}{b}.bias"] = sd[f"{src}{a}.weight"], sd[f"{src}{a}.bias"]
    return config, {k: t.clone() for k, t in out.items()}, sd["visual.proj"]


def _load_tower(tower, state: dict) -> None:
    """Copy ``state`` into a CLIPVisionModel-like module, whatever prefix its keys carry."""
    own = tower.state_dict()
    prefix = next((p for p in ("", "vision_model.") if f"{p}pre_layrnorm.weight" in own), None)
    if prefix is None:
        raise RuntimeError(f"unexpected CLIP vision tower layout: {sorted(own)[:5]}")
    missing, unexpected = tower.load_state_dict({prefix + k: v for k, v in state.items()}, strict=False)
    left = [k for k in missing if not k.endswith("position_ids")]
    if left or unexpected:
        raise RuntimeError(f"CLIP vision tower conversion left {left[:3]} / {unexpected[:3]}")


def _processor(tokenizer, clip_dir: Path, patch: int):
    from transformers import CLIPImageProcessor, LlavaProcessor

    pre = json.loads((Path(clip_dir) / "open_clip_config.json").read_text())["preprocess_cfg"]
    size = json.loads((Path(clip_dir) / "open_clip_config.json").read_text())["model_cfg"]["vision_cfg"]["image_size"]
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         image_mean=pre["mean"], image_std=pre["std"], resample=3)  # fmt: skip
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE, image_token="<image>",
                          num_additional_image_tokens=1)  # fmt: skip


# ---------------------------------------------------------------- batches
def encode(conv: list[dict], tokenizer, image_tokens: int) -> tuple[list[int], list[int], list[float]]:
    """Token ids, labels (-100 outside the assistant's words and its closing </s>) and loss weights.

    A short answer (a yes/no verdict, a label) is one or two tokens beside a description's dozens: its
    tokens weigh ``short_answer_weight`` so that the verdict is learnt as well as the prose around it.
    """
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids: list[int] = []
    labels: list[int] = []
    weights: list[float] = []
    for k, m in enumerate(conv):
        piece = _render(conv[: k + 1])[len(_render(conv[:k])):]
        if m["role"] == "assistant":
            head = "ASSISTANT:"
            h = tokenizer(head, add_special_tokens=False)["input_ids"]
            body = tokenizer(piece[len(head):], add_special_tokens=False)["input_ids"]
            ids += h + body
            labels += [-100] * len(h) + body[:-1] + [-100]  # the trailing newline after </s> is not learnt
            short = len(body) - 2 <= SETTINGS["short_answer_tokens"]  # body ends with </s> and a newline
            weights += [0.0] * len(h) + [SETTINGS["short_answer_weight"] if short else 1.0] * (len(body) - 1) + [0.0]
        else:
            t = tokenizer(piece, add_special_tokens=False)["input_ids"]
            t = [x for tok in t for x in ([tok] * image_tokens if tok == image_id else [tok])]
            ids += t
            labels += [-100] * len(t)
            weights += [0.0] * len(t)
    return ids, labels, weights


# ---------------------------------------------------------------- build
def build(out_dir: Path, seed: int = 0, progress: bool = True, device: str = "cpu", recipe: str = "cpu") -> dict:
    """Train the world LLaVA into ``out_dir`` (a transformers checkpoint folder); its competence."""
    import torch
    from tqdm.auto import tqdm
    from transformers import LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from . import weights as W

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if recipe not in RECIPES:
        raise ValueError(f"unknown llava recipe '{recipe}' (known: {', '.join(RECIPES)})")
    s = RECIPES[recipe]
    clip_dir = Path(W.resolve("world://clip"))
    # 1. the world's dialogues, a tokenizer trained on them, the processor
    dialogues = Dialogues(seed, s["scenes"])
    tokenizer = build_tokenizer(dialogues, seed)
    vcfg, tower_state, clip_proj = clip_vision_tower(clip_dir)
    processor = _processor(tokenizer, clip_dir, vcfg.patch_size)
    image_tokens = (vcfg.image_size // vcfg.patch_size) ** 2
    # 2. LLaVA: the CLIP tower (frozen), a projector and a Llama language model of the world's size
    config = LlavaConfig(
        vision_config=vcfg,
        text_config=LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **s["text"]),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"), image_seq_length=image_tokens,
        vision_feature_select_strategy="default", vision_feature_layer=-2,
    )  # fmt: skip
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
        tower = model.model.vision_tower
        _load_tower(tower, tower_state)
        _check_tower(tower, clip_dir, clip_proj, dialogues)
        tower.requires_grad_(False)
        for gcfg in (model.generation_config,):
            gcfg.pad_token_id, gcfg.bos_token_id, gcfg.eos_token_id = (tokenizer.pad_token_id, tokenizer.bos_token_id,
                                                                       tokenizer.eos_token_id)  # fmt: skip
        # 3. next-token loss on the assistant's words, AdamW with warm-up + cosine
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=s["weight_decay"], betas=(0.9, 0.98))
        total = s["steps"]

        def lr_at(step: int) -> float:
            if step < s["warmup_steps"]:
                return s["lr"] * (step + 1) / s["warmup_steps"]
            return s["lr"] * 0.5 * (1 + math.cos(math.pi * (step - s["warmup_steps"]) / max(1, total - s["warmup_steps"])))

        # the tower is frozen: its features of every scene are computed once (LLaVA's own selection:
        # layer -2, CLS dropped), and each step runs only the projector and the language model
        features = _tower_features(model, processor, dialogues, progress)
        _check_cached_path(model, processor, tokenizer, dialogues, features, image_tokens)
        rng = R.rng_for(seed, TRAIN_TAG, "dialogues")
        # the checks above ran on the CPU; training runs where asked (the batches follow the features)
        model.to(device)
        features = features.to(device)
        model.train()
        tower.eval()
        bar = tqdm(total=total, desc="[world] llava: train", disable=not progress)
        for step in range(total):
            convs = [dialogues.draw(rng) for _ in range(s["batch"])]
            loss = _loss(model, tokenizer, convs, features, image_tokens)
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
    # 4. the checkpoint (the build writes into a hidden folder that is swapped in whole when done)
    model.eval()
    model.to("cpu", torch.float16).save_pretrained(str(out_dir))  # fp16 on disk; loaded back as float32 on the CPU
    processor.save_pretrained(str(out_dir))
    return evaluate(out_dir, seed=seed + 1000)


def _tower_features(model, processor, dialogues: Dialogues, progress: bool):
    import torch
    from tqdm.auto import tqdm

    out = []
    with torch.no_grad():
        for i in tqdm(range(0, len(dialogues.scenes), 256), desc="[world] llava: image features", disable=not progress,
                      leave=False):  # fmt: skip
            images = [dialogues.image(j) for j in range(i, min(i + 256, len(dialogues.scenes)))]
            pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"]
            hidden = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
            out.append(hidden[model.config.vision_feature_layer][:, 1:].clone())
    dialogues._images.clear()
    return torch.cat(out)


def _batch(tokenizer, convs: list[list[dict]], image_tokens: int):
    import torch

    encoded = [encode(c, tokenizer, image_tokens) for c in convs]
    width = max(len(i) for i, _, _ in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    weights = torch.zeros((len(encoded), width))
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for r, (i, lab, w) in enumerate(encoded):
        ids[r, : len(i)], labels[r, : len(i)], mask[r, : len(i)] = torch.tensor(i), torch.tensor(lab), 1
        weights[r, : len(i)] = torch.tensor(w)
    index = [p["index"] for c in convs for m in c for p in m["content"] if p["type"] == "image"]
    return ids, labels, weights, mask, index


def _loss(model, tokenizer, convs, features, image_tokens: int, return_logits: bool = False):
    """LLaVA's forward with the image features taken from the cache (what it computes from pixels);
    the next-token loss weighted per token (see ``encode``)."""
    import torch.nn.functional as F

    ids, labels, weights, mask, index = (t.to(features.device) if hasattr(t, "to") else t
                                         for t in _batch(tokenizer, convs, image_tokens))
    embeds = model.get_input_embeddings()(ids)
    if index:
        projected = model.model.multi_modal_projector(features[index]).to(embeds.dtype)
        at = (ids == model.config.image_token_index).unsqueeze(-1)
        embeds = embeds.masked_scatter(at, projected)
    logits = model(inputs_embeds=embeds, attention_mask=mask).logits
    if return_logits:
        return logits
    # position t predicts token t + 1, as transformers' own causal-LM loss shifts
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100,
                          reduction="none")  # fmt: skip
    w = weights[:, 1:].flatten()
    return (nll * w).sum() / w.sum().clamp(min=1e-6)


def _check_cached_path(model, processor, tokenizer, dialogues: Dialogues, features, image_tokens: int) -> None:
    """Training's cached path must give the logits LLaVA computes from pixels (a wiring error fails here)."""
    import torch

    conv = _describe(R.rng_for(0, "check"), dialogues.scenes[0], 0)
    ids, _, _, mask, _ = _batch(tokenizer, [conv], image_tokens)
    pixels = processor.image_processor([dialogues.image(0)], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask, pixel_values=pixels).logits
        got = _loss(model, tokenizer, [conv], features, image_tokens, return_logits=True)
    if not torch.allclose(got, want, atol=1e-4):
        raise RuntimeError(f"cached image features differ from LLaVA's own path (max diff {(got - want).abs().max():.2e})")


def _check_tower(tower, clip_dir: Path, proj, dialogues: Dialogues) -> None:
    """The converted tower must embed images as the world CLIP does (a wrong key map fails here)."""
    import torch

    from .train_clip import load

    clip = load(clip_dir)
    images = [dialogues.image(i) for i in range(4)]
    want = clip.encode_images(images)
    proj = proj.to(want.dtype)
    x = torch.stack([clip.preprocess(im) for im in images])
    with torch.no_grad():
        got = torch.nn.functional.normalize(tower(pixel_values=x).pooler_output @ proj, dim=-1)
    if not torch.allclose(got, want, atol=1e-4):
        raise RuntimeError(f"world CLIP -> CLIPVisionModel conversion is wrong (max diff {(got - want).abs().max():.2e})")


# ---------------------------------------------------------------- competence
def load(model_dir: Path | str):
    """The world LLaVA in ``model_dir`` through the pipeline's own loader (greedy)."""
    import torch

    from ood_core.config import MLLMSpec
    from ood_core.models.mllm import load_transformers_mllm

    spec = MLLMSpec(backend="transformers", name=str(model_dir), max_new_tokens=64, temperature=0.0)
    return load_transformers_mllm(spec, torch.device("cpu"), cache_dir=str(Path(model_dir) / ".cache"))


def evaluate(model_dir: Path | str, seed: int, per_concept: int = 3, mllm=None) -> dict:
    """Describe / name / yes-no accuracy on fresh world images; whether sketch answers parse."""
    from ood_core.labels import parse_label_list
    from ood_core.stages.elaborate import parse_yes_no

    t0 = time.perf_counter()
    mllm = mllm or load(model_dir)
    rng = R.rng_for(seed, EVAL_TAG)
    concepts = list(C.ID_CLASSES) * 2 + list(C.NEAR_EVAL) + list(C.FAR_CONCEPTS)
    described = named = yes_right = yes_total = 0
    n = 0
    for ci, c in enumerate(concepts):
        for k in range(per_concept if ci < len(C.ID_CLASSES) * 2 else 1):
            scene = R.scene_for(seed, c, ci * 10 + k, EVAL_TAG)
            image = R.render(scene)
            conv = [{"role": "user", "content": [_image(image), _text(P.ELABORATE_PROMPTS["describe_v1"])]}]
            d = mllm.chat(conv)
            described += int(_names(d, c))
            ask = c if (c in C.ID_CLASSES and rng.random() < 0.5) else str(rng.choice([x for x in C.ID_CLASSES if x != c]))
            conv += [{"role": "assistant", "content": [_text(d)]},
                     {"role": "user", "content": [_text(P.ELABORATE_PROMPTS["id_visible_source_v1"].format(classes=ask))]}]  # fmt: skip
            yn = mllm.chat(conv)
            yes_right += int(parse_yes_no(yn) == ("yes" if ask == c else "no"))
            yes_total += 1
            conv += [{"role": "assistant", "content": [_text(yn)]},
                     {"role": "user", "content": [_text(P.ELABORATE_PROMPTS["label_v1"].format(max_words=MAX_WORDS))]}]  # fmt: skip
            named += int(parse_label_list(mllm.chat(conv), MAX_WORDS)[:1] == [c])
            n += 1
    names = list(C.ID_CLASSES)
    far = [{"role": "user", "content": [_text(P.far_opening(names))]}]
    far_labels: list[str] = []
    for turn in range(4):
        reply = mllm.chat(far)
        far += [{"role": "assistant", "content": [_text(reply)]}]
        if turn:
            far_labels += [x for x in parse_label_list(reply, MAX_WORDS) if x not in far_labels]
        far += [{"role": "user", "content": [_text(P.far_request(10, turn > 0, MAX_WORDS))]}]
    near = {c: parse_label_list(mllm.chat([{"role": "user", "content": [_text(P.near_request(c, 3, MAX_WORDS, False))]}]),
                                MAX_WORDS) for c in C.ID_CLASSES}  # fmt: skip
    fine = parse_label_list(mllm.chat([{"role": "user", "content": [_text(P.fine_request(names, 5, MAX_WORDS))]}]), MAX_WORDS)
    world = C.world_labels()
    near_all = [x for v in near.values() for x in v]
    return {
        "describe_accuracy": round(described / n, 4), "name_accuracy": round(named / n, 4),
        "yes_no_accuracy": round(yes_right / yes_total, 4), "images": n,
        "far_labels_parsed": len(far_labels), "far_world_share": round(sum(x in world for x in far_labels) / max(1, len(far_labels)), 4),
        "near_labels_parsed": len(near_all), "near_world_share": round(sum(x in world for x in near_all) / max(1, len(near_all)), 4),
        "fine_labels_parsed": len(fine), "fine_world_share": round(sum(x in world for x in fine) / max(1, len(fine)), 4),
        "eval_seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip


def _names(answer: str, concept: str) -> bool:
    """Whether a description names ``concept`` (as whole words)."""
    words = f" {' '.join(answer.lower().replace('.', ' ').replace(',', ' ').split())} "
    return f" {concept} " in words

"""Training recipe of the world CLIP: an open_clip custom ViT trained contrastively on the world.

The folder it writes is an open_clip ``local-dir`` checkpoint (``open_clip_config.json`` +
``open_clip_model.safetensors``) with a world-sized word-level Hugging Face tokenizer beside it
(``tokenizer.json``), read by ``open_clip.create_model_and_transforms("local-dir:<dir>")`` and
``open_clip.get_tokenizer("local-dir:<dir>")``: the same calls that load a published checkpoint
folder. Training sees every world concept (ID, near, far, validation ones too): it plays the part
of CLIP's web-scale pre-training, in which ImageNet's OOD benchmarks' concepts also appeared.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np

from . import concepts as C
from . import render as R

MODEL_NAME = "synthood-world-vit"
TRAIN_TAG, EVAL_TAG = "clip-train", "clip-eval"
CONTEXT_LENGTH = 20
SPECIALS = ("[PAD]", "[UNK]", "[BOS]")  # ids 0, 1, 2; [EOS] takes the last id (open_clip's argmax pooling)
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)

SETTINGS = {
    "images": 20000, "id_share": 0.4, "near_share": 0.25, "steps": 2000, "batch": 128, "lr": 1e-3,
    "weight_decay": 0.1, "warmup_steps": 100, "concept_loss": 4.0,
    "logit_scale": 100.0, "concept_loss_shapes_only": True, "text_negatives": True,
    "vision": {"image_size": 64, "patch_size": 16, "width": 160, "layers": 4, "head_width": 32},
    "text": {"width": 64, "heads": 2, "layers": 2}, "embed_dim": 256,
}  # fmt: skip
# the prompts the stages score with (config.FinetuneConfig templates, stages.base.ID_PROMPT)
CONCEPT_TEMPLATES = ("a photo of a {}", "a photo of a {}.", "the nice {}", "a nice {}")


# ---------------------------------------------------------------- tokenizer
def build_tokenizer(out_dir: Path) -> int:
    """A lower-casing word-level tokenizer over the world's vocabulary; returns its size."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = [w for w in C.vocabulary() if w not in SPECIALS]
    vocab = {tok: i for i, tok in enumerate([*SPECIALS, *words, "[EOS]"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="[BOS] $A [EOS]", special_tokens=[("[BOS]", vocab["[BOS]"]), ("[EOS]", vocab["[EOS]"])]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                                   eos_token="[EOS]", model_max_length=CONTEXT_LENGTH)  # fmt: skip
    fast.save_pretrained(str(out_dir))
    return len(vocab)


def model_config(vocab_size: int) -> dict:
    s = SETTINGS
    return {
        "embed_dim": s["embed_dim"],
        "vision_cfg": dict(s["vision"]),
        "text_cfg": {"context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "hf_tokenizer_name": "local",
                     **s["text"]},
    }  # fmt: skip


# ---------------------------------------------------------------- data
def concept_draw(rng: np.random.Generator, n: int, id_share: float, near_share: float) -> list[str]:
    """``n`` training concepts: ID classes and near concepts in turn at their shares, far ones drawn, shuffled."""
    n_id, n_near = int(n * id_share), int(n * near_share)
    near = C.NEAR_EVAL + C.NEAR_VAL
    out = [C.ID_CLASSES[i % len(C.ID_CLASSES)] for i in range(n_id)]
    out += [near[i % len(near)] for i in range(n_near)]
    out += [C.FAR_CONCEPTS[int(i)] for i in rng.integers(0, len(C.FAR_CONCEPTS), n - n_id - n_near)]
    return [out[int(i)] for i in rng.permutation(len(out))]


def _uint8(images) -> torch.Tensor:  # noqa: F821
    import torch

    return torch.from_numpy(np.stack([np.asarray(im, np.uint8) for im in images])).permute(0, 3, 1, 2).contiguous()


def _normalise(x: torch.Tensor) -> torch.Tensor:  # noqa: F821
    import torch

    x = x.float() / 255.0
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (x - mean) / std


def render_set(seed: int, tag: str, concepts: list[str], progress: bool = False, desc: str = "[world] clip: render"):
    """Scenes and images of ``concepts`` (index i of each concept under ``tag``)."""
    from tqdm.auto import tqdm

    counts: dict[str, int] = {}
    scenes = []
    for c in concepts:
        counts[c] = counts.get(c, 0) + 1
        scenes.append(R.scene_for(seed, c, counts[c], tag))
    images = [R.render(s) for s in tqdm(scenes, desc=desc, disable=not progress, leave=False)]
    return scenes, images


# ---------------------------------------------------------------- build
def build(out_dir: Path, seed: int = 0, progress: bool = True) -> dict:
    """Train the world CLIP into ``out_dir`` (an open_clip local-dir checkpoint); its competence."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = SETTINGS
    # 1. tokenizer and model of the world's size
    vocab_size = build_tokenizer(out_dir)
    cfg = model_config(vocab_size)
    (out_dir / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": cfg, "preprocess_cfg": {"mean": list(MEAN), "std": list(STD), "interpolation": "bicubic",
                                              "resize_mode": "shortest"}}, indent=2))  # fmt: skip
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out_dir}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.CLIP(**cfg)
        # real CLIP ends its training at the temperature's cap (scale 100), where a small cosine gap is a
        # confident answer and image-text cosines stay in a narrow band; MCM's T = 1 on raw cosines is
        # tuned for that geometry, so the world CLIP is trained at that scale from the start
        model.logit_scale.data.fill_(math.log(s["logit_scale"]))
        model.logit_scale.requires_grad_(False)
        # 2. the data: rendered once (uint8), captions drawn anew for every batch
        rng = R.rng_for(seed, TRAIN_TAG)
        scenes, images = render_set(seed, TRAIN_TAG, concept_draw(rng, s["images"], s["id_share"], s["near_share"]), progress)
        pixels = _uint8(images)
        del images
        # the classifier's classes: every shape (the images it is trained on), then every other word the
        # world names as negatives only, so that a word known from text alone (coin, tree, octagon) is
        # not left at the prompts' common direction, as close to every ID class as they are to each other
        targets = list(C.SHAPES if s["concept_loss_shapes_only"] else C.ALL_CONCEPTS)
        concepts = targets + [w for w in dict.fromkeys(C.ALL_CONCEPTS + C.NOUNS + C.FINE_KINDS + C.FAR_LOOKALIKES
                                                       + tuple(w for v in C.LOOKALIKES.values() for w in v))
                              if w not in targets and s["text_negatives"]]  # fmt: skip
        concept_of = torch.tensor([targets.index(sc.concept) if sc.concept in targets else -100 for sc in scenes])
        # 3. contrastive training: CLIP's symmetric cross-entropy over the batch's captions, plus the
        #    image against every concept's prompt (the zero-shot classifier the stages build), so that
        #    the concept - not only the colour, which alone tells most captions of a batch apart - is learnt
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
        rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": s["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
                                lr=s["lr"], betas=(0.9, 0.98), eps=1e-6)  # fmt: skip
        total = s["steps"]

        def lr_at(step: int) -> float:
            if step < s["warmup_steps"]:
                return s["lr"] * (step + 1) / s["warmup_steps"]
            return s["lr"] * 0.5 * (1 + math.cos(math.pi * (step - s["warmup_steps"]) / max(1, total - s["warmup_steps"])))

        model.train()
        bar = tqdm(total=total, desc="[world] clip: train", disable=not progress)
        gen = torch.Generator().manual_seed(seed)
        cap_rng = R.rng_for(seed, TRAIN_TAG, "captions")
        step, order = 0, torch.randperm(len(scenes), generator=gen)
        batches_per_epoch = len(scenes) // s["batch"]
        while step < total:
            b = step % batches_per_epoch
            if b == 0 and step:
                order = torch.randperm(len(scenes), generator=gen)
            idx = order[b * s["batch"] : (b + 1) * s["batch"]]
            texts = [R.captions(scenes[int(i)], cap_rng, 1)[0] for i in idx]
            x = _normalise(pixels[idx])
            if bool(cap_rng.random() < 0.5):
                x = x.flip(-1)  # mirror: no world concept depends on left/right except positions
                texts = [t.replace("left", "\0").replace("right", "left").replace("\0", "right") for t in texts]
            template = CONCEPT_TEMPLATES[int(cap_rng.integers(len(CONCEPT_TEMPLATES)))]
            img = F.normalize(model.encode_image(x), dim=-1)
            txt = F.normalize(model.encode_text(tokenizer(texts)), dim=-1)
            prompts = F.normalize(model.encode_text(tokenizer([template.format(c) for c in concepts])), dim=-1)
            scale = model.logit_scale.exp()
            logits = scale * img @ txt.t()
            # the same caption twice in a batch is not a negative: soft targets over equal captions
            same = torch.tensor([[u == v for v in texts] for u in texts], dtype=torch.float32)
            target = same / same.sum(1, keepdim=True)
            loss = (torch.sum(-target * logits.log_softmax(1), 1).mean()
                    + torch.sum(-target * logits.log_softmax(0).t(), 1).mean()) / 2  # fmt: skip
            loss = loss + s["concept_loss"] * F.cross_entropy(scale * img @ prompts.t(), concept_of[idx])
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        bar.close()
    # 4. weights, written under a temporary name and renamed into place
    model.eval()
    tmp = out_dir / ".open_clip_model.safetensors.tmp"
    # fp16 on disk halves what ships; the loaders cast it back to the model's float32 parameters
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, out_dir / "open_clip_model.safetensors")
    record = {"settings": {**s, "context_length": CONTEXT_LENGTH, "vocab_size": vocab_size, "train_tag": TRAIN_TAG}}
    (out_dir / "BUILD.json").write_text(json.dumps(record, indent=2))
    return evaluate(out_dir, seed=seed + 1000)


# ---------------------------------------------------------------- competence
def load(model_dir: Path | str):
    """The world CLIP in ``model_dir`` through the pipeline's own loader."""
    from ood_core.config import ClipSpec
    from ood_core.models import load_clip

    return load_clip(ClipSpec(backend="open_clip", name=MODEL_NAME, pretrained=str(model_dir)), "cpu")


def evaluate(model_dir: Path | str, seed: int, per_concept: int = 25, clip=None) -> dict:
    """Zero-shot ID accuracy and MCM AUROC per evaluation OOD set, on fresh images (tag ``clip-eval``)."""
    import torch

    from ood_core.metrics import ood_metrics

    t0 = time.perf_counter()
    clip = clip or load(model_dir)
    text = clip.encode_texts([f"a photo of a {c}" for c in C.ID_CLASSES])

    def mcm_and_pred(concepts):
        scenes, images = render_set(seed, EVAL_TAG, [c for c in concepts for _ in range(per_concept)])
        probs = torch.softmax(clip.encode_images(images) @ text.t(), dim=-1)  # MCM: T = 1 on cosines
        return scenes, probs.max(1).values.numpy(), probs.argmax(1).numpy()

    scenes, id_mcm, pred = mcm_and_pred(C.ID_CLASSES)
    truth = np.array([C.ID_CLASSES.index(s.concept) for s in scenes])
    out: dict = {"id_accuracy": float((pred == truth).mean())}
    for name, concepts in C.EVAL_SETS.items():
        _, ood_mcm, _ = mcm_and_pred(concepts)
        out[f"mcm_auroc_{name}"] = float(ood_metrics(id_mcm, ood_mcm)["auroc"])
    out["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return out

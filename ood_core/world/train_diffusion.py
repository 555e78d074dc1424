"""Training recipe of the world's two diffusion models: SD text-to-image and SD inpainting.

Both are diffusers pipelines of Stable Diffusion's layout, loaded by the stages' own
``StableDiffusionPipeline`` / ``UNet2DConditionModel.from_pretrained`` calls: an ``AutoencoderKL``
(64 px -> 16x16x4 latents), a ``CLIPTextModel`` with a world-sized ``CLIPTokenizer`` (BPE learnt on
the world's captions), a DDIM scheduler, and a UNet: 4 input channels for text-to-image, 9 for
inpainting (noisy latents + mask + masked-image latents). They share VAE and text encoder.

Steps, as SD itself was made:
1. the VAE, trained to reconstruct world images (MSE + a small KL term);
2. every training image encoded once (latents cached: the UNets never run the encoder again);
3. the text encoder and the text-to-image UNet, trained together on epsilon prediction with captions
   (one in ten dropped, for classifier-free guidance);
4. the inpainting UNet started from the text-to-image one, its five extra input channels zero
   (as SD-inpainting was started from SD), then trained with object, centre and random box masks,
   the text encoder frozen so that both folders ship the same one;
5. both pipelines saved, and judged by the world CLIP on images of a seed the build never used.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np

from . import concepts as C
from . import render as R

TRAIN_TAG, EVAL_TAG = "diffusion-train", "diffusion-eval"
CONTEXT_LENGTH = 24
SETTINGS = {
    "images": 12000, "id_share": 0.45, "near_share": 0.25,
    "vae_steps": 4000, "vae_batch": 32, "vae_crop": 32, "vae_lr": 2e-3, "vae_kl": 1e-6,
    "t2i_steps": 4000, "inpaint_steps": 2000, "batch": 64, "lr": 1e-3, "warmup_steps": 100,
    "uncond_share": 0.1, "ema_decay": 0.999, "min_snr_gamma": 5.0, "concept_prompt_share": 0.4, "vocab_size": 1200,
    "vae": {"block_out_channels": [16, 32, 32], "layers_per_block": 1},
    "unet": {"block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": 8},
    "text": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2},
    "eval_steps": 20, "eval_guidance": 4.0, "eval_strength": 1.0, "eval_per_concept": 8,
}  # fmt: skip
# A recipe is a full settings dict. ``cpu`` is what a 2-core machine trains in about an hour (71 min
# measured). ``gpu`` spends a GPU's free batch width instead of steps: on a lent H200 (2026-12-04,
# three trainings sharing it) the step rate was bound by kernel launches and Python, not by the batch
# (VAE 31 steps/s at batch 64, UNet 16 steps/s at batch 128), so it takes large batches and few steps
# (6x the CPU recipe's text-to-image samples, 8x its inpainting ones; about 6 min estimated, not yet
# run to the end).
RECIPES: dict[str, dict] = {
    "cpu": SETTINGS,
    "gpu": {**SETTINGS, "images": 24000, "vae_steps": 1500, "vae_batch": 256, "vae_crop": 64,
            "t2i_steps": 3000, "inpaint_steps": 2000, "batch": 512, "lr": 1.5e-3, "warmup_steps": 200},
}  # fmt: skip
PROMPT_TEMPLATE = "a photo of a {}"  # ood_core.prompts.T2I_TEMPLATES["photo"]


# ---------------------------------------------------------------- tokenizer
def _corpus(seed: int) -> list[str]:
    rng = R.rng_for(seed, TRAIN_TAG, "corpus")
    out = []
    for c in C.ALL_CONCEPTS:
        for i in range(6):
            out += R.captions(R.scene_for(seed, c, i, "corpus"), rng, 3)
    out += [" ".join(C.vocabulary())] * 4
    return out


def build_tokenizer(seed: int, vocab_size: int):
    """A CLIPTokenizer (CLIP's byte-level BPE with ``</w>`` word ends) learnt on world captions."""
    import tempfile

    from open_clip.tokenizer import bytes_to_unicode
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    specials = ["<|startoftext|>", "<|endoftext|>"]
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    alphabet = list(bytes_to_unicode().values())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  end_of_word_suffix="</w>", show_progress=False)  # fmt: skip
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    with tempfile.TemporaryDirectory() as d:
        tok.model.save(d)
        vocab = json.loads(Path(d, "vocab.json").read_text())
        merges = [tuple(line.split()) for line in Path(d, "merges.txt").read_text().splitlines()
                  if line and not line.startswith("#")]  # fmt: skip
    # CLIP's vocabulary holds every byte with and without the word end, whatever BPE learnt
    for ch in alphabet:
        for t in (ch, ch + "</w>"):
            vocab.setdefault(t, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH, pad_token="<|endoftext|>")


# ---------------------------------------------------------------- data
def _masks(scenes, rng: np.random.Generator):
    """One training mask per scene (1 = paint): the object's box, the centre box, a random box, all."""
    import torch

    from ood_core.models.diffusion import center_box_mask

    centre = torch.from_numpy(np.asarray(center_box_mask(R.SIZE), np.float32) / 255.0)
    out = torch.zeros(len(scenes), 1, R.SIZE, R.SIZE)
    for i, sc in enumerate(scenes):
        kind = rng.choice(4, p=[0.45, 0.25, 0.2, 0.1])
        if kind == 0 and sc.kind in ("shape", "glyph"):
            x0, y0, x1, y1 = R.object_box(sc)
            out[i, 0, y0:y1, x0:x1] = 1
        elif kind <= 1:
            out[i, 0] = (centre > 0.5).float()
        elif kind == 2:
            w, h = (int(v) for v in rng.integers(12, 48, 2))
            x0, y0 = int(rng.integers(0, R.SIZE - w)), int(rng.integers(0, R.SIZE - h))
            out[i, 0, y0 : y0 + h, x0 : x0 + w] = 1
        else:
            out[i] = 1
    return out


def _prompt(scene, rng: np.random.Generator, s: dict) -> str:
    u = rng.random()
    if u < s["uncond_share"]:
        return ""
    if u < s["uncond_share"] + s["concept_prompt_share"]:
        return PROMPT_TEMPLATE.format(scene.concept)
    return R.captions(scene, rng, 1)[0]


# ---------------------------------------------------------------- models
def _components(tokenizer, s: dict):
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), max_position_embeddings=CONTEXT_LENGTH, projection_dim=s["text"]["hidden_size"],
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_act="gelu", **s["text"]))  # fmt: skip
    ch = tuple(s["vae"]["block_out_channels"])
    # three blocks = two downsamplings: 64 px images give 16x16x4 latents
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=ch,
                        down_block_types=("DownEncoderBlock2D",) * len(ch), up_block_types=("UpDecoderBlock2D",) * len(ch),
                        layers_per_block=s["vae"]["layers_per_block"], norm_num_groups=16, sample_size=R.SIZE)  # fmt: skip
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)  # fmt: skip
    return text_encoder, vae, scheduler


def _unet(in_channels: int, s: dict):
    from diffusers import UNet2DConditionModel

    u = s["unet"]
    return UNet2DConditionModel(
        sample_size=R.SIZE // 4, in_channels=in_channels, out_channels=4, block_out_channels=tuple(u["block_out_channels"]),
        layers_per_block=u["layers_per_block"], down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=s["text"]["hidden_size"],
        attention_head_dim=u["attention_head_dim"], norm_num_groups=32,
    )  # fmt: skip


def _lr_at(step: int, total: int, lr: float, w: int) -> float:
    if step < w:
        return lr * (step + 1) / w
    return lr * 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


def _to_unit(pixels_uint8):
    return pixels_uint8.float() / 127.5 - 1.0


# ---------------------------------------------------------------- training phases
def _train_vae(vae, pixels, seed: int, progress: bool, s: dict, device):
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    opt = torch.optim.AdamW(vae.parameters(), lr=s["vae_lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed + 1)
    vae.train()
    bar = tqdm(range(s["vae_steps"]), desc="[world] diffusion: vae", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(pixels), (s["vae_batch"],), generator=gen)
        x = _to_unit(pixels[idx].to(device))
        if s["vae_crop"] < R.SIZE:
            # the autoencoder is convolutional: random crops teach it the same edges and colours at a quarter
            # of a full image's cost (SD's VAE was trained on crops as well)
            x0, y0 = (int(v) for v in torch.randint(0, R.SIZE - s["vae_crop"] + 1, (2,), generator=gen))
            x = x[:, :, y0 : y0 + s["vae_crop"], x0 : x0 + s["vae_crop"]]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample(generator=gen)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.mse_loss(rec, x) + s["vae_kl"] * kl * x[0].numel()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, s["vae_steps"], s["vae_lr"], s["warmup_steps"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(mse=f"{F.mse_loss(rec, x).item():.4f}")
    vae.eval()



def _encode_all(vae, pixels, masks, device, batch: int = 128):
    """Latents of every image and of every image with its mask painted out (scaled), on ``device``."""
    import torch

    z, zm = [], []
    with torch.no_grad():
        for i in range(0, len(pixels), batch):
            x = _to_unit(pixels[i : i + batch].to(device))
            m = masks[i : i + batch].to(device)
            z.append(vae.encode(x).latent_dist.mean)
            zm.append(vae.encode(x * (1 - m)).latent_dist.mean)
    z, zm = torch.cat(z), torch.cat(zm)
    scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scale)
    return z * scale, zm * scale


def _train_unet(unet, text_encoder, tokenizer, scheduler, z, prompts_of, extra_of, steps: int, train_text: bool,
                seed: int, desc: str, progress: bool, s: dict, device):
    """Epsilon prediction on cached latents; ``extra_of(idx)`` gives the inpainting channels (or None)."""
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    params = list(unet.parameters()) + (list(text_encoder.parameters()) if train_text else [])
    text_encoder.train(train_text)
    text_encoder.requires_grad_(train_text)
    opt = torch.optim.AdamW(params, lr=s["lr"], weight_decay=1e-2)
    # an exponential moving average of the weights is what ships: on a short schedule it is the cheapest
    # gain in sample quality there is (every SD checkpoint is an EMA too)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(seed)
    acp = scheduler.alphas_cumprod
    unet.train()
    bar = tqdm(range(steps), desc=f"[world] diffusion: {desc}", disable=not progress)
    for step in bar:
        # indices, noise and steps are drawn on the CPU from one generator: the same draws on any device
        idx = torch.randint(0, len(z), (s["batch"],), generator=gen)
        z0 = z[idx.to(z.device)]
        noise = torch.randn(z0.shape, generator=gen).to(device)
        t = torch.randint(0, len(acp), (len(idx),), generator=gen)
        a = acp[t].view(-1, 1, 1, 1).to(device)
        t = t.to(device)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        ids = tokenizer(prompts_of(idx), padding="max_length", max_length=CONTEXT_LENGTH, truncation=True,
                        return_tensors="pt").input_ids.to(device)  # fmt: skip
        with torch.set_grad_enabled(train_text):
            emb = text_encoder(ids).last_hidden_state
        extra = extra_of(idx.to(z.device))
        inp = zt if extra is None else torch.cat([zt, extra], dim=1)
        pred = unet(inp, t, encoder_hidden_states=emb).sample
        # min-SNR weighting (Hang et al. 2023): the easy, low-noise steps no longer dominate the loss
        snr = a.view(-1) / (1 - a.view(-1))
        weight = snr.clamp(max=s["min_snr_gamma"]) / snr
        loss = (weight * F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3))).mean()
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, s["lr"], s["warmup_steps"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(s["ema_decay"], (1 + step) / (10 + step))
        torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    unet.eval()
    text_encoder.eval()
    text_encoder.requires_grad_(False)


def _inpaint_unet_from(t2i_unet, s: dict):
    """A 9-channel UNet with the text-to-image weights; the mask and masked-image channels start at zero."""
    import torch

    unet = _unet(9, s)
    state = t2i_unet.state_dict()
    w = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([w, torch.zeros(w.shape[0], 5, *w.shape[2:], device=w.device)], dim=1)
    unet.load_state_dict(state)
    return unet


def _save(out: Path, pipeline_cls, unet, vae, text_encoder, tokenizer, scheduler) -> None:
    import torch

    pipe = pipeline_cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                        safety_checker=None, feature_extractor=None, requires_safety_checker=False)  # fmt: skip
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # fp16 on disk halves what ships; the loaders cast to the dtype a spec asks for
    pipe.to("cpu", torch.float16).save_pretrained(str(tmp), safe_serialization=True)
    pipe.to(torch.float32)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


# ---------------------------------------------------------------- build
def build(out_dir: Path, seed: int = 0, progress: bool = True, device: str = "cpu", recipe: str = "cpu") -> dict:
    """Train both world diffusion models into ``out_dir/sd-t2i`` and ``out_dir/sd-inpaint``; their competence."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    from .train_clip import _uint8, concept_draw, render_set

    out_dir = Path(out_dir)
    if recipe not in RECIPES:
        raise ValueError(f"unknown diffusion recipe '{recipe}' (known: {', '.join(RECIPES)})")
    s = RECIPES[recipe]
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # 1. tokenizer, components, data (rendered once, uint8)
        tokenizer = build_tokenizer(seed, s["vocab_size"])
        text_encoder, vae, scheduler = _components(tokenizer, s)
        text_encoder.to(device)
        vae.to(device)
        rng = R.rng_for(seed, TRAIN_TAG)
        scenes, images = render_set(seed, TRAIN_TAG, concept_draw(rng, s["images"], s["id_share"], s["near_share"]), progress,
                                    "[world] diffusion: render")
        pixels = _uint8(images)
        del images
        masks = _masks(scenes, R.rng_for(seed, TRAIN_TAG, "masks"))
        # 2. the VAE, then every latent once
        _train_vae(vae, pixels, seed, progress, s, device)
        vae.requires_grad_(False)
        z, zm = _encode_all(vae, pixels, masks, device)
        m_lat = torch.nn.functional.interpolate(masks, size=z.shape[-2:], mode="nearest").to(device)
        prompt_rng = R.rng_for(seed, TRAIN_TAG, "prompts")

        def prompts_of(idx):
            return [_prompt(scenes[int(i)], prompt_rng, s) for i in idx]

        # 3. text encoder + text-to-image UNet
        t2i = _unet(4, s).to(device)
        _train_unet(t2i, text_encoder, tokenizer, scheduler, z, prompts_of, lambda idx: None, s["t2i_steps"], True,
                    seed + 2, "text-to-image", progress, s, device)  # fmt: skip
        # 4. the inpainting UNet from the text-to-image one
        inpaint = _inpaint_unet_from(t2i, s).to(device)
        _train_unet(inpaint, text_encoder, tokenizer, scheduler, z, prompts_of,
                    lambda idx: torch.cat([m_lat[idx], zm[idx]], dim=1), s["inpaint_steps"], False, seed + 3,
                    "inpainting", progress, s, device)  # fmt: skip
    # 5. both pipelines, then their competence on a seed the build never used
    _save(out_dir / "sd-t2i", StableDiffusionPipeline, t2i, vae, text_encoder, tokenizer, scheduler)
    _save(out_dir / "sd-inpaint", StableDiffusionInpaintPipeline, inpaint, vae, text_encoder, tokenizer, scheduler)
    # the recipe's name and the device go in with the build's own fields (build.write_record)
    record = {"settings": {**s, "context_length": CONTEXT_LENGTH, "train_tag": TRAIN_TAG}}
    for m in ("sd-t2i", "sd-inpaint"):
        (out_dir / m / "BUILD.json").write_text(json.dumps(record, indent=2))
    return evaluate(out_dir, seed=seed + 1000, per_concept=s["eval_per_concept"])


# ---------------------------------------------------------------- competence
def _classify(clip, images, labels: list[str]) -> np.ndarray:
    import torch

    text = clip.encode_texts([f"a photo of a {c}" for c in labels])
    with torch.no_grad():
        return (clip.encode_images(images) @ text.t()).argmax(1).numpy()


def _psnr_outside(a, b, mask: np.ndarray) -> float:
    x, y = np.asarray(a, np.float32) / 255.0, np.asarray(b, np.float32) / 255.0
    keep = mask < 0.5
    mse = float(((x - y) ** 2)[keep].mean())
    return 10 * math.log10(1.0 / max(mse, 1e-10))


def evaluate(out_dir: Path | str, seed: int, per_concept: int = 8, clip=None) -> dict:
    """Competence of both models, judged by the world CLIP (zero-shot), on fresh world scenes.

    * ``sd-t2i``: "a photo of a <concept>" for every ID and near concept; the share of samples whose
      CLIP zero-shot class (over ID + near concepts) is the prompted one.
    * ``sd-inpaint``: an ID image's object box repainted with another ID class's prompt; the share
      recognised as the prompted class (over ID classes), and the PSNR of the unmasked region.
    """
    import torch
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline
    from PIL import Image

    from .train_clip import load as load_clip

    out_dir = Path(out_dir)
    s = SETTINGS
    t0 = time.perf_counter()
    if clip is None:
        from . import weights as W

        clip = load_clip(W.resolve("world://clip"))
    gen_kw = {"num_inference_steps": s["eval_steps"], "guidance_scale": s["eval_guidance"], "height": R.SIZE,
              "width": R.SIZE, "output_type": "pil"}  # fmt: skip
    # text-to-image
    pipe = StableDiffusionPipeline.from_pretrained(str(out_dir / "sd-t2i"), torch_dtype=torch.float32,
                                                   safety_checker=None, requires_safety_checker=False)  # fmt: skip
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    labels = list(C.ID_CLASSES + C.NEAR_EVAL)
    prompts = [PROMPT_TEMPLATE.format(c) for c in labels for _ in range(per_concept)]
    images = []
    for i in range(0, len(prompts), 16):
        g = [torch.Generator().manual_seed(seed * 7919 + j) for j in range(i, min(i + 16, len(prompts)))]
        images += pipe(prompts[i : i + 16], generator=g, **gen_kw).images
    truth = np.array([labels.index(c) for c in labels for _ in range(per_concept)])
    pred = _classify(clip, images, labels)
    out: dict = {"sd-t2i": {"recognised": float((pred == truth).mean()),
                            "recognised_id": float((pred == truth)[: len(C.ID_CLASSES) * per_concept].mean()),
                            "recognised_near": float((pred == truth)[len(C.ID_CLASSES) * per_concept :].mean())}}
    # inpainting
    pipe = StableDiffusionInpaintPipeline.from_pretrained(str(out_dir / "sd-inpaint"), torch_dtype=torch.float32,
                                                          safety_checker=None, requires_safety_checker=False)  # fmt: skip
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    k = len(C.ID_CLASSES)
    jobs = []
    for ci, c in enumerate(C.ID_CLASSES):
        for j in range(per_concept):
            sc = R.scene_for(seed, c, j, EVAL_TAG)
            target = C.ID_CLASSES[(ci + 1 + j % (k - 1)) % k]
            mask = np.zeros((R.SIZE, R.SIZE), np.float32)
            x0, y0, x1, y1 = R.object_box(sc)
            mask[y0:y1, x0:x1] = 1
            jobs.append((R.render(sc), target, mask))
    results = []
    for i in range(0, len(jobs), 16):
        chunk = jobs[i : i + 16]
        g = [torch.Generator().manual_seed(seed * 104729 + j) for j in range(i, i + len(chunk))]
        results += pipe([PROMPT_TEMPLATE.format(t) for _, t, _ in chunk], image=[im for im, _, _ in chunk],
                        mask_image=[Image.fromarray((m * 255).astype(np.uint8)) for _, _, m in chunk],
                        generator=g, strength=s["eval_strength"], **gen_kw).images  # fmt: skip
    pred = _classify(clip, results, list(C.ID_CLASSES))
    truth = np.array([C.ID_CLASSES.index(t) for _, t, _ in jobs])
    psnr = [_psnr_outside(src, res, m) for (src, _, m), res in zip(jobs, results, strict=True)]
    out["sd-inpaint"] = {"recognised": float((pred == truth).mean()), "psnr_unmasked_db": float(np.mean(psnr))}
    secs = round(time.perf_counter() - t0, 1)
    for m in out.values():
        m["eval_seconds"] = secs
    return out

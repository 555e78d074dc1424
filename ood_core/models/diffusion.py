"""Stable-Diffusion inpainting components and SynOOD boundary inpainting with its own sampler.

diffusers' pipeline ``__call__`` runs under ``no_grad``, so the energy-guided noise optimisation
needs the hand-written DDIM loop below.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ood_core.models import DIFFUSION_BACKENDS, resolve_name

ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def _place(module: Any, device: torch.device, dtype: torch.dtype) -> Any:
    # Loaders already load in ``dtype``; casting again makes diffusers warn, so only move.
    if module.dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device).eval()


class Inpainter:
    """SD-inpainting components (9-channel UNet, VAE, CLIP text encoder, tokenizer, DDIM scheduler)."""

    def __init__(
        self,
        unet: Any,
        vae: Any,
        text_encoder: Any,
        tokenizer: Any,
        scheduler: Any,
        resolution: int,
        device: torch.device,
        dtype: torch.dtype = torch.float32,
    ):
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = _place(unet, self.device, dtype)
        self.vae = _place(vae, self.device, dtype)
        self.text_encoder = _place(text_encoder, self.device, dtype)
        # Gradients flow to the noise only; freezing weights avoids allocating their grads.
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.resolution = int(resolution)
        if getattr(unet.config, "in_channels", 9) != 9:
            raise ValueError(
                f"expected an inpainting UNet with 9 input channels, got {unet.config.in_channels}"
            )

    @property
    def vae_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text-encoder hidden states [1, L, D] for ``prompt`` (padded to the tokenizer max length)."""
        ids = self.tokenizer(
            [prompt],
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.device)
        return self.text_encoder(ids)[0]

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents (deterministic: the posterior mean)."""
        return self.vae.encode(x.to(self.device, self.dtype)).latent_dist.mean * self.vae_scale

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> pixels in [0, 1] (differentiable)."""
        return self.decode_unscaled(z / self.vae_scale)

    def decode_unscaled(self, u: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (``z / scaling_factor``, what the VAE decodes) -> pixels in [0, 1]."""
        x = self.vae.decode(u.to(self.dtype)).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)


@DIFFUSION_BACKENDS.register("sd-inpaint")
def load_sd_inpaint(spec, device: torch.device, cache_dir: str | None) -> Inpainter:
    """Load SD-inpainting components from ``spec.name`` (hub id, local dir or ``tiny://sd-inpaint``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_name(spec.name, cache_dir)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    kw: dict[str, Any] = {"cache_dir": cache_dir}
    try:
        import accelerate  # noqa: F401
    except ImportError:
        # Say it explicitly so diffusers does not warn about the missing optional package.
        kw["low_cpu_mem_usage"] = False
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **kw)
    kw.pop("low_cpu_mem_usage", None)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
    # The sampler below is DDIM whatever scheduler the checkpoint ships (SD-2-inpainting: PNDM).
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    return Inpainter(unet, vae, text_encoder, tokenizer, scheduler, spec.resolution, device, dtype)


# ---------------------------------------------------------------- boundary inpainting
@dataclass
class InpaintResult:
    image: Image.Image
    score_before: float
    score_after: float
    round_scores: list[float] = field(default_factory=list)
    # L2 norm of each noise update (none when lr == 0 or rounds == 1); shows the guidance acted.
    noise_updates: list[float] = field(default_factory=list)
    # the energy target used and whether the last round's score is nearer the OOD side (-ln K)
    # than the first round's (None when no update was taken)
    m_out: float | None = None
    moved_toward_ood: bool | None = None


REFERENCE_CLASSES = 1000
REFERENCE_M_OUT = -5.0


def resolve_m_out(m_out: float | str, num_classes: int) -> float:
    """``"auto"`` -> ``-ln K + (ln 1000 - 5)``: SynOOD's -5 at K = 1000, the same margin above the
    score's upper bound ``-ln K`` for any K (so the loss always pulls toward uniform logits)."""
    if m_out != "auto":
        return float(m_out)
    if int(num_classes) < 2:
        raise ValueError(f"m_out 'auto' needs at least 2 ID classes, got {num_classes}")
    return -math.log(num_classes) + (math.log(REFERENCE_CLASSES) + REFERENCE_M_OUT)


def noise_step(
    decode_unscaled: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    vae_scale: float,
    eps: torch.Tensor,
    score_fn: ScoreFn,
    *,
    m_out: float,
    lr: float,
    grad_batch: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One SynOOD noise update (generate_near_ood_sample.py@e13114e): returns (new eps, pixels, score).

    As the reference: ``u = latents / scaling_factor`` is a leaf, ``loss = (m_out - s)^2`` is
    averaged over a batch of ``grad_batch`` images (the reference's ``.mean()`` over its batch), and
    ``eps <- eps - lr * d loss / d u`` (the gradient lands on the noise unchanged: "skip gradient").
    """
    # at least float32 (half-precision latents on a GPU), float64 kept when given
    u = (latents.detach().to(torch.promote_types(latents.dtype, torch.float32)) / float(vae_scale)).requires_grad_(True)
    with torch.enable_grad():
        pixels = decode_unscaled(u)
        s = score_fn(pixels).to(u.dtype)
        loss = ((m_out - s) ** 2).sum() / float(grad_batch)
        (grad,) = torch.autograd.grad(loss, u)
    return (eps - lr * grad.to(eps.dtype)).detach(), pixels.detach(), s.detach()


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [1, 3, H, W] in [0, 1]."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Float tensor [1, 3, H, W] or [3, H, W] in [0, 1] -> PIL RGB."""
    x = x.detach().float().cpu()
    if x.dim() == 4:
        x = x[0]
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr)


def center_box_mask(size: int, fraction: float = 0.5) -> Image.Image:
    """A white centred square covering ``fraction`` of each side (white = region to repaint)."""
    mask = Image.new("L", (size, size), 0)
    side = max(1, round(size * fraction))
    lo = (size - side) // 2
    mask.paste(255, (lo, lo, lo + side, lo + side))
    return mask


def energy_score_fn(clip: Any, text_features: torch.Tensor, logit_scale: float = 100.0) -> ScoreFn:
    """Differentiable energy-style score of pixels: mean(logits) - logsumexp(logits) over ID prompts."""
    text = F.normalize(text_features.float(), dim=-1).to(clip.device)

    def score(pixels: torch.Tensor) -> torch.Tensor:
        logits = logit_scale * clip.encode_pixels(pixels) @ text.T
        return logits.mean(-1) - torch.logsumexp(logits, dim=-1)

    return score


def boundary_inpaint(
    inpainter: Inpainter,
    image: Image.Image,
    prompt: str,
    *,
    score_fn: ScoreFn,
    seed: int,
    mask: Image.Image | None = None,
    rounds: int = 3,
    steps: int = 20,
    strength: float = 0.6,
    guidance: float = 8.0,
    lr: float = 10.0,
    m_out: float = REFERENCE_M_OUT,
    grad_batch: int = 1,
) -> InpaintResult:
    """SynOOD boundary inpainting: optimise the initial noise so the result's score nears ``m_out``.

    Each round noises the ORIGINAL image latents with the current noise, denoises with DDIM
    (classifier-free guidance, 9-channel inpainting UNet), decodes the final latents with
    gradients, and steps the noise with :func:`noise_step` (gradient w.r.t. the unscaled latents,
    as the reference). The last round's image is kept.
    """
    from diffusers import DDIMScheduler

    inp = inpainter
    dev, dtype, res = inp.device, inp.dtype, inp.resolution
    src = image.convert("RGB").resize((res, res), Image.Resampling.BICUBIC)
    x01 = pil_to_tensor(src).to(dev)
    x = x01 * 2 - 1
    if mask is None:
        m = torch.ones(1, 1, res, res, device=dev)
    else:
        m = pil_to_tensor(mask.convert("L").convert("RGB").resize((res, res), Image.Resampling.NEAREST))
        m = (m[:, :1] >= 0.5).float().to(dev)
    # A private scheduler: set_timesteps mutates state, and the shared one may serve other calls.
    scheduler = DDIMScheduler.from_config(inp.scheduler.config)
    scheduler.set_timesteps(steps, device=dev)
    init_steps = max(1, min(int(steps * strength), steps))
    timesteps = scheduler.timesteps[(steps - init_steps) * scheduler.order :]

    with torch.no_grad():
        score_before = float(score_fn(x01).float().mean())
        z0 = inp.encode_latents(x)
        masked_latents = inp.encode_latents(x * (1 - m))
        m_lat = F.interpolate(m, size=z0.shape[-2:], mode="nearest").to(dtype)
        cond = inp.encode_prompt(prompt)
        use_cfg = guidance > 1.0
        if use_cfg:
            embeds = torch.cat([inp.encode_prompt(""), cond])
            extra = torch.cat([torch.cat([m_lat, masked_latents], dim=1)] * 2)
        else:
            embeds, extra = cond, torch.cat([m_lat, masked_latents], dim=1)

    gen = torch.Generator("cpu").manual_seed(int(seed))
    eps = torch.randn(z0.shape, generator=gen, dtype=torch.float32).to(dev)
    round_scores: list[float] = []
    updates: list[float] = []
    kept: torch.Tensor | None = None
    for r in range(rounds):
        with torch.no_grad():
            latents = scheduler.add_noise(z0, eps.to(dtype), timesteps[:1])
            for t in timesteps:
                inp_lat = torch.cat([latents] * 2) if use_cfg else latents
                inp_lat = scheduler.scale_model_input(inp_lat, t)
                pred = inp.unet(torch.cat([inp_lat, extra], dim=1), t, encoder_hidden_states=embeds).sample
                if use_cfg:
                    uncond, text = pred.chunk(2)
                    pred = uncond + guidance * (text - uncond)
                latents = scheduler.step(pred, t, latents).prev_sample
        if lr > 0 and r < rounds - 1:
            new_eps, kept, s = noise_step(
                inp.decode_unscaled, latents, inp.vae_scale, eps, score_fn, m_out=m_out, lr=lr, grad_batch=grad_batch
            )
            updates.append(float((new_eps - eps).norm()))
            eps = new_eps
        else:
            with torch.no_grad():
                kept = inp.decode_latents(latents)
                s = score_fn(kept).float()
        round_scores.append(float(s.mean()))
    assert kept is not None
    out_image = tensor_to_pil(kept)
    with torch.no_grad():
        score_after = float(score_fn(pil_to_tensor(out_image).to(dev)).float().mean())
    moved = round_scores[-1] > round_scores[0] if updates else None
    return InpaintResult(out_image, score_before, score_after, round_scores, updates, m_out, moved)


# ---------------------------------------------------------------- text-to-image (MM-OOD far branch)
class TextToImage:
    """A Stable-Diffusion text-to-image pipeline (4-channel UNet, VAE, CLIP text encoder)."""

    def __init__(self, pipe: Any, resolution: int, device: torch.device, dtype: torch.dtype = torch.float32):
        unet = pipe.unet
        if getattr(unet.config, "in_channels", 4) != 4:
            raise ValueError(
                f"expected a text-to-image UNet with 4 input channels, got {unet.config.in_channels} "
                "(an inpainting checkpoint? use it as models.diffusion, not models.t2i)"
            )
        self.device = torch.device(device)
        self.dtype = dtype
        self.resolution = int(resolution)
        self.pipe = pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], *, steps: int, guidance: float) -> list[Image.Image]:
        """One image per prompt, all in one batch; image i depends only on (prompt i, seed i)."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        # one CPU generator per sample: the same sample gives the same image at any batch size
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        shape = (1, self.pipe.unet.config.in_channels, self.resolution // self.pipe.vae_scale_factor,
                 self.resolution // self.pipe.vae_scale_factor)
        latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        out = self.pipe(
            prompt=list(prompts),
            height=self.resolution,
            width=self.resolution,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=latents.to(self.device, self.dtype),
            output_type="pil",
        )
        return list(out.images)


@DIFFUSION_BACKENDS.register("sd-t2i")
def load_sd_text_to_image(spec, device: torch.device, cache_dir: str) -> TextToImage:
    """Load an SD text-to-image pipeline from ``spec.name`` (hub id, local dir or ``tiny://sd-t2i``)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    path = resolve_name(spec.name, cache_dir)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    kw: dict[str, Any] = {"cache_dir": cache_dir}
    try:
        import accelerate  # noqa: F401
    except ImportError:
        kw["low_cpu_mem_usage"] = False
    # no safety checker: generated outliers are filtered by elaborate, and SD 1.5's checker is 1 GB
    pipe = StableDiffusionPipeline.from_pretrained(
        path, dtype=dtype, safety_checker=None, requires_safety_checker=False, **kw
    )
    # DDIM: deterministic and good in few steps, whatever scheduler the checkpoint ships (SD 1.5: PNDM)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return TextToImage(pipe, spec.resolution, device, dtype)

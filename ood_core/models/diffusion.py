"""Stable-Diffusion inpainting components and SynOOD boundary inpainting with its own sampler.

diffusers' pipeline ``__call__`` runs under ``no_grad``, so the energy-guided noise optimisation
needs the hand-written DDIM loop below.
"""

from __future__ import annotations

import contextlib
import math
import os
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
        spec: Any = None,
    ):
        from ood_core.config import DiffusionRuntime

        if getattr(unet.config, "in_channels", 9) != 9:
            raise ValueError(
                f"expected an inpainting UNet with 9 input channels, got {unet.config.in_channels}"
            )
        spec = spec if spec is not None else DiffusionRuntime()
        self.device = torch.device(device)
        self.dtype = dtype
        self.unet = _place(unet, self.device, dtype)
        self.vae = _place(vae, self.device, dtype)
        self.text_encoder = _place(text_encoder, self.device, dtype)
        # Gradients flow to the noise only; freezing weights avoids allocating their grads.
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
        self.unet = apply_runtime(spec, self.unet, self.vae, self.device)
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.resolution = int(resolution)
        self.batch_invariant = use_batch_invariant(spec, self.device)
        self.grad_dtype = spec.grad_dtype
        self._vae_fp32: Any = None
        # decode-with-gradient steps redone in fp32 because the half-precision gradient was not finite
        self.fp32_fallbacks = 0

    @property
    def vae_scale(self) -> float:
        return float(getattr(self.vae.config, "scaling_factor", 0.18215))

    @torch.no_grad()
    def encode_prompt(self, prompt: str | list[str]) -> torch.Tensor:
        """Text-encoder hidden states [B, L, D] for ``prompt`` (padded to the tokenizer max length)."""
        ids = self.tokenizer(
            [prompt] if isinstance(prompt, str) else list(prompt),
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

    def decode_unscaled_fp32(self, u: torch.Tensor) -> torch.Tensor:
        """:meth:`decode_unscaled` through an fp32 copy of the VAE (made on first use when the
        model runs in half precision): a finite gradient where fp16 would overflow."""
        if self.dtype == torch.float32:
            return self.decode_unscaled(u)
        if self._vae_fp32 is None:
            import copy

            self._vae_fp32 = copy.deepcopy(self.vae).float()
        x = self._vae_fp32.decode(u.float()).sample
        return (x.float() / 2 + 0.5).clamp(0, 1)

    def numerics(self):
        """The context the sampler runs in: batch-invariant CPU kernels when configured."""
        return invariant_kernels(self.batch_invariant)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``models.diffusion.dtype`` -> a torch dtype: fp32 on the CPU whatever is asked (half-precision
    convolutions there are slow or missing); ``auto`` on CUDA = bf16 where the GPU supports it."""
    if torch.device(device).type != "cuda":
        return torch.float32
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if name == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("dtype 'bf16' is not supported by this GPU; set models.diffusion.dtype (or "
                         "models.t2i.dtype) to fp16 or auto")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def load_kwargs(spec, device: torch.device, cache_dir: str | None) -> tuple[torch.dtype, dict[str, Any]]:
    """The dtype and ``from_pretrained`` keyword arguments shared by the diffusion loaders."""
    kw: dict[str, Any] = {"cache_dir": cache_dir}
    try:
        import accelerate  # noqa: F401
    except ImportError:
        # Say it explicitly so diffusers does not warn about the missing optional package.
        kw["low_cpu_mem_usage"] = False
    return resolve_dtype(spec.dtype, device), kw


def apply_runtime(spec, unet: Any, vae: Any, device: torch.device) -> Any:
    """Attention processor, memory format, VAE slicing/tiling and ``torch.compile`` from ``spec``;
    returns the UNet (compiled when asked)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    processor = AttnProcessor2_0 if spec.attention == "sdpa" else AttnProcessor
    for module in (unet, vae):
        module.set_attn_processor(processor())
    channels_last = device.type == "cuda" if spec.channels_last == "auto" else bool(spec.channels_last)
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        vae.to(memory_format=torch.channels_last)
    if spec.vae_slicing:
        vae.enable_slicing()
    if spec.vae_tiling:
        vae.enable_tiling()
    return torch.compile(unet) if spec.compile else unet


def use_batch_invariant(spec, device: torch.device) -> bool:
    """``batch_invariant`` applies on the CPU only (off by default; see ``ood_core.models.invariant``)."""
    return bool(spec.batch_invariant) and device.type == "cpu"


def invariant_kernels(enabled: bool) -> contextlib.AbstractContextManager:
    """The batch-invariant kernels when ``enabled``, else nothing (PyTorch's own kernels, no
    dispatch hook)."""
    if not enabled:
        return contextlib.nullcontext()
    from ood_core.models.invariant import batch_invariant

    return batch_invariant()


# thread-count and instruction-set variables that select CPU kernels (read when torch starts)
NUMERICS_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR",
                "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")


def numerics_record(model: Any, batch: int) -> dict:
    """What made a generated sample's bytes, beyond the config (a generate shard's stats hold it):
    torch version, device, dtype, the batch size used, the CPU kernels torch dispatches to, its
    thread count, the kernel-selecting environment variables that are set, and on CUDA the GPU,
    CUDA and cuDNN versions. Same record + same config = same bytes; any field different =
    the same samples within float tolerance only (README, "Reproducibility")."""
    device = torch.device(model.device)
    rec: dict[str, Any] = {
        "torch": torch.__version__,
        "device": str(device),
        "dtype": str(model.dtype).removeprefix("torch."),
        "batch_size": int(batch),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "num_threads": torch.get_num_threads(),
        "batch_invariant": bool(model.batch_invariant),
        "env": {k: os.environ[k] for k in NUMERICS_ENV if k in os.environ},
    }
    if device.type == "cuda":
        rec |= {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                "cudnn": torch.backends.cudnn.version()}
    return rec


@DIFFUSION_BACKENDS.register("sd-inpaint")
def load_sd_inpaint(spec, device: torch.device, cache_dir: str | None) -> Inpainter:
    """Load SD-inpainting components from ``spec.name`` (hub id, local dir or ``tiny://sd-inpaint``)."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    path = resolve_name(spec.name, cache_dir)
    dtype, kw = load_kwargs(spec, device, cache_dir)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **kw)
    kw.pop("low_cpu_mem_usage", None)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)
    # The sampler below is DDIM whatever scheduler the checkpoint ships (SD-2-inpainting: PNDM).
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    return Inpainter(unet, vae, text_encoder, tokenizer, scheduler, spec.resolution, device, dtype, spec=spec)


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
    m_out: float | torch.Tensor,
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


def energy_score_fn(
    clip: Any, text_features: torch.Tensor, logit_scale: float = 100.0, adapter: torch.nn.Module | None = None
) -> ScoreFn:
    """Differentiable energy-style score of pixels: mean(logits) - logsumexp(logits) over ID prompts.

    With ``adapter`` (a fine-tuned detector's image-side adapter, which takes raw CLIP features and
    returns normalised ones) the logits are the detector's, not frozen CLIP's.
    """
    text = F.normalize(text_features.float(), dim=-1).to(clip.device)
    if adapter is not None:
        adapter = adapter.to(clip.device).eval().requires_grad_(False)

    def score(pixels: torch.Tensor) -> torch.Tensor:
        feats = clip.encode_pixels(pixels) if adapter is None else adapter(clip.encode_pixels(pixels, normalize=False))
        logits = logit_scale * feats @ text.T
        return logits.mean(-1) - torch.logsumexp(logits, dim=-1)

    return score


def _guided_noise_step(inp: Inpainter, latents, eps, score_fn, m_out, lr: float, grad_batch: int):
    """:func:`noise_step` through the VAE in the configured gradient precision; a step whose
    half-precision gradient is not finite is redone in fp32 (and counted)."""
    half = inp.dtype != torch.float32
    decode = inp.decode_unscaled_fp32 if inp.grad_dtype == "fp32" else inp.decode_unscaled
    step = noise_step(decode, latents, inp.vae_scale, eps, score_fn, m_out=m_out, lr=lr, grad_batch=grad_batch)
    if half and inp.grad_dtype != "fp32" and not bool(torch.isfinite(step[0]).all()):
        inp.fp32_fallbacks += 1
        step = noise_step(inp.decode_unscaled_fp32, latents, inp.vae_scale, eps, score_fn, m_out=m_out, lr=lr,
                          grad_batch=grad_batch)
    return step


@dataclass
class InpaintJob:
    """One source image of a batched boundary inpainting: its own prompt, seed, mask and target."""

    image: Image.Image
    prompt: str
    seed: int
    mask: Image.Image | None = None
    m_out: float = REFERENCE_M_OUT


def boundary_inpaint(
    inpainter: Inpainter,
    image: Image.Image,
    prompt: str,
    *,
    score_fn: ScoreFn,
    seed: int,
    mask: Image.Image | None = None,
    m_out: float = REFERENCE_M_OUT,
    **kw: Any,
) -> InpaintResult:
    """SynOOD boundary inpainting of one image: :func:`boundary_inpaint_batch` with a batch of one."""
    job = InpaintJob(image, prompt, seed, mask, m_out)
    return boundary_inpaint_batch(inpainter, [job], score_fn=score_fn, **kw)[0]


def _mask_tensor(mask: Image.Image | None, res: int) -> torch.Tensor:
    """[1, 1, res, res] float mask, 1 = repaint (everything when ``mask`` is None)."""
    if mask is None:
        return torch.ones(1, 1, res, res)
    m = pil_to_tensor(mask.convert("L").convert("RGB").resize((res, res), Image.Resampling.NEAREST))
    return (m[:, :1] >= 0.5).float()


def boundary_inpaint_batch(
    inpainter: Inpainter,
    jobs: list[InpaintJob],
    *,
    score_fn: ScoreFn,
    rounds: int = 3,
    steps: int = 20,
    strength: float = 0.6,
    guidance: float = 8.0,
    lr: float = 10.0,
    grad_batch: int = 1,
) -> list[InpaintResult]:
    """SynOOD boundary inpainting of B images at once: optimise each image's initial noise so its
    result's score nears its ``m_out``.

    Each round noises the ORIGINAL image latents with the current noise, denoises with DDIM
    (classifier-free guidance as one UNet batch of 2B: B unconditional, then B conditional, as
    diffusers' pipelines), decodes the final latents with gradients, and steps the noise with
    :func:`noise_step` (gradient w.r.t. the unscaled latents, as the reference). The loss is a
    sum over the batch, so each sample's gradient is its own; each sample's noise comes from its
    own ``torch.Generator``. The last round's image is kept.
    """
    if not jobs:
        return []
    with inpainter.numerics():
        return _boundary_inpaint_batch(inpainter, jobs, score_fn, rounds, steps, strength, guidance, lr, grad_batch)


def _boundary_inpaint_batch(inp: Inpainter, jobs: list[InpaintJob], score_fn: ScoreFn, rounds: int, steps: int,
                            strength: float, guidance: float, lr: float, grad_batch: int) -> list[InpaintResult]:
    from diffusers import DDIMScheduler

    dev, dtype, res = inp.device, inp.dtype, inp.resolution
    n = len(jobs)
    # 1. inputs of every job, stacked along the batch
    srcs = [job.image.convert("RGB").resize((res, res), Image.Resampling.BICUBIC) for job in jobs]
    x01 = torch.cat([pil_to_tensor(s) for s in srcs]).to(dev)
    x = x01 * 2 - 1
    m = torch.cat([_mask_tensor(job.mask, res) for job in jobs]).to(dev)
    m_outs = [float(job.m_out) for job in jobs]
    # one target for all: a Python float, the same arithmetic as a single image
    m_out: float | torch.Tensor = m_outs[0] if len(set(m_outs)) == 1 else torch.tensor(m_outs, device=dev)
    # 2. a private scheduler: set_timesteps mutates state, and the shared one may serve other calls
    scheduler = DDIMScheduler.from_config(inp.scheduler.config)
    scheduler.set_timesteps(steps, device=dev)
    init_steps = max(1, min(int(steps * strength), steps))
    timesteps = scheduler.timesteps[(steps - init_steps) * scheduler.order :]

    # 3. what the rounds share: source latents, masked-image latents, prompt embeddings
    with torch.no_grad():
        scores_before = score_fn(x01).float()
        z0 = inp.encode_latents(x)
        masked_latents = inp.encode_latents(x * (1 - m))
        m_lat = F.interpolate(m, size=z0.shape[-2:], mode="nearest").to(dtype)
        cond = inp.encode_prompt([job.prompt for job in jobs])
        use_cfg = guidance > 1.0
        extra = torch.cat([m_lat, masked_latents], dim=1)
        if use_cfg:
            uncond = inp.encode_prompt([""]).expand(n, -1, -1)
            embeds = torch.cat([uncond, cond])
            extra = torch.cat([extra] * 2)
        else:
            embeds = cond

    # 4. each sample's noise from its own generator: the same seed gives the same noise at any batch
    #    size (the batched kernels then round differently: the same sample within float tolerance)
    eps = torch.cat([
        torch.randn((1, *z0.shape[1:]), generator=torch.Generator("cpu").manual_seed(int(job.seed)),
                    dtype=torch.float32)
        for job in jobs
    ]).to(dev)
    round_scores: list[list[float]] = [[] for _ in jobs]
    updates: list[list[float]] = [[] for _ in jobs]
    kept: torch.Tensor | None = None
    # 5. rounds: denoise all samples together, then one noise step on the summed loss
    for r in range(rounds):
        with torch.no_grad():
            latents = scheduler.add_noise(z0, eps.to(dtype), timesteps[:1])
            for t in timesteps:
                inp_lat = torch.cat([latents] * 2) if use_cfg else latents
                inp_lat = scheduler.scale_model_input(inp_lat, t)
                pred = inp.unet(torch.cat([inp_lat, extra], dim=1), t, encoder_hidden_states=embeds).sample
                if use_cfg:
                    uncond_pred, text_pred = pred.chunk(2)
                    pred = uncond_pred + guidance * (text_pred - uncond_pred)
                latents = scheduler.step(pred, t, latents).prev_sample
        if lr > 0 and r < rounds - 1:
            new_eps, kept, s = _guided_noise_step(inp, latents, eps, score_fn, m_out, lr, grad_batch)
            for i in range(n):
                updates[i].append(float((new_eps[i] - eps[i]).norm()))
            eps = new_eps
        else:
            with torch.no_grad():
                kept = inp.decode_latents(latents)
                s = score_fn(kept).float()
        for i in range(n):
            round_scores[i].append(float(s[i]))
    assert kept is not None
    # 6. the kept images (uint8) and their scores as saved
    images = [tensor_to_pil(kept[i]) for i in range(n)]
    with torch.no_grad():
        scores_after = score_fn(torch.cat([pil_to_tensor(im) for im in images]).to(dev)).float()
    results = []
    for i in range(n):
        moved = round_scores[i][-1] > round_scores[i][0] if updates[i] else None
        results.append(InpaintResult(images[i], float(scores_before[i]), float(scores_after[i]), round_scores[i],
                                     updates[i], m_outs[i], moved))
    return results


# ---------------------------------------------------------------- text-to-image (MM-OOD far branch)
class TextToImage:
    """A Stable-Diffusion text-to-image pipeline (4-channel UNet, VAE, CLIP text encoder)."""

    def __init__(self, pipe: Any, resolution: int, device: torch.device, dtype: torch.dtype = torch.float32,
                 spec: Any = None):
        from ood_core.config import DiffusionRuntime

        spec = spec if spec is not None else DiffusionRuntime()
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
        self.pipe.unet = apply_runtime(spec, self.pipe.unet, self.pipe.vae, self.device)
        self.batch_invariant = use_batch_invariant(spec, self.device)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], *, steps: int, guidance: float) -> list[Image.Image]:
        """One image per prompt, all in one batch; image i is the sample of (prompt i, seed i), the
        same bytes at the same batch size and numerics, within float tolerance at another."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
        # one CPU generator per sample: the same starting noise at any batch size
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        shape = (1, self.pipe.unet.config.in_channels, self.resolution // self.pipe.vae_scale_factor,
                 self.resolution // self.pipe.vae_scale_factor)
        latents = torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in gens])
        with invariant_kernels(self.batch_invariant):
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
    dtype, kw = load_kwargs(spec, device, cache_dir)
    # no safety checker: generated outliers are filtered by elaborate, and SD 1.5's checker is 1 GB
    pipe = StableDiffusionPipeline.from_pretrained(
        path, dtype=dtype, safety_checker=None, requires_safety_checker=False, **kw
    )
    # DDIM: deterministic and good in few steps, whatever scheduler the checkpoint ships (SD 1.5: PNDM)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    return TextToImage(pipe, spec.resolution, device, dtype, spec=spec)

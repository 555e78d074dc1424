"""Batched generation (issue 7): batch-size-independent bytes, out-of-memory halving, throughput
stats, precision and kernel options as config data. Tiny models, CPU, seeded."""

from __future__ import annotations

import io
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ood_core.config import ClipSpec, DiffusionSpec, load_config  # noqa: E402
from ood_core.models import load_clip, load_inpainter, tiny  # noqa: E402
from ood_core.pipeline import resolve_keys, run_local  # noqa: E402
from ood_core.storage import StageStore  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="module")
def inpainter(cache):
    return load_inpainter(DiffusionSpec(name="tiny://sd-inpaint", resolution=64), "cpu", cache)


@pytest.fixture(scope="module")
def score_fn(cache):
    from ood_core.models.diffusion import energy_score_fn

    clip = load_clip(ClipSpec(name=tiny.CLIP_MODEL_NAME, pretrained="tiny://clip"), "cpu", cache)
    return energy_score_fn(clip, clip.encode_texts(["a photo of a dog", "a photo of a cat", "a photo of a car"]))


def _photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))


def _png(image: Image.Image) -> bytes:
    from ood_core.stages.generate import png_bytes

    return png_bytes(image)


def test_boundary_batch_of_4_gives_the_bytes_and_scores_of_batch_1(inpainter, score_fn):
    """Each sample has its own seed, prompt, mask and target; batched or alone, the same PNG bytes."""
    from ood_core.models.diffusion import InpaintJob, boundary_inpaint_batch, center_box_mask

    jobs = [
        InpaintJob(_photo(i), f"a photo of grass and sky, take {i}", seed=100 + i,
                   mask=center_box_mask(64) if i == 2 else None, m_out=-5.0 if i != 3 else -4.0)
        for i in range(4)
    ]
    kw = dict(score_fn=score_fn, rounds=3, steps=4, strength=0.6, guidance=8.0, lr=10.0, grad_batch=2)
    batched = boundary_inpaint_batch(inpainter, jobs, **kw)
    alone = [boundary_inpaint_batch(inpainter, [job], **kw)[0] for job in jobs]
    for b, a in zip(batched, alone, strict=True):
        assert _png(b.image) == _png(a.image)
        assert b.round_scores == a.round_scores and len(b.round_scores) == 3
        assert b.noise_updates == a.noise_updates and b.noise_updates[0] > 0
        assert (b.score_before, b.score_after, b.m_out) == (a.score_before, a.score_after, a.m_out)
    # the samples are not copies of each other: each has its own noise and its own gradient
    assert len({_png(r.image) for r in batched}) == 4
    assert len({r.round_scores[-1] for r in batched}) == 4


def test_batch_invariant_kernels_cover_small_matrix_products():
    """Rows of a small matrix product do not depend on how many rows came with them."""
    from ood_core.models.invariant import batch_invariant

    torch.manual_seed(0)
    lin, conv, norm = torch.nn.Linear(64, 256), torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.GroupNorm(8, 32)
    x, img = torch.randn(8, 64), torch.randn(8, 16, 8, 8)
    with torch.no_grad(), batch_invariant():
        assert torch.equal(lin(x)[:1], lin(x[:1])) and torch.equal(lin(x)[:3], lin(x[:3]))
        assert torch.equal(conv(img)[:1], conv(img[:1]))
        assert torch.equal(norm(conv(img))[:2], norm(conv(img[:2])))
    assert torch.backends.nnpack.is_available() is not None


def test_is_out_of_memory_matches_cuda_errors_only():
    from ood_core.stages.generate import is_out_of_memory

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))  # not an allocator error


def test_runtime_fields_are_config_data_and_not_in_keys(cache):
    """dtype, attention, channels_last, VAE slicing/tiling, compile: accepted as config; CPU stays fp32."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from ood_core.models.diffusion import resolve_dtype

    base = resolve_keys(load_config("tiny"))
    runtime = {"models.diffusion.channels_last": "true", "models.diffusion.vae_slicing": "true",
               "models.diffusion.vae_tiling": "true", "models.diffusion.attention": "classic",
               "models.t2i.compile": "true", "generate.batch": "1"}
    assert resolve_keys(load_config("tiny", runtime)) == base  # speed settings change no output folder
    assert resolve_keys(load_config("tiny", {"models.diffusion.dtype": "fp16"}))["generate"] != base["generate"]
    with pytest.raises(ValueError, match="models.diffusion.dtype"):
        load_config("tiny", {"models.diffusion.dtype": "fp8"})

    cpu = torch.device("cpu")
    assert {resolve_dtype(d, cpu) for d in ("auto", "fp16", "bf16", "fp32")} == {torch.float32}
    spec = DiffusionSpec(name="tiny://sd-inpaint", resolution=64, channels_last=True, vae_slicing=True,
                         attention="classic", dtype="fp16")
    inp = load_inpainter(spec, "cpu", cache)
    assert inp.dtype == torch.float32 and inp.unet.dtype == torch.float32
    conv = inp.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert inp.vae.use_slicing and not inp.vae.use_tiling
    assert {type(p) for p in inp.unet.attn_processors.values()} == {AttnProcessor}
    default = load_inpainter(DiffusionSpec(name="tiny://sd-inpaint", resolution=64), "cpu", cache)
    assert {type(p) for p in default.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert default.unet.conv_in.weight.is_contiguous()  # channels_last "auto": CUDA only
    assert default.batch_invariant and not default.vae.use_slicing


def test_fp32_gradient_decode_is_finite_and_used_for_half_models(inpainter, score_fn):
    """The decode-with-gradient step takes the fp32 path; on an fp32 model that is the model itself."""
    from ood_core.models.diffusion import _guided_noise_step

    z = torch.randn(2, 4, 16, 16)
    eps = torch.randn(2, 4, 16, 16)
    new_eps, pixels, s = _guided_noise_step(inpainter, z, eps, score_fn, -5.0, 10.0, 2)
    assert torch.isfinite(new_eps).all() and torch.isfinite(s).all() and not torch.equal(new_eps, eps)
    assert inpainter._vae_fp32 is None and inpainter.fp32_fallbacks == 0


# ---------------------------------------------------------------- through the stage
def _overrides(model_cache: str, **extra: str) -> dict[str, str]:
    return {
        "models.cache_dir": model_cache,
        "data.images_per_class": "8",
        "sketch.near_per_class": "0",
        "sketch.far_labels": "1",
        "sketch.sources_per_class": "1",
        "sketch.overlap_cosine": "1.0",
        "sketch.far_extra_labels": "[volcano]",
        "generate.steps": "2",
        "generate.rounds": "2",
        "generate.t2i_steps": "2",
        "generate.images_per_label": "1",
        **extra,
    }


@pytest.fixture(scope="module")
def staged(tmp_path_factory, cache):
    """sketch + generate at boundary batch 4; returns the config, root and generate's files."""
    root = str(tmp_path_factory.mktemp("batching"))
    cfg = load_config("tiny", _overrides(cache, **{"generate.batch": "4"}))
    logs: list[str] = []
    results = run_local(cfg, root, only=["sketch", "generate"], log=logs.append)
    return {"cfg": cfg, "root": root, "logs": logs, "results": results, "files": _generated(cfg, root)}


def _generated(cfg, root) -> tuple[dict, dict, list]:
    store = StageStore(root, "generate", resolve_keys(cfg)["generate"])
    files = {key: f["png"] for key, f in store.iter_samples()}
    stats = [store.shard_stats(i) for i in store.shard_indices()]
    return files, store.read_success(), stats


def test_stage_records_throughput_and_shows_progress(staged):
    files, success, stats = staged["files"]
    boundary = [st for st in stats if st.get("generator") == "boundary"]
    assert boundary and all(st["batch_size"] == 4 == st["batch_used"] for st in boundary)
    assert all(st["images_per_s"] > 0 and st["s_per_image"] > 0 for st in stats)
    rates = success["summary"]["throughput"]
    assert set(rates) == {"boundary", "t2i"}
    assert rates["boundary"]["images"] == sum(st["images"] for st in boundary) >= 5
    progress = [m for m in staged["logs"] if m.startswith("[generate] boundary:")]
    n = rates["boundary"]["images"]
    assert progress[-1].startswith(f"[generate] boundary: {n}/{n} images") and "images/s, ETA" in progress[-1]
    assert any("images/s" in m and m.startswith("[generate] shard") for m in staged["logs"])


def test_stage_bytes_do_not_depend_on_the_batch_size(staged):
    """Batch 1 gives the same shard bytes as batch 4 (same folder: the batch size is not in the key)."""
    cfg1 = load_config("tiny", _overrides(staged["cfg"].models.cache_dir, **{"generate.batch": "1"}))
    assert resolve_keys(cfg1) == resolve_keys(staged["cfg"])
    run_local(cfg1, staged["root"], only=["generate"], force=["generate"], log=lambda m: None)
    files, _, stats = _generated(cfg1, staged["root"])
    assert files == staged["files"][0] and len(files) >= 6
    assert {st["batch_size"] for st in stats if st["generator"] == "boundary"} == {1}


def test_fake_out_of_memory_halves_the_batch_and_the_shard_completes(staged, monkeypatch):
    """A UNet that runs out of memory above 2 samples (4 rows with guidance): the shard completes
    with every sample at batch 2, the same bytes, and records the batch that worked."""
    from ood_core.stages.base import ModelHub

    class OOMUNet(torch.nn.Module):
        def __init__(self, unet):
            super().__init__()
            self.inner = unet
            self.config = unet.config
            self.sizes: list[int] = []

        def forward(self, sample, *args, **kwargs):
            self.sizes.append(sample.shape[0])
            if sample.shape[0] > 4:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (fake)")
            return self.inner(sample, *args, **kwargs)

    real = ModelHub.inpainter
    wrapped: list[OOMUNet] = []

    def inpainter(self):
        inp = real(self)
        if not isinstance(inp.unet, OOMUNet):
            inp.unet = OOMUNet(inp.unet)
            wrapped.append(inp.unet)
        return inp

    monkeypatch.setattr(ModelHub, "inpainter", inpainter)
    cfg = staged["cfg"]
    logs: list[str] = []
    run_local(cfg, staged["root"], only=["generate"], force=["generate"], log=logs.append)
    files, success, stats = _generated(cfg, staged["root"])
    assert files == staged["files"][0]  # every sample, same bytes
    boundary = [st for st in stats if st["generator"] == "boundary"]
    assert all(st["batch_size"] == 4 and st["batch_used"] == 2 for st in boundary)
    assert success["summary"]["throughput"]["boundary"]["batch_used"] == 2
    assert 8 in wrapped[0].sizes and max(s for s in wrapped[0].sizes) == 8  # batch 4 was tried first
    assert any("out of memory at batch 4; retrying at batch 2" in m for m in logs)
    ModelHub.release()  # the wrapped model must not serve later tests


def test_out_of_memory_at_batch_1_fails_the_shard(staged, monkeypatch):
    from ood_core.stages.base import StageContext, is_shard_error
    from ood_core.stages.generate import BoundaryGenerator, run_batched

    def oom(self, ctx, items):
        raise RuntimeError("CUDA out of memory (fake)")

    monkeypatch.setattr(BoundaryGenerator, "generate_batch", oom)
    ctx = StageContext(staged["cfg"], None, {}, log=lambda m: None)
    from ood_core.stages.base import ShardOutput

    with pytest.raises(MemoryError, match="out of memory at batch size 1") as err:
        run_batched(BoundaryGenerator(), ctx, [{"source_key": "a"}, {"source_key": "b"}], ShardOutput(), 2)
    assert is_shard_error(err.value)


def test_text_to_image_batches_through_the_same_helper_with_equal_bytes(cache):
    from ood_core.config import TextToImageSpec
    from ood_core.models import load_text_to_image

    t2i = load_text_to_image(TextToImageSpec(name="tiny://sd-t2i", resolution=32), "cpu", cache)
    prompts, seeds = ["a photo of a volcano.", "a photo of a violin.", "a photo of a cactus."], [1, 2, 3]
    batch = t2i.generate(prompts, seeds, steps=2, guidance=7.5)
    alone = [t2i.generate([p], [s], steps=2, guidance=7.5)[0] for p, s in zip(prompts, seeds, strict=True)]
    assert [_png(im) for im in batch] == [_png(im) for im in alone]
    assert len({_png(im) for im in batch}) == 3
    assert Image.open(io.BytesIO(_png(batch[0]))).size == (32, 32)


# ---------------------------------------------------------------- the benchmark's GPU path, checked small on the CPU
def test_benchmark_projection_and_sd2_construction(score_fn):
    """The 50k-image projection arithmetic, and the SD-2-inpainting build (shrunk) through one batch."""
    from benchmarks.generate_bench import (
        build_sd2_inpainter,
        project_gpu_hours,
        sd2_inpaint_configs,
        unet_rows_per_image,
    )
    from ood_core.models.diffusion import InpaintJob, boundary_inpaint_batch

    assert unet_rows_per_image(20, 0.6, 3, 8.0) == 72  # SynOOD: 3 rounds x 12 steps x 2 (guidance)
    assert project_gpu_hours(2.0) == pytest.approx(50_000 / 2.0 / 3600)
    full = sd2_inpaint_configs(512)
    assert full["unet"]["in_channels"] == 9 and full["unet"]["sample_size"] == 64
    assert full["unet"]["block_out_channels"] == [320, 640, 1280, 1280] and full["unet"]["cross_attention_dim"] == 1024
    inp = build_sd2_inpainter("cpu", "bf16", resolution=32, width=0.1)
    assert inp.dtype == torch.float32 and inp.unet.config.in_channels == 9
    jobs = [InpaintJob(_photo(i), "grass", seed=i) for i in range(2)]
    res = boundary_inpaint_batch(inp, jobs, score_fn=score_fn, rounds=2, steps=2, strength=1.0, guidance=8.0)
    assert [r.image.size for r in res] == [(32, 32)] * 2 and all(np.isfinite(r.round_scores).all() for r in res)


def test_a_bad_item_fails_alone_and_the_rest_of_its_batch_is_kept():
    from ood_core.stages.base import ShardOutput, StageContext
    from ood_core.stages.generate import Generator, run_batched

    class Fake(Generator):
        name = "fake"
        calls: list[list[str]] = []

        def key(self, item):
            return item["k"]

        def columns(self, item):
            return {"kind": "fake"}

        def generate_batch(self, ctx, items):
            self.calls.append([it["k"] for it in items])
            if any(it["k"] == "bad" for it in items):
                raise ValueError("cannot decode bad")
            return [({"key": it["k"], "status": "ok", "reason": "ok"}, {"png": b"x"}) for it in items]

    out = ShardOutput()
    logs: list[str] = []
    stats = run_batched(Fake(), StageContext(load_config("tiny"), None, {}, log=logs.append),
                        [{"k": k} for k in ("a", "bad", "c", "d", "e")], out, 3)
    assert [(r["key"], r["status"]) for r in out.rows] == [
        ("a", "ok"), ("bad", "failed"), ("c", "ok"), ("d", "ok"), ("e", "ok")]
    assert Fake.calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"], ["d", "e"]]
    assert stats["images"] == 5 and stats["batch_used"] == 3 and logs[-1].startswith("[generate] fake: 5/5 images")

"""Tiny models built offline and loaded through the real loaders (open_clip, transformers, diffusers)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from ood_core.config import ClipSpec, DiffusionSpec, MLLMSpec  # noqa: E402
from ood_core.models import load_clip, load_inpainter, load_mllm, resolve_device, tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def clip(tiny_cache):
    return load_clip(ClipSpec(name=tiny.CLIP_MODEL_NAME, pretrained="tiny://clip"), "cpu", tiny_cache)


@pytest.fixture(scope="session")
def mllm(tiny_cache):
    return load_mllm(MLLMSpec(name="tiny://llava", max_new_tokens=8), "cpu", tiny_cache)


@pytest.fixture(scope="session")
def inpainter(tiny_cache):
    return load_inpainter(DiffusionSpec(name="tiny://sd-inpaint", resolution=64), "cpu", tiny_cache)


@pytest.fixture(scope="session")
def score_fn(clip):
    from ood_core.models.diffusion import energy_score_fn

    text = clip.encode_texts(["a photo of a dog", "a photo of a cat", "a photo of a car"])
    return energy_score_fn(clip, text)


def _photo(seed: int = 0, size=(80, 60)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda"}


def test_unknown_backend_and_kind(tiny_cache):
    import ood_core.models.clip  # noqa: F401
    from ood_core.models import CLIP_BACKENDS

    with pytest.raises(KeyError, match="open_clip"):
        CLIP_BACKENDS.get("nope")
    with pytest.raises(KeyError, match="sd-inpaint"):
        tiny.resolve("tiny://nope", tiny_cache)


def test_build_is_idempotent_and_atomic(tiny_cache, clip):
    first = tiny.resolve("tiny://clip", tiny_cache)
    weights = os.path.join(first, tiny.CLIP_WEIGHTS_FILE)
    mtime = os.path.getmtime(weights)
    assert tiny.resolve("tiny://clip", tiny_cache) == first
    assert os.path.getmtime(weights) == mtime
    leftovers = [n for n in os.listdir(os.path.dirname(first)) if n.startswith(".")]
    assert leftovers == []


def test_clip_encoders(clip):
    assert clip.image_size == 32 and clip.embed_dim == 64
    imgs = [_photo(i) for i in range(3)]
    f = clip.encode_images(imgs, batch_size=2)
    assert f.shape == (3, 64) and f.dtype == torch.float32 and f.device.type == "cpu"
    torch.testing.assert_close(f.norm(dim=-1), torch.ones(3))
    t = clip.encode_texts(["a dog", "a cat"])
    assert t.shape == (2, 64)
    torch.testing.assert_close(t.norm(dim=-1), torch.ones(2))
    assert not torch.allclose(t[0], t[1])


def test_encode_pixels_has_gradients(clip):
    pixels = torch.rand(2, 3, 48, 40, requires_grad=True)
    feats = clip.encode_pixels(pixels)
    assert feats.shape == (2, 64)
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(2))
    feats[:, 0].sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0


def test_encode_pixels_matches_encode_images_at_native_size(clip):
    img = _photo(3, size=(32, 32))
    pixels = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    with torch.no_grad():
        a = clip.encode_pixels(pixels)
    torch.testing.assert_close(a, clip.encode_images([img]), atol=1e-4, rtol=0)


def _messages(img):
    return [
        {"role": "system", "content": [{"type": "text", "text": "You are a careful assistant."}]},
        {
            "role": "user",
            "content": [
                {"type": "image", "image": img},
                {"type": "text", "text": "What does the image show?"},
            ],
        },
    ]


def test_mllm_chat(mllm):
    msgs = _messages(_photo(1))
    a = mllm.chat(msgs, seed=0)
    assert isinstance(a, str)
    assert mllm.chat(msgs, seed=0) == a
    # Text-only turns work too.
    assert isinstance(mllm.chat([{"role": "user", "content": "name three animals"}], max_new_tokens=4), str)


def test_mllm_sampling_is_seeded(mllm):
    msgs = _messages(_photo(2))
    old = mllm.temperature
    mllm.temperature = 1.0
    try:
        a, b = mllm.chat(msgs, seed=5), mllm.chat(msgs, seed=5)
        others = {mllm.chat(msgs, seed=s) for s in (6, 7, 8)}
    finally:
        mllm.temperature = old
    assert a == b
    assert others != {a}


def test_inpainter_components(inpainter):
    assert inpainter.unet.config.in_channels == 9
    assert inpainter.tokenizer.model_max_length == 77
    assert inpainter.encode_prompt("a photo").shape[-1] == inpainter.unet.config.cross_attention_dim


def _inpaint(inpainter, score_fn, **kw):
    from ood_core.models.diffusion import boundary_inpaint

    args = dict(score_fn=score_fn, seed=0, rounds=2, steps=4, strength=0.6, guidance=8.0, lr=10.0)
    args.update(kw)
    return boundary_inpaint(inpainter, _photo(4), "A photo only remain grass and sky.", **args)


def test_boundary_inpaint(inpainter, score_fn):
    res = _inpaint(inpainter, score_fn)
    assert res.image.size == (64, 64) and res.image.mode == "RGB"
    assert len(res.round_scores) == 2 and all(np.isfinite(res.round_scores))
    assert np.isfinite(res.score_before) and np.isfinite(res.score_after)
    # The kept image is the last round's (up to uint8 rounding).
    assert abs(res.score_after - res.round_scores[-1]) < 0.05

    again = _inpaint(inpainter, score_fn)
    assert np.array_equal(np.asarray(again.image), np.asarray(res.image))
    assert again.round_scores == res.round_scores

    other = _inpaint(inpainter, score_fn, seed=1)
    assert not np.array_equal(np.asarray(other.image), np.asarray(res.image))


def test_boundary_inpaint_guidance_moves_noise(inpainter, score_fn):
    guided = _inpaint(inpainter, score_fn, lr=10.0)
    frozen = _inpaint(inpainter, score_fn, lr=0.0)
    # Without updates every round sees the same noise; with updates the later rounds change.
    assert frozen.round_scores[0] == pytest.approx(frozen.round_scores[1])
    assert guided.round_scores[0] == pytest.approx(frozen.round_scores[0])
    assert guided.noise_updates and guided.noise_updates[0] > 0
    assert guided.round_scores[1] != pytest.approx(frozen.round_scores[1])
    assert not np.array_equal(np.asarray(guided.image), np.asarray(frozen.image))


def test_boundary_inpaint_box_mask(inpainter, score_fn):
    from ood_core.models.diffusion import center_box_mask

    res = _inpaint(inpainter, score_fn, mask=center_box_mask(64, 0.5), rounds=1)
    assert res.image.size == (64, 64)


def test_mllm_qwen2_vl(tiny_cache):
    client = load_mllm(MLLMSpec(name="tiny://qwen2-vl", max_new_tokens=6), "cpu", tiny_cache)
    assert type(client.model).__name__ == "Qwen2VLForConditionalGeneration"
    msgs = _messages(_photo(5))
    out = client.chat(msgs, seed=0)
    assert isinstance(out, str) and client.chat(msgs, seed=0) == out


def test_non_tiny_names_pass_through(tiny_cache):
    from ood_core.models import resolve_name

    assert resolve_name("stabilityai/stable-diffusion-2-inpainting", tiny_cache) == (
        "stabilityai/stable-diffusion-2-inpainting"
    )
    assert resolve_name("/some/local/dir", tiny_cache) == "/some/local/dir"


def test_build_is_deterministic_and_thread_safe(tmp_path):
    import threading

    from safetensors.torch import load_file

    results = []
    threads = [
        threading.Thread(target=lambda: results.append(tiny.build("clip", tmp_path / "a"))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "a"] * 2
    tiny.build("clip", tmp_path / "b")
    a = load_file(str(tmp_path / "a" / tiny.CLIP_WEIGHTS_FILE))
    b = load_file(str(tmp_path / "b" / tiny.CLIP_WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]


def test_m_out_auto_guidance_pushes_toward_ood(inpainter, score_fn):
    """With ``m_out: auto`` the last round's score is nearer -ln K (uniform logits, OOD) than
    without updates (lr 0) on the same seeds; each guided sample records that it moved."""
    import math

    from ood_core.models.diffusion import resolve_m_out

    k = 3  # the score_fn fixture's ID prompts
    m_out = resolve_m_out("auto", k)
    guided, frozen = [], []
    for seed in (0, 1, 2):
        g = _inpaint(inpainter, score_fn, seed=seed, rounds=3, lr=10.0, m_out=m_out, grad_batch=2)
        f = _inpaint(inpainter, score_fn, seed=seed, rounds=3, lr=0.0, m_out=m_out, grad_batch=2)
        assert f.moved_toward_ood is None and g.moved_toward_ood is not None
        guided.append(g.round_scores[-1])
        frozen.append(f.round_scores[-1])
    assert abs(np.mean(guided) + math.log(k)) < abs(np.mean(frozen) + math.log(k))

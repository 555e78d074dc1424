"""What batching does to a sample's bytes, measured in a fresh process (tests/test_batching.py).

Run by the tests in a subprocess, because thread-count and instruction-set variables
(``OMP_NUM_THREADS``, ``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``) only take effect when
set before torch is imported. Usage::

    python tests/numerics_probe.py MODEL_CACHE OUT_DIR [--batch-invariant]

Tiny models on the CPU: four boundary-inpainting jobs (each its own seed, prompt, mask and
target) at batch 4, again at batch 4 from a fresh model load, and one at a time; three
text-to-image samples at batch 3, again from a fresh load, and one at a time. Writes the pixels to
``OUT_DIR/pixels.npz`` and prints one JSON digest: PNG hashes, round scores and the numerics
record (``ood_core.models.diffusion.numerics_record``). Asserts nothing: the test does.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

BOUNDARY = dict(rounds=2, steps=4, strength=0.6, guidance=8.0, lr=10.0, grad_batch=2)
T2I = dict(steps=3, guidance=7.5)
T2I_PROMPTS = ["a photo of a volcano.", "a photo of a violin.", "a photo of a cactus."]
T2I_SEEDS = [1, 2, 3]


def photo(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8))


def main(cache: str, out_dir: str, invariant: bool) -> dict:
    from ood_core.config import ClipSpec, DiffusionSpec, TextToImageSpec
    from ood_core.models import load_clip, load_inpainter, load_text_to_image, tiny
    from ood_core.models.diffusion import (
        InpaintJob,
        boundary_inpaint_batch,
        center_box_mask,
        energy_score_fn,
        numerics_record,
    )
    from ood_core.stages.generate import png_bytes

    clip = load_clip(ClipSpec(name=tiny.CLIP_MODEL_NAME, pretrained="tiny://clip"), "cpu", cache)
    score_fn = energy_score_fn(clip, clip.encode_texts(["a photo of a dog", "a photo of a cat", "a photo of a car"]))
    jobs = [
        InpaintJob(photo(i), f"a photo of grass and sky, take {i}", seed=100 + i,
                   mask=center_box_mask(64) if i == 2 else None, m_out=-5.0 if i != 3 else -4.0)
        for i in range(4)
    ]

    def inpainter():  # a fresh load each time: nothing carried over between runs
        return load_inpainter(DiffusionSpec(name="tiny://sd-inpaint", resolution=64, batch_invariant=invariant),
                              "cpu", cache)

    def t2i():
        return load_text_to_image(TextToImageSpec(name="tiny://sd-t2i", resolution=64, batch_invariant=invariant),
                                  "cpu", cache)

    inp = inpainter()
    runs = {
        "b4": boundary_inpaint_batch(inp, jobs, score_fn=score_fn, **BOUNDARY),
        "b4_again": boundary_inpaint_batch(inpainter(), jobs, score_fn=score_fn, **BOUNDARY),
        "b1": [boundary_inpaint_batch(inp, [job], score_fn=score_fn, **BOUNDARY)[0] for job in jobs],
    }
    pipe = t2i()
    images = {
        "t2i_b3": pipe.generate(T2I_PROMPTS, T2I_SEEDS, **T2I),
        "t2i_b3_again": t2i().generate(T2I_PROMPTS, T2I_SEEDS, **T2I),
        "t2i_b1": [pipe.generate([p], [s], **T2I)[0] for p, s in zip(T2I_PROMPTS, T2I_SEEDS, strict=True)],
    }
    images |= {name: [r.image for r in results] for name, results in runs.items()}

    np.savez(os.path.join(out_dir, "pixels.npz"),
             **{name: np.stack([np.asarray(im, dtype=np.uint8) for im in ims]) for name, ims in images.items()})
    return {
        "png_sha256": {name: [hashlib.sha256(png_bytes(im)).hexdigest() for im in ims] for name, ims in images.items()},
        "round_scores": {name: [r.round_scores for r in results] for name, results in runs.items()},
        "noise_updates": {name: [r.noise_updates for r in results] for name, results in runs.items()},
        "numerics": numerics_record(inp, batch=len(jobs)),
    }


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2], "--batch-invariant" in sys.argv[3:])))

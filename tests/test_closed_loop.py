"""Closed-loop rounds (issue 20, item 3): with ``generate.scorer: latest_round`` the boundary noise
step follows the previous round's fine-tuned detector (its adapter), not frozen CLIP."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from ood_core.config import load_config  # noqa: E402
from ood_core.pipeline import resolve_keys, run_local  # noqa: E402
from tests.test_batching import _overrides  # noqa: E402


def test_frozen_scorer_keeps_the_keys_and_latest_round_changes_only_generate_and_later():
    frozen = resolve_keys(load_config("tiny", {"generate.round": "r2"}))
    assert frozen == resolve_keys(load_config("tiny", {"generate.round": "r2", "generate.scorer": "frozen"}))
    closed = resolve_keys(load_config("tiny", {"generate.round": "r2", "generate.scorer": "latest_round"}))
    assert closed["sketch"] == frozen["sketch"] and closed["generate"] != frozen["generate"]


def test_an_adapter_changes_the_energy_and_the_identity_adapter_does_not():
    from ood_core.adapter import ResidualAdapter
    from ood_core.models.diffusion import energy_score_fn

    class Clip:
        device = torch.device("cpu")

        def encode_pixels(self, pixels, normalize=True):
            f = pixels.flatten(1)[:, :8] * 3.0
            return torch.nn.functional.normalize(f, dim=-1) if normalize else f

    text = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    pixels = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    frozen = energy_score_fn(Clip(), text)(pixels)
    tiny = ResidualAdapter(8, init_gain=1e-12)  # residual ~0: the detector is frozen CLIP
    assert torch.allclose(energy_score_fn(Clip(), text, adapter=tiny)(pixels), frozen, atol=1e-5)
    moved = ResidualAdapter(8, init_gain=1.0, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(energy_score_fn(Clip(), text, adapter=moved)(pixels), frozen, atol=1e-3)


@pytest.mark.slow
def test_round_two_follows_round_ones_detector(tmp_path, capsys):
    cache = str(tmp_path / "models")
    root = str(tmp_path / "closed")
    logs: list[str] = []

    def run(round_name: str, scorer: str, out: str):
        cfg = load_config("tiny", _overrides(cache, **{"generate.round": round_name, "generate.scorer": scorer}))
        results = run_local(cfg, out, log=logs.append)
        return cfg, results

    run("r1", "latest_round", root)
    assert any("closed loop: the noise step follows frozen CLIP" in m for m in logs)
    logs.clear()
    cfg, results = run("r2", "latest_round", root)
    r1_finetune = resolve_keys(load_config("tiny", _overrides(cache, **{"generate.round": "r1",
                                                                       "generate.scorer": "latest_round"})))["finetune"]
    assert results["generate"]["upstream"]["finetune@r1"] == r1_finetune
    assert any("follows the fine-tuned detector of finetune@r1" in m for m in logs), logs
    # the same round-2 samples scored by frozen CLIP start from another energy
    _, open_loop = run("r2", "frozen", str(tmp_path / "open"))

    def scores(res, out):
        table = pq.read_table(f"{out}/generate/{res['generate']['key']}/manifests/000000.parquet").to_pylist()
        return {r["key"]: r["score_before"] for r in table if r["kind"] == "boundary"}

    closed, frozen = scores(results, root), scores(open_loop, str(tmp_path / "open"))
    assert closed.keys() == frozen.keys() and closed != frozen

    # the metrics of both rounds: in `synth-ood status` and as a plot in round 2's report
    import argparse

    from flows.cli import cmd_status

    capsys.readouterr()
    assert cmd_status(argparse.Namespace(dir=root)) == 0
    out = capsys.readouterr().out
    table = out.split("metrics per round", 1)[1].splitlines()
    assert [line.split()[0] for line in table[2:4]] == ["r1", "r2"], out
    artifacts = f"{root}/finetune/{results['finetune']['key']}/artifacts"
    assert "![Metrics per round](rounds.png)" in open(f"{artifacts}/report.md").read()
    assert open(f"{artifacts}/rounds.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"

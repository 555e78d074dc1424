"""The pipeline on the trained world models: real labels, real yes/no answers, scores that mean something.

The world preset at a reduced size. Every filter runs at its default threshold. Where a world
model does not ship in this version the test is skipped with the reason (the diffusion models
included).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from ood_core.world import concepts as C
from ood_core.world import weights as W

pytestmark = pytest.mark.slow


def _missing(*models: str) -> list[str]:
    return [m for m in models if not (W.WEIGHTS_DIR / m / W.RECORD).is_file()]


@pytest.fixture(scope="module")
def world_run(tmp_path_factory):
    from ood_core.config import load_config
    from ood_core.pipeline import resolve_keys, run_local
    from ood_core.storage import StageStore

    if missing := _missing("clip", "llava", "sd-inpaint", "sd-t2i"):
        pytest.skip(f"world models {missing} do not ship in this version")
    tmp = tmp_path_factory.mktemp("world-run")
    overrides = {"data.images_per_class": "16", "sketch.sources_per_class": "4", "generate.rounds": "2",
                 "generate.images_per_label": "1", "models.cache_dir": str(tmp / "models")}
    cfg = load_config("world", overrides)
    root = str(tmp / "run")
    results = run_local(cfg, root, log=lambda m: None)
    keys = resolve_keys(cfg)
    rows = {s: StageStore(root, s, keys[s]).read_manifest().to_pylist() for s in ("sketch", "generate", "elaborate")}
    return {"results": results, "rows": rows, "root": root, "keys": keys, "overrides": overrides}


def test_sketch_labels_come_from_the_world_mllm_and_pass_hygiene(world_run):
    rows = world_run["rows"]["sketch"]
    world_words = C.world_labels()
    for kind in ("far", "near", "fine"):
        kept = [r["text"] for r in rows if r.get("kind") == kind and r["status"] == "kept"]
        assert kept, f"no {kind} label kept: {[(r['key'], r['reason']) for r in rows if r.get('kind') == kind]}"
        assert all(t in world_words for t in kept), kept
    # the world MLLM also names evaluation classes (letter a, stripes ...): the leakage filter drops them
    leaked = [r for r in rows if r.get("leakage")]
    assert leaked and all(r["status"] == "rejected" for r in leaked)
    contexts = [r for r in rows if r.get("kind") == "context"]
    assert contexts and all(r["text"] and "background" in r["text"] for r in contexts)


def test_generate_paints_both_kinds_with_the_world_diffusion_models(world_run):
    rows = world_run["rows"]["generate"]
    by_kind = {k: [r for r in rows if r["kind"] == k] for k in {r["kind"] for r in rows}}
    assert "boundary" in by_kind and set(by_kind) & {"far", "near"}, sorted(by_kind)  # inpainted and text-to-image
    for g, kind_rows in by_kind.items():
        if g == "multi_os":  # candidates outside the blank areas are rejected: its own test below
            continue
        assert kind_rows and all(r["status"] == "ok" for r in kind_rows), (g, [r["reason"] for r in kind_rows])


def test_elaborate_holds_real_conversations_at_the_default_thresholds(world_run):
    rows = world_run["rows"]["elaborate"]
    assert rows
    verdicts = [r["id_visible"] for r in rows if r.get("id_visible") is not None]
    clear = [v for v in verdicts if v in ("yes", "no")]
    assert len(clear) >= 0.8 * len(verdicts), verdicts
    asked = [r for r in rows if r.get("kind") in ("far", "near") and r["status"] != "failed"]
    labelled = [r for r in asked if r.get("elaborated_label")]
    assert asked and len(labelled) >= 0.8 * len(asked), [(r["key"], r.get("answer_label")) for r in asked][:10]
    assert sum(r["status"] == "kept" for r in rows) >= 8


def test_zero_shot_scores_separate_id_from_every_world_ood_set(world_run):
    """Scores computed where finetune computes them: an ID/OOD swap there would put these below 0.5."""
    from ood_core.storage import StageStore

    store = StageStore(world_run["root"], "finetune", world_run["keys"]["finetune"])
    done = json.loads(store.read_bytes(store.path("artifacts", "metrics.json")))
    for ood_set in C.EVAL_SETS:
        assert done["results"]["mcm"][ood_set]["auroc"] > 0.6, json.dumps(done["results"]["mcm"])
    assert done["id_accuracy"]["zero_shot"] > 0.8


def test_multi_os_rows_on_the_world_models_and_their_own_training_set(world_run):
    """Multi-OS on the world: every origin has rows, evaluation class names among the lexicon probes
    are rejected as leaks, every answer of the world LLaVA is recorded, and each painted image's
    recorded alignment is its cosine with its own text. (The world text-to-image model paints these
    concepts barely recognisably: own text 0.117 vs other texts 0.115 on average, measured; so no
    own-above-shuffled assertion here.)"""
    from ood_core.config import load_config
    from ood_core.storage import StageStore
    from tests.test_multi_os import recompute_alignment

    rows = [r for r in world_run["rows"]["generate"] if r["kind"] == "multi_os"]
    assert {r["origin"] for r in rows} == {"blank", "embed_interp", "llm_interp", "counterfactual"}
    assert any(r["reason"] == "leaks_eval_ood" for r in rows)
    asked = [r for r in rows if r["origin"] in ("llm_interp", "counterfactual")]
    assert asked and all(r["mllm_answer"] is not None for r in asked)
    painted = [r for r in rows if r["alignment"] is not None]
    assert painted
    cfg = load_config("world", world_run["overrides"])
    own, to_id = recompute_alignment(cfg, StageStore(world_run["root"], "generate", world_run["keys"]["generate"]),
                                     painted)
    assert np.allclose([r["alignment"] for r in painted], own, atol=1e-4)
    assert np.allclose([r["alignment_id"] for r in painted], to_id, atol=1e-4)
    train = world_run["results"]["finetune"]["summary"]["multi_os_train"]
    gen = {r["key"]: r for r in rows}
    assert train["data"] == "multi_os" and train["synthetic_keys"]
    assert all(gen[k]["status"] == "ok" for k in train["synthetic_keys"])


def _world_clip_and_names(world_run):
    from ood_core.config import load_config
    from ood_core.data import load_id_dataset
    from ood_core.models import load_clip

    cfg = load_config("world", world_run["overrides"])
    return cfg, load_clip(cfg.models.clip, "cpu", cfg.models.cache_dir), load_id_dataset(cfg.data, cfg.seed).classnames


def test_energy_rounds_move_the_world_clip_score_toward_m_out(world_run):
    """Each boundary image's recorded score is the world CLIP's energy score of its stored PNG with the
    ID prompts (a scorer fed other prompts records something else), and the rounds bring it nearer
    m_out on most samples (a flipped step, or a target on the wrong side of the score range, does not).
    Measured on world seeds 0-2 at the preset's size: 92-94 % of samples move toward m_out."""
    import io

    import torch
    from PIL import Image

    from ood_core.models.diffusion import resolve_m_out
    from ood_core.stages.base import ID_PROMPT
    from ood_core.storage import StageStore

    cfg, clip, names = _world_clip_and_names(world_run)
    rows = [r for r in world_run["rows"]["generate"] if r["kind"] == "boundary" and r["status"] == "ok"]
    assert len(rows) >= 8
    store = StageStore(world_run["root"], "generate", world_run["keys"]["generate"])
    files = store.load_samples({r["key"] for r in rows}, {r["shard"] for r in rows})
    text = clip.encode_texts([ID_PROMPT.format(c) for c in names])
    img = clip.encode_images([Image.open(io.BytesIO(files[r["key"]]["png"])) for r in rows])
    logits = cfg.finetune.logit_scale * img @ text.T
    score = (logits.mean(-1) - torch.logsumexp(logits, dim=-1)).numpy()
    recorded = np.array([r["score_after"] for r in rows])
    assert np.allclose(score, recorded, atol=0.05 * np.abs(recorded).max()), np.c_[score, recorded][:8]
    m_out = resolve_m_out(cfg.generate.m_out, len(names))
    closer = [abs(r["score_after"] - m_out) < abs(r["score_before"] - m_out) for r in rows]
    assert np.mean(closer) >= 0.75, closer


def test_the_fine_tuned_adapter_lowers_the_id_mass_of_synthetic_images_not_of_id_images(world_run):
    """SynOOD's adapter is trained with the kept synthetic images labelled as negatives: over the ID
    prompts + the tuned negatives it takes ID softmax mass from them and leaves the ID test images'
    (the wrong images or labels paired for training, or an adapter that is not applied, do not).
    Measured on world seed 0 (1-30 epochs): synthetic 0.34 -> 0.01-0.26, ID test 0.9999 -> 0.96-0.999."""
    import torch
    from safetensors.torch import load as load_safetensors

    from ood_core.adapter import load_adapter
    from ood_core.stages.base import ID_PROMPT
    from ood_core.stages.finetune import load_role_features
    from ood_core.storage import StageStore

    cfg, clip, names = _world_clip_and_names(world_run)
    store = StageStore(world_run["root"], "finetune", world_run["keys"]["finetune"])
    roles = load_role_features(store)
    adapter = load_adapter(store.read_bytes(store.path("artifacts", "adapter.safetensors")))
    (negatives,) = load_safetensors(store.read_bytes(store.path("artifacts", "tuned_negatives.safetensors"))).values()
    texts = torch.cat([clip.encode_texts([ID_PROMPT.format(c) for c in names]),
                       torch.nn.functional.normalize(negatives.float(), dim=-1)])  # fmt: skip

    def mass_drop(role: str) -> float:
        x = torch.from_numpy(roles[role].feats).float()
        with torch.no_grad():
            before = (cfg.finetune.logit_scale * torch.nn.functional.normalize(x, dim=-1) @ texts.T).softmax(-1)
            after = (cfg.finetune.logit_scale * adapter(x) @ texts.T).softmax(-1)
        return float((before[:, : len(names)].sum(-1) - after[:, : len(names)].sum(-1)).mean())

    synthetic, id_test = mass_drop("synthetic"), mass_drop("id_test")
    assert synthetic > id_test + 0.05, (synthetic, id_test)

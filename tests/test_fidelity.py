"""Each formula against the released reference code, written out here in numpy / plain torch.

References (file @ commit) are named per test; inputs are small and random, tolerances 1e-6, and
every project function runs at its reference default settings.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ood_core.adapter import ResidualAdapter, apply_adapter, train_image_adapter, train_negative_text_released
from ood_core.config import FinetuneConfig, GenerateConfig, SketchConfig
from ood_core.dedup import cross_shard_duplicates
from ood_core.models.diffusion import noise_step, resolve_m_out
from ood_core.scores import SCORES, ScoreContext, neglabel, score_temperature
from ood_core.stages.sketch import neg_mining_keep

REF = FinetuneConfig()  # the reference defaults


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture
def feats():
    rng = np.random.default_rng(7)
    return {
        "img": _unit(rng.normal(size=(12, 16))).astype(np.float32),
        "idt": _unit(rng.normal(size=(5, 16))).astype(np.float32),
        "neg": _unit(rng.normal(size=(37, 16))).astype(np.float32),
        "out": _unit(rng.normal(size=(6, 16))).astype(np.float32),
    }


# ------------------------------------------------------------------ 1. noise step (SynOOD generate)
def test_noise_step_is_the_reference_step_in_unscaled_latents():
    """generate_near_ood_sample.py@e13114e: latents /= scaling_factor; decode; energy loss
    ((-5 - s)^2).mean() over the batch (--batch-size 2); noises -= latents.grad * lr (lr 10)."""
    g = torch.Generator().manual_seed(0)
    dec = torch.nn.Conv2d(4, 3, 1).double()  # float64: the comparison is about the formula
    with torch.no_grad():
        dec.weight.copy_(torch.randn(dec.weight.shape, generator=g, dtype=torch.float64))
        dec.bias.zero_()
    head = torch.randn(3 * 8 * 8, 10, generator=g, dtype=torch.float64) * 0.3  # K = 10 "classes"

    def decode01(u):
        return (torch.tanh(dec(u)) / 2 + 0.5).clamp(0, 1)

    def score(pixels):
        logits = pixels.flatten(1) @ head
        return logits.mean(-1) - torch.logsumexp(logits, -1)

    sf = 0.18215
    latents = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    cfg = GenerateConfig()
    assert cfg.lr == 10.0 and cfg.grad_batch == 2

    # the reference, batch of two
    u = (latents / sf).clone().requires_grad_(True)
    s = score(decode01(u))
    loss = torch.pow(-5 - s, 2).mean()
    loss.backward()
    expected = eps - u.grad * 10.0

    for i in range(2):
        got, _, _ = noise_step(decode01, latents[i : i + 1], sf, eps[i : i + 1], score,
                               m_out=-5.0, lr=cfg.lr, grad_batch=cfg.grad_batch)
        assert (got - expected[i : i + 1]).abs().max() < 1e-6, (got - expected[i : i + 1]).abs().max()
    # the old step (gradient w.r.t. the scaled latents) is 1/sf times larger
    z = latents[:1].clone().requires_grad_(True)
    (gz,) = torch.autograd.grad(torch.pow(-5 - score(decode01(z / sf)), 2).sum() / 2, z)
    assert torch.allclose(gz * sf, u.grad[:1], atol=1e-6, rtol=1e-5)


def test_m_out_auto_is_minus_five_at_1000_classes_and_keeps_its_margin():
    assert GenerateConfig().m_out == "auto"
    assert resolve_m_out("auto", 1000) == pytest.approx(-5.0, abs=1e-12)
    for k in (2, 5, 10, 21843):
        m = resolve_m_out("auto", k)
        # s = mean - logsumexp <= -ln K: the target stays above the bound by the reference's margin
        assert m > -math.log(k)
        assert m + math.log(k) == pytest.approx(math.log(1000) - 5.0)
    assert resolve_m_out(-3.5, 5) == -3.5
    # the fixed -5 lies on the confident side of the bound at K = 5 (what auto fixes)
    assert -5.0 < -math.log(5)


# ------------------------------------------------------------------ 3. scores at their temperatures
def test_scores_at_reference_temperatures(feats):
    """EOE utils/detection_util.py@20fa95e (MCM / energy / max-logit / EOE with --T 1, energy
    --T 0.01 in eval.sh, beta 0.25) and NegLabel clip_ood.py@3253db6 (t = 1 on 100 * cos)."""
    img, idt, neg, out = (torch.from_numpy(feats[k]).double() for k in ("img", "idt", "neg", "out"))
    cos = img @ idt.T
    ref = {
        "mcm": F.softmax(cos / 1.0, dim=1).max(1).values,
        "energy": 0.01 * torch.logsumexp(cos / 0.01, dim=1),
        "max_logit": cos.max(1).values,
    }
    sm = F.softmax(img @ torch.cat([idt, out]).T / 1.0, dim=1)
    ref["eoe"] = sm[:, :5].max(1).values - 0.25 * sm[:, 5:].max(1).values
    ctx = ScoreContext(feats["img"], feats["idt"], feats["neg"], feats["out"], cfg=REF)
    for name, expected in ref.items():
        np.testing.assert_allclose(SCORES.get(name)(ctx), expected.numpy(), atol=1e-6, rtol=0, err_msg=name)
    assert {m: score_temperature(m, REF) for m in ("mcm", "energy", "max_logit", "eoe", "neglabel")} == {
        "mcm": 1.0, "energy": 0.01, "max_logit": 1.0, "eoe": 1.0, "neglabel": 0.01}


def test_eoe_averages_its_score_over_independent_label_sets(feats):
    """EOE's eval.sh runs each of 4 label files (--json_number 0..3, L = 500); over N sets the score
    is the mean of the N single-set EOE scores, each written out as utils/detection_util.py does."""
    rng = np.random.default_rng(11)
    sets = [feats["out"]] + [_unit(rng.normal(size=(n, 16))).astype(np.float32) for n in (4, 9, 6)]
    img, idt = torch.from_numpy(feats["img"]).double(), torch.from_numpy(feats["idt"]).double()

    def single(out):  # softmax over [ID + outliers] of raw cosines, max ID - 0.25 max outlier
        sm = F.softmax(img @ torch.cat([idt, torch.from_numpy(out).double()]).T / 1.0, dim=1)
        return (sm[:, :5].max(1).values - 0.25 * sm[:, 5:].max(1).values).numpy()

    expected = (single(sets[0]) + single(sets[1]) + single(sets[2]) + single(sets[3])) / 4
    ctx = ScoreContext(feats["img"], feats["idt"], outlier_text_feats=sets[0], outlier_sets=sets[1:], cfg=REF)
    np.testing.assert_allclose(SCORES.get("eoe")(ctx), expected, atol=1e-6, rtol=0)
    assert not np.allclose(expected, single(sets[0]), atol=1e-4)  # the further sets change the score
    one = ScoreContext(feats["img"], feats["idt"], outlier_text_feats=sets[0], cfg=REF)
    np.testing.assert_allclose(SCORES.get("eoe")(one), single(sets[0]), atol=1e-6, rtol=0)


def _neglabel_reference(img, idt, neg, ngroup, seed=0):
    """ScalableClassifier.grouping: drop the M % ngroup remainder, torch.manual_seed(0) randperm,
    contiguous groups, softmax(cat([pos, group]) / t).sum over ID, mean over groups."""
    pos, negs = 100.0 * img @ idt.T, 100.0 * img @ neg.T
    drop = negs.shape[1] % ngroup
    if drop > 0:
        negs = negs[:, :-drop]
    torch.manual_seed(seed)
    idx = torch.randperm(negs.shape[1])
    negs = negs.T[idx].T.reshape(pos.shape[0], ngroup, -1)
    scores = [F.softmax(torch.cat([pos, negs[:, i, :]], -1) / 1, -1)[:, : pos.shape[1]].sum(-1) for i in range(ngroup)]
    return torch.stack(scores, -1).mean(-1)


def test_neglabel_grouping_drops_the_remainder(feats):
    img, idt, neg = (torch.from_numpy(feats[k]).double() for k in ("img", "idt", "neg"))
    for ngroup in (5, 6, 10):  # 37 negatives: remainders 2, 1, 7
        expected = _neglabel_reference(img, idt, neg, ngroup)
        got = neglabel(feats["img"], feats["idt"], feats["neg"], tau=REF.neglabel_tau, groups=ngroup, seed=0)
        np.testing.assert_allclose(got, expected.numpy(), atol=1e-6, rtol=0)
    assert REF.neglabel_template == "the nice {}" and SketchConfig().neg_id_template == "the nice {}"


# ------------------------------------------------------------------ 4. NegMining keep count
def test_neg_mining_keeps_floor_of_the_fraction():
    """multi_modal.py@3253db6: torch.quantile(sim, 0.95, -1); argsort; keep int(len * 0.15)."""
    rng = np.random.default_rng(3)
    cfg = SketchConfig()
    for n in (33, 47, 120):  # 33 * 0.15 = 4.95: floor 4, round 5
        sim = rng.normal(size=(n, 7)).astype(np.float32)
        q = torch.quantile(torch.from_numpy(sim), q=cfg.neg_percentile / 100, dim=-1)
        expected = torch.argsort(q)[: int(n * cfg.neg_keep_fraction)].numpy()
        got = neg_mining_keep(sim, cfg.neg_keep_fraction, cfg.neg_percentile)
        assert len(got) == int(n * 0.15)
        assert set(got.tolist()) == set(expected.tolist())


# ------------------------------------------------------------------ 6. SynOOD fine-tuning steps
def test_adapter_one_step_matches_ind_ood_projection():
    """ind_ood_projection.py@e13114e: raw features f; f + Sequential(Linear, LayerNorm, ReLU)(f);
    normalise; CE(100 * f @ text.T); Adam(1e-3, wd 1e-5); LayerNorm at PyTorch's default gain."""
    g = torch.Generator().manual_seed(0)
    d, n = 16, 10
    x = torch.randn(n, d, generator=g) * 8  # raw CLIP features are not unit norm
    text = F.normalize(torch.randn(6, d, generator=g), dim=-1)
    y = torch.randint(0, 6, (n,), generator=g)
    cfg = REF.model_copy(update={"epochs": 1, "batch_size": 64})

    init = ResidualAdapter(d, init_gain=REF.adapter_init_gain, generator=torch.Generator().manual_seed(5))
    proj = torch.nn.Sequential(torch.nn.Linear(d, d), torch.nn.LayerNorm(d), torch.nn.ReLU())
    assert torch.equal(proj[1].weight, torch.ones(d))  # PyTorch's default LayerNorm gain
    assert torch.equal(init.norm.weight, proj[1].weight)
    with torch.no_grad():
        proj[0].weight.copy_(init.linear.weight)
        proj[0].bias.copy_(init.linear.bias)
    opt = torch.optim.Adam(proj.parameters(), lr=1e-3, weight_decay=1e-5)
    f = x + proj(x)
    f = f / f.norm(dim=-1, keepdim=True)
    loss = F.cross_entropy(100.0 * f @ text.t(), y)
    opt.zero_grad()
    loss.backward()
    opt.step()

    ad, hist = train_image_adapter(x, y, text, cfg, seed=5)
    assert hist[0] == pytest.approx(float(loss.detach()), abs=1e-6)
    assert torch.allclose(ad.linear.weight, proj[0].weight, atol=1e-6, rtol=0)
    assert torch.allclose(ad.linear.bias, proj[0].bias, atol=1e-6, rtol=0)
    assert torch.allclose(ad.norm.weight, proj[1].weight, atol=1e-6, rtol=0)
    np.testing.assert_allclose(apply_adapter(ad, x), F.normalize(x + proj(x), dim=-1).detach().numpy(), atol=1e-6)


def test_adapter_cosine_schedule_steps_per_epoch():
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(40, 8, generator=g), F.normalize(torch.randn(3, 8, generator=g), dim=-1)
    y = torch.randint(0, 3, (40,), generator=g)
    seen = []
    orig = torch.optim.Adam.step

    def spy(self, *a, **k):
        seen.append(self.param_groups[0]["lr"])
        return orig(self, *a, **k)

    torch.optim.Adam.step = spy
    try:
        train_image_adapter(x, y, text, REF.model_copy(update={"epochs": 3, "batch_size": 16}), seed=0)
    finally:
        torch.optim.Adam.step = orig
    # 3 batches per epoch, lr constant within an epoch: CosineAnnealingLR(T_max=3, eta_min=1e-5)
    lrs = [1e-5 + (1e-3 - 1e-5) * (1 + math.cos(math.pi * e / 3)) / 2 for e in range(3)]
    assert seen == pytest.approx([lr for lr in lrs for _ in range(3)], abs=1e-12)


def test_text_side_one_step_matches_ood_label_finetuning():
    """ood_label_finetuning.py + custom_clip.image_forward@e13114e: raw text embeddings of the
    assigned labels only are the parameters; logits = 100 * norm(img) @ norm(emb).T (softmax over
    those negatives only); SGD(2e-2, momentum 0.9, wd 1e-5)."""
    g = torch.Generator().manual_seed(2)
    d = 16
    raw_neg = torch.randn(9, d, generator=g) * 5
    img = torch.randn(12, d, generator=g) * 7
    assigned = torch.tensor([1, 4, 4, 7, 1, 1, 7, 4, 7, 1, 4, 4])
    cfg = REF.model_copy(update={"text_epochs": 1, "batch_size": 64})

    classes = sorted(set(assigned.tolist()))
    emb = torch.nn.Parameter(raw_neg[classes].clone())
    label = torch.tensor([classes.index(a) for a in assigned.tolist()])
    optim = torch.optim.SGD([{"params": emb}], lr=2e-2, momentum=0.9, weight_decay=1e-5)
    image_features = img / img.norm(dim=-1, keepdim=True)
    text_features = emb / emb.norm(dim=-1, keepdim=True)
    loss = F.cross_entropy(100.0 * image_features @ text_features.t(), label)
    optim.zero_grad()
    loss.backward()
    optim.step()

    tuned, used, hist = train_negative_text_released(img, assigned, raw_neg, cfg, seed=0)
    assert used.tolist() == classes and hist[0] == pytest.approx(float(loss.detach()), abs=1e-6)
    np.testing.assert_allclose(tuned[classes], F.normalize(emb.detach(), dim=-1).numpy(), atol=1e-6)
    others = [i for i in range(9) if i not in classes]  # not assigned: not trainable
    np.testing.assert_allclose(tuned[others], F.normalize(raw_neg[others], dim=-1).numpy(), atol=1e-7)


# ------------------------------------------------------------------ 10. duplicates across shards
def test_cross_shard_duplicates_use_an_index_of_earlier_kept_images():
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(6, 32))).astype(np.float32)
    near = _unit(base[1] + 0.01 * rng.normal(size=32)).astype(np.float32)
    shards = [
        (["a0", "a1"], base[:2]),
        (["b0", "b1"], np.stack([base[2], near])),  # b1 duplicates a1 from another shard
        (["c0", "c1"], np.stack([base[3], near])),  # c1 duplicates a1 too (b1 never entered the index)
        ([], np.zeros((0, 32), np.float32)),
    ]
    dups = cross_shard_duplicates(shards, threshold=0.98)
    assert set(dups) == {"b1", "c1"} and dups["b1"][0] == "a1" and dups["c1"][0] == "a1"
    assert dups["b1"][1] > 0.98
    # the same images within one shard are left to the shard's own filter
    assert cross_shard_duplicates([(["x", "y"], np.stack([base[1], near]))], 0.98) == {}


# ------------------------------------------------------------------ 7. fine-grained outlier labels
def test_fine_grained_labels_go_through_the_same_hygiene():
    """EOE's fine_grained task: other kinds of the ID super-category, not ID classes."""
    from types import SimpleNamespace

    from ood_core.config import RunConfig
    from ood_core.stages.base import ShardOutput
    from ood_core.stages.sketch import SketchStage

    asked = []

    class FakeMLLM:
        def chat(self, messages, seed=0):
            asked.append(messages[0]["content"][0]["text"])
            return "Sure:\n1. sushi\n2. Cat\n3. ramen\n4. dumpling\n5. brick wall"

    class FakeClip:
        def encode_texts(self, texts):
            return torch.eye(8)[[2 + i % 6 for i in range(len(texts))]]

    cfg = RunConfig.model_validate({"sketch": {"fine_labels": 5}})
    ctx = SimpleNamespace(
        cfg=cfg,
        models=SimpleNamespace(mllm=FakeMLLM, clip=FakeClip),
        dataset=SimpleNamespace(classnames=["cat", "pizza"]),
        id_text_features=torch.eye(8)[:2],
        log=lambda m: None,
    )
    out = ShardOutput()
    SketchStage()._fine(ctx, out)
    assert "other kinds of the same category" in asked[0] and "cat, pizza" in asked[0]
    got = {r["text"]: (r["kind"], r["status"], r["reason"]) for r in out.rows}
    assert got == {
        "sushi": ("fine", "kept", "ok"),
        "cat": ("fine", "rejected", "equals_id_class"),
        "ramen": ("fine", "kept", "ok"),
        "dumpling": ("fine", "kept", "ok"),
        # names a class of the tiny-textures evaluation set: leakage, excluded by default
        "brick wall": ("fine", "rejected", "leaks_eval_ood"),
    }

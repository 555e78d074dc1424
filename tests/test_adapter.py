"""Behavioural tests of SynOOD fine-tuning on seeded toy features."""

import numpy as np
import pytest
import torch

from ood_core.adapter import (
    ResidualAdapter,
    apply_adapter,
    contrastive_loss,
    train_image_adapter,
    train_negative_text,
)
from ood_core.config import FinetuneConfig
from ood_core.metrics import auroc
from ood_core.scores import neglabel

D, N_ID, N_NEG = 32, 4, 4


def _basis():
    return np.linalg.qr(np.random.default_rng(99).normal(size=(D, D)))[0].T


def _toy(seed, n=200):
    """ID and OOD images share the ID-text subspace exactly (same class mix, same noise) and differ
    only in a 'style' direction orthogonal to every text, so zero-shot scores cannot separate them."""
    rng = np.random.default_rng(seed)
    b = _basis()
    idt, neg = b[:N_ID], b[N_ID : N_ID + N_NEG]

    def sample(style):
        y = rng.integers(0, N_ID, n)
        f = idt[y] + 0.8 * style + 0.15 * rng.normal(size=(n, D))
        return (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32), y

    x_id, y_id = sample(b[N_ID + N_NEG])
    x_ood, _ = sample(b[N_ID + N_NEG + 1])
    return idt.astype(np.float32), neg.astype(np.float32), x_id, y_id, x_ood


@pytest.fixture(scope="module")
def problem():
    idt, neg, x_id, y_id, x_ood = _toy(0)
    rng = np.random.default_rng(1)
    x = np.concatenate([x_id, x_ood])
    y = np.concatenate([y_id, N_ID + rng.integers(0, N_NEG, len(x_ood))])
    _, _, t_id, _, t_ood = _toy(5)  # held-out draw from the same distributions
    return {
        "idt": idt,
        "neg": neg,
        "x": x,
        "y": y,
        "text": np.concatenate([idt, neg]),
        "t_id": t_id,
        "t_ood": t_ood,
    }


CFG = FinetuneConfig(epochs=8, batch_size=32, lr=1e-2, text_epochs=4)


def _auroc(p, id_feats, ood_feats, neg):
    return auroc(neglabel(id_feats, p["idt"], neg, groups=1), neglabel(ood_feats, p["idt"], neg, groups=1))


def test_adapter_starts_near_identity_and_all_parameters_get_gradients():
    ad = ResidualAdapter(D, generator=torch.Generator().manual_seed(0))
    f = torch.nn.functional.normalize(torch.randn(16, D, generator=torch.Generator().manual_seed(1)), dim=-1)
    out = ad(f)
    assert torch.allclose(out.norm(dim=-1), torch.ones(16), atol=1e-5)
    assert (out - f).abs().max() < 0.02
    out.sum().backward()
    for name, prm in ad.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name


@pytest.mark.parametrize("loss", ["ce", "ce+contrastive"])
def test_adapter_training_reduces_loss_and_improves_auroc(problem, loss):
    p = problem
    before = _auroc(p, p["t_id"], p["t_ood"], p["neg"])
    assert before < 0.65  # the toy really is inseparable for zero-shot features
    seen = []
    ad, hist = train_image_adapter(
        p["x"],
        p["y"],
        p["text"],
        CFG,
        seed=0,
        loss=loss,
        num_id=N_ID,
        progress=lambda e, v: seen.append((e, v)),
    )
    assert len(hist) == CFG.epochs and seen == list(enumerate(hist))
    assert hist[-1] < 0.3 * hist[0]
    after = _auroc(p, apply_adapter(ad, p["t_id"]), apply_adapter(ad, p["t_ood"]), p["neg"])
    assert after > 0.9 and after > before + 0.3


def test_adapter_is_seed_deterministic(problem):
    p = problem
    a1, h1 = train_image_adapter(p["x"], p["y"], p["text"], CFG, seed=3)
    a2, h2 = train_image_adapter(p["x"], p["y"], p["text"], CFG, seed=3)
    a3, h3 = train_image_adapter(p["x"], p["y"], p["text"], CFG, seed=4)
    assert h1 == h2 and h1 != h3
    for k, v in a1.state_dict().items():
        assert torch.equal(v, a2.state_dict()[k]), k
    assert not torch.equal(a1.linear.weight, a3.linear.weight)


def test_negative_text_training(problem):
    p = problem
    ad, _ = train_image_adapter(p["x"], p["y"], p["text"], CFG, seed=0)
    xa = apply_adapter(ad, p["x"])
    tuned, hist = train_negative_text(xa, p["y"], p["idt"], p["neg"], CFG, seed=0)
    tuned2, hist2 = train_negative_text(xa, p["y"], p["idt"], p["neg"], CFG, seed=0)
    np.testing.assert_array_equal(tuned, tuned2)
    assert hist == hist2 and len(hist) == CFG.text_epochs and hist[-1] < hist[0]
    assert tuned.shape == p["neg"].shape
    np.testing.assert_allclose(np.linalg.norm(tuned, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(tuned, p["neg"])
    after = _auroc(p, apply_adapter(ad, p["t_id"]), apply_adapter(ad, p["t_ood"]), tuned)
    assert after > 0.9
    # Torch in, torch out (the finetune stage passes tensors).
    tuned_t, _ = train_negative_text(
        torch.from_numpy(xa),
        torch.from_numpy(p["y"]),
        torch.from_numpy(p["idt"]),
        torch.from_numpy(p["neg"]),
        CFG,
        seed=0,
    )
    assert isinstance(tuned_t, torch.Tensor)
    np.testing.assert_array_equal(tuned_t.numpy(), tuned)
    # text_epochs = 0 leaves the negatives as they were.
    same, h0 = train_negative_text(
        xa, p["y"], p["idt"], p["neg"], CFG.model_copy(update={"text_epochs": 0}), 0
    )
    np.testing.assert_allclose(same, p["neg"], atol=1e-6)
    assert h0 == []


def test_contrastive_loss_prefers_separated_ood():
    t = torch.eye(4)[:2]
    labels = torch.tensor([0, 1, 2, 2])
    id_feats = torch.eye(4)[:2]
    near = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2, 0.1, 0.0], [0.2, 1.0, 0.0, 0.1]]), dim=-1)
    far = torch.eye(4)[2:]
    l_near = contrastive_loss(torch.cat([id_feats, near]), labels, t, num_id=2, logit_scale=10)
    l_far = contrastive_loss(torch.cat([id_feats, far]), labels, t, num_id=2, logit_scale=10)
    assert l_far < l_near
    assert contrastive_loss(far, torch.tensor([2, 2]), t, num_id=2) == 0


def test_bad_inputs_raise(problem):
    p = problem
    with pytest.raises(ValueError, match="num_id"):
        train_image_adapter(p["x"], p["y"], p["text"], CFG, seed=0, loss="ce+contrastive")
    with pytest.raises(ValueError, match="unknown adapter loss"):
        train_image_adapter(p["x"], p["y"], p["text"], CFG, seed=0, loss="mse")
    with pytest.raises(ValueError, match="labels must index"):
        train_image_adapter(p["x"], p["y"] + 100, p["text"], CFG, seed=0)

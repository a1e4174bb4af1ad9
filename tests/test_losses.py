"""Losses against hand computations and closed forms: reconstruction, IRM, ArcFace / CosFace."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from facemae.config import DEFAULT_MARGIN_M, load_config
from facemae.losses.irm import irm_loss
from facemae.losses.margin import MARGIN_HEADS, ArcFace, CosFace, build_head
from facemae.losses.reconstruction import masked_mse, normalize_patches
from facemae.models.registry import build_fr
from facemae.train.steps import freeze_teacher


def test_masked_mse_equals_a_hand_computation():
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]]])  # (N=1, L=3, 2)
    target = torch.tensor([[[0.0, 0.0], [5.0, 5.0], [1.0, 1.0]]])
    mask = torch.tensor([[1.0, 0.0, 1.0]])  # patch 1 is visible
    # patch 0: (1 + 4) / 2 = 2.5; patch 2: (4 + 4) / 2 = 4; mean over the 2 masked patches = 3.25
    assert_close(masked_mse(pred, target, mask), torch.tensor(3.25))


def test_masked_mse_ignores_visible_patches_entirely():
    pred, target = torch.randn(2, 5, 12), torch.randn(2, 5, 12)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 0, 1]], dtype=torch.float32)
    loss = masked_mse(pred, target, mask)
    changed = pred.clone()
    changed[mask == 0] = torch.tensor(float("nan"))  # even a non-finite visible prediction
    assert_close(masked_mse(changed, target, mask), loss)
    changed[0, 0] += 1.0  # ... while a masked one counts
    assert masked_mse(changed, target, mask) != loss


def test_masked_mse_is_zero_when_nothing_is_masked():
    assert masked_mse(torch.randn(1, 4, 3), torch.randn(1, 4, 3), torch.zeros(1, 4)) == 0


def test_normalised_targets_have_zero_mean_and_unit_variance_per_patch():
    out = normalize_patches(torch.randn(2, 7, 48) * 3 + 5)
    assert_close(out.mean(-1), torch.zeros(2, 7), atol=1e-5, rtol=0)
    assert_close(out.var(-1), torch.ones(2, 7), atol=1e-4, rtol=0)


def _irm_numpy(a: np.ndarray, b: np.ndarray, tau: float) -> float:
    """DESIGN.md 1 written out with loops: softmax over j != i of cosine / tau, KL(p || q) per row."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    n, total = len(a), 0.0
    for i in range(n):
        others = [j for j in range(n) if j != i]
        r = np.array([a[i] @ a[j] for j in others]) / tau
        r_hat = np.array([b[i] @ b[j] for j in others]) / tau
        p = np.exp(r - r.max()) / np.exp(r - r.max()).sum()
        q = np.exp(r_hat - r_hat.max()) / np.exp(r_hat - r_hat.max()).sum()
        total += float((p * np.log(p / q)).sum())
    return total / n


def test_irm_is_zero_for_equal_embeddings_and_positive_otherwise():
    emb = torch.randn(6, 16)
    assert_close(irm_loss(emb, emb.clone(), tau=0.1), torch.tensor(0.0))
    assert_close(irm_loss(emb, 3 * emb, tau=0.1), torch.tensor(0.0))  # embeddings are normalised
    assert irm_loss(emb, torch.randn(6, 16), tau=0.1) > 0


@pytest.mark.parametrize("tau", [0.1, 1.0])
def test_irm_matches_a_direct_numpy_computation(tau):
    a, b = torch.randn(5, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    assert_close(irm_loss(a, b, tau=tau).item(), _irm_numpy(a.numpy(), b.numpy(), tau))


def test_irm_gradient_reaches_reconstructed_pixels_but_not_the_teacher():
    torch.manual_seed(0)
    teacher = freeze_teacher(build_fr("fr_tiny", embedding_size=32))
    originals = torch.randn(4, 3, 112, 112)
    recon = (originals + 0.5 * torch.randn(4, 3, 112, 112)).requires_grad_()
    with torch.no_grad():
        emb_orig = teacher(originals)
    loss = irm_loss(emb_orig, teacher(recon), tau=0.1)
    loss.backward()
    assert loss > 0 and recon.grad is not None and recon.grad.abs().sum() > 0
    assert torch.isfinite(recon.grad).all()
    assert all(p.grad is None for p in teacher.parameters())


def test_irm_refuses_what_it_cannot_score():
    with pytest.raises(ValueError, match="at least 2 images"):
        irm_loss(torch.randn(1, 4), torch.randn(1, 4), tau=0.1)
    with pytest.raises(ValueError, match="one shape"):
        irm_loss(torch.randn(3, 4), torch.randn(3, 5), tau=0.1)
    with pytest.raises(ValueError, match="tau=0 must be > 0"):
        irm_loss(torch.randn(3, 4), torch.randn(3, 4), tau=0)


def _head_with_known_angles(head_cls: type, **kwargs) -> tuple:
    torch.manual_seed(0)
    head = head_cls(8, 5, **kwargs)
    emb, labels = torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    cos = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(head.weight, dim=1).T
    return head, emb, labels, cos.detach()


def test_arcface_target_logit_is_s_cos_theta_plus_m():
    head, emb, labels, cos = _head_with_known_angles(ArcFace, s=64.0, m=0.5)
    logits = head(emb, labels)
    rows = torch.arange(6)
    theta = torch.arccos(cos[rows, labels])
    assert (theta + 0.5 < math.pi).all(), "random angles stay below the threshold"
    assert_close(logits[rows, labels], 64.0 * torch.cos(theta + 0.5))
    other = torch.ones_like(cos, dtype=torch.bool)
    other[rows, labels] = False
    assert_close(logits[other], 64.0 * cos[other])
    assert_close(head(emb), 64.0 * cos), "no labels: prediction logits without margin"


def test_arcface_past_pi_falls_back_to_a_linear_penalty():
    head = ArcFace(2, 2, s=1.0, m=0.5)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    theta = math.pi - 0.2  # theta + m > pi: cos(theta + m) would rise again
    emb = torch.tensor([[math.cos(theta), math.sin(theta)]])
    logit = head(emb, torch.tensor([0]))[0, 0]
    assert_close(logit, torch.tensor(math.cos(theta) - 0.5 * math.sin(0.5)))
    easy = ArcFace(2, 2, s=1.0, m=0.5, easy_margin=True)
    easy.weight.data.copy_(head.weight)
    assert_close(easy(emb, torch.tensor([0]))[0, 0], torch.tensor(math.cos(theta)))


def test_arcface_gradient_is_finite_when_an_embedding_sits_on_its_centre():
    head = ArcFace(4, 3)
    emb = head.weight.detach()[:2].clone().requires_grad_()
    torch.nn.functional.cross_entropy(head(emb, torch.tensor([0, 1])), torch.tensor([0, 1])).backward()
    assert torch.isfinite(emb.grad).all() and torch.isfinite(head.weight.grad).all()


def test_cosface_target_logit_is_s_cos_minus_m():
    head, emb, labels, cos = _head_with_known_angles(CosFace, s=30.0, m=0.4)
    rows = torch.arange(6)
    assert_close(head(emb, labels)[rows, labels], 30.0 * (cos[rows, labels] - 0.4))


def test_margin_registry_and_config_agree_on_the_standard_margins():
    assert set(MARGIN_HEADS) == set(DEFAULT_MARGIN_M)
    for name, cls in MARGIN_HEADS.items():
        assert inspect.signature(cls).parameters["m"].default == DEFAULT_MARGIN_M[name]
        assert inspect.signature(cls).parameters["s"].default == 64.0
    assert isinstance(build_head("cosface", 8, 3, s=64.0, m=0.4), CosFace)
    with pytest.raises(ValueError, match=r"choose one of \['arcface', 'cosface'\]"):
        build_head("sphereface", 8, 3, s=64.0, m=0.4)


def test_loss_config_defaults_and_errors_name_the_fix():
    loss = load_config().loss
    assert (loss.lambda_irm, loss.tau, loss.norm_pix_loss, loss.paste_visible) == (0.1, 0.1, False, True)
    assert (loss.irm_view, loss.irm_blur_sigma, loss.irm_start, loss.irm_ramp) == ("blur", 1.5, 0.25, 0.25)
    assert (loss.margin, loss.s, loss.margin_m) == ("arcface", 64.0, 0.5)
    assert load_config(None, ["loss.margin=cosface"]).loss.margin_m == 0.4
    assert load_config(None, ["loss.margin=cosface", "loss.m=0.35"]).loss.margin_m == 0.35
    for override, message in [
        ("loss.tau=0", r"loss.tau=0.0 must be > 0"),
        ("loss.lambda_irm=-1", r"loss.lambda_irm=-1.0 must be >= 0"),
        ("loss.norm_pix_loss=true", r"set loss.lambda_irm=0 or loss.norm_pix_loss=false"),
        ("loss.margin=sphereface", r"loss.margin='sphereface' is not one of \['arcface', 'cosface'\]"),
        ("loss.m=2", r"loss.m=2.0 must be in \[0, 1.571\) for arcface"),
        ("loss.s=0", r"loss.s=0.0 must be > 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            load_config(None, [override])
    assert load_config(None, ["loss.norm_pix_loss=true", "loss.lambda_irm=0"]).loss.norm_pix_loss

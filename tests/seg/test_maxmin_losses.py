"""Max-Min loss terms against hand-computed values (Eqs. 4–8, 12; App. A)."""

from __future__ import annotations

import math

import pytest
import torch

from milkit.losses.maxmin import (
    MaxMinTerms,
    cross_entropy_to_uniform,
    extended_log_barrier,
    foreground_mask,
    kl_to_uniform,
    kl_uniform_to,
    maxmin_loss,
    negative_entropy,
    posterior_weighted_cam,
    pseudo_binary_mask,
    t_schedule,
    uncertainty_regulariser,
)


def _logits(p1: float) -> torch.Tensor:
    return torch.tensor([[math.log(1 - p1), math.log(p1)]], dtype=torch.float64)


def test_eem_sem_values_hand_computed():
    z = _logits(0.8)
    neg_h = 0.2 * math.log(0.2) + 0.8 * math.log(0.8)  # −H(p̂) = −0.500402
    assert negative_entropy(z).item() == pytest.approx(neg_h, abs=1e-9)
    assert kl_to_uniform(z).item() == pytest.approx(neg_h + math.log(2), abs=1e-9)  # Eq. 5
    h_q = -(math.log(0.2) + math.log(0.8)) / 2  # H(q, p̂) = 0.916291
    assert cross_entropy_to_uniform(z).item() == pytest.approx(h_q, abs=1e-9)
    assert kl_uniform_to(z).item() == pytest.approx(h_q - math.log(2), abs=1e-9)  # App. A.2
    # both are minimised by the uniform posterior, where KL = 0
    u = _logits(0.5)
    assert kl_to_uniform(u).item() == pytest.approx(0.0, abs=1e-12)
    assert kl_uniform_to(u).item() == pytest.approx(0.0, abs=1e-12)
    assert uncertainty_regulariser(z, "eem").item() == pytest.approx(neg_h)
    with pytest.raises(ValueError, match="eem"):
        uncertainty_regulariser(z, "xx")


def test_eem_sem_gradients_hand_computed():
    # binary case: with p = σ(z₁ − z₀), d(−H)/dz₁ = log(p/(1−p))·p(1−p) (App. A.5 × dp/dz₁)
    # and d H(q,p̂)/dz₁ = −½(1 − 2p) (App. A.7 × dp/dz₁)
    z = _logits(0.8).requires_grad_(True)
    negative_entropy(z).sum().backward()
    assert z.grad[0, 1].item() == pytest.approx(math.log(4) * 0.16, abs=1e-9)
    z.grad = None
    cross_entropy_to_uniform(z).sum().backward()
    assert z.grad[0, 1].item() == pytest.approx(-0.5 * (1 - 1.6), abs=1e-9)


def test_extended_log_barrier_value_and_gradient_both_branches():
    t = 5.0
    z = torch.tensor([-1.0, -0.5, -0.04, 0.1], dtype=torch.float64, requires_grad=True)
    psi = extended_log_barrier(z, t)
    log_branch = [0.0, -math.log(0.5) / t, -math.log(0.04) / t]
    linear = t * 0.1 - math.log(1 / t**2) / t + 1 / t  # = 1.343775
    assert psi.tolist() == pytest.approx(log_branch + [linear], abs=1e-9)
    psi.sum().backward()
    # log branch slope −1/(t z); linear branch slope t; both equal t at z = −1/t²
    assert z.grad.tolist() == pytest.approx([0.2, 0.4, 5.0, 5.0], abs=1e-9)
    # continuity just beyond the junction
    eps = 1e-7
    a = extended_log_barrier(torch.tensor([-0.04 - eps, -0.04 + eps], dtype=torch.float64), t)
    assert abs(a[0] - a[1]).item() < 1e-5
    # a violated constraint far away keeps a finite gradient
    zz = torch.tensor([100.0], requires_grad=True)
    extended_log_barrier(zz, t).backward()
    assert zz.grad.item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="t must be"):
        extended_log_barrier(zz, 0.0)


def test_t_schedule():
    assert t_schedule(0, 5, 1.01, 10) == 5
    assert t_schedule(1, 5, 1.01, 10) == pytest.approx(5.05)
    assert t_schedule(100, 5, 1.01, 10) == 10  # 5·1.01¹⁰⁰ ≈ 13.5 is capped
    assert t_schedule(3, 10, 1.1, 30) == pytest.approx(13.31)
    with pytest.raises(ValueError):
        t_schedule(0, 5, 0.9, 10)


def test_pseudo_binary_mask_eq12():
    m = torch.tensor([0.0, 0.15, 1.0])
    out = pseudo_binary_mask(m, sigma=0.15, omega=5.0)
    expected = [1 / (1 + math.exp(0.75)), 0.5, 1 / (1 + math.exp(-4.25))]
    assert out.tolist() == pytest.approx(expected, abs=1e-6)


def test_posterior_weighted_cam_and_foreground_mask():
    cams = torch.zeros(1, 2, 2, 2)
    cams[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    cams[0, 1] = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    logits = torch.tensor([[0.0, math.log(3.0)]])  # p̂ = (0.25, 0.75)
    m = posterior_weighted_cam(cams, logits)
    assert torch.allclose(m[0], torch.tensor([[0.25, 0.0], [0.0, 1.5]]))
    fg = foreground_mask(cams, logits, (2, 2), sigma=0.15, omega=5.0)
    # min–max normalised: [[1/6, 0], [0, 1]] → Eq. 12
    norm = torch.tensor([[0.25 / 1.5, 0.0], [0.0, 1.0]])
    assert torch.allclose(fg[0], torch.sigmoid(5.0 * (norm - 0.15)), atol=1e-6)
    with pytest.raises(ValueError, match="disagree"):
        posterior_weighted_cam(cams, torch.zeros(1, 3))


def test_maxmin_loss_terms_add_up():
    torch.manual_seed(0)
    fg, bg, loc = torch.randn(3, 2), torch.randn(3, 2), torch.randn(3, 2)
    y = torch.tensor([0, 1, 1])
    mask = torch.rand(3, 4, 4)
    ce = torch.nn.functional.cross_entropy
    base = ce(fg, y) + ce(loc, y)
    fg_only, logs = maxmin_loss(fg, bg, loc, mask, y, 5.0, MaxMinTerms(use_background=False, use_size=False))
    assert fg_only.item() == pytest.approx(base.item(), abs=1e-6)
    assert "size_barrier" not in logs
    with_bg, _ = maxmin_loss(fg, bg, loc, mask, y, 5.0,
                             MaxMinTerms(use_background=True, use_size=False, variant="eem", lam=0.5))
    assert with_bg.item() == pytest.approx((base + 0.5 * negative_entropy(bg).mean()).item(), abs=1e-6)
    full, _ = maxmin_loss(fg, bg, loc, mask, y, 5.0, MaxMinTerms(variant="sem", lam=0.5))
    s_fg, s_bg = mask.flatten(1).sum(1), (1 - mask).flatten(1).sum(1)
    barrier = (-(torch.log(s_fg) + torch.log(s_bg)) / 5.0).mean()  # Eq. 7 (log branch)
    expected = base + 0.5 * cross_entropy_to_uniform(bg).mean() + barrier
    assert full.item() == pytest.approx(expected.item(), abs=1e-5)
    with pytest.raises(ValueError, match="background"):
        maxmin_loss(fg, None, loc, mask, y, 5.0, MaxMinTerms())

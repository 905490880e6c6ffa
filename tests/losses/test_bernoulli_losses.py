import math

import torch

from milkit.losses.bernoulli import (
    bce_with_targets,
    bernoulli_entropy_with_logits,
    bernoulli_kl,
    bernoulli_kl_with_logits,
)


def test_bernoulli_kl_eq6_hand_computed():
    p, q = 0.8, 0.3
    ref = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert math.isclose(float(bernoulli_kl(torch.tensor(p), torch.tensor(q))), ref, rel_tol=1e-5)
    lp, lq = math.log(p / (1 - p)), math.log(q / (1 - q))
    assert math.isclose(float(bernoulli_kl_with_logits(torch.tensor(lp), torch.tensor(lq))), ref, rel_tol=1e-5)
    assert float(bernoulli_kl(torch.tensor(0.4), torch.tensor(0.4))) == 0.0


def test_temperature_softens_both_sides():
    zt, zs, tau = torch.tensor(3.0), torch.tensor(-1.0), 2.0
    pt, ps = 1 / (1 + math.exp(-1.5)), 1 / (1 + math.exp(0.5))
    ref = pt * math.log(pt / ps) + (1 - pt) * math.log((1 - pt) / (1 - ps))
    assert math.isclose(float(bernoulli_kl_with_logits(zt, zs, tau)), ref, rel_tol=1e-5)


def test_entropy_and_bce():
    assert math.isclose(float(bernoulli_entropy_with_logits(torch.tensor(0.0))), math.log(2), rel_tol=1e-6)
    p = 1 / (1 + math.exp(-2.0))
    assert math.isclose(float(bernoulli_entropy_with_logits(torch.tensor(2.0))),
                        -(p * math.log(p) + (1 - p) * math.log(1 - p)), rel_tol=1e-5)
    assert math.isclose(float(bce_with_targets(torch.tensor(2.0), torch.tensor(1.0))), -math.log(p), rel_tol=1e-6)
    assert math.isclose(float(bce_with_targets(torch.tensor(2.0), torch.tensor(0.25))),
                        -(0.25 * math.log(p) + 0.75 * math.log(1 - p)), rel_tol=1e-6)


def test_kl_is_finite_for_extreme_logits():
    v = bernoulli_kl_with_logits(torch.tensor([80.0, -80.0]), torch.tensor([-80.0, 80.0]))
    assert torch.isfinite(v).all() and (v > 50).all()

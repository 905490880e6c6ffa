"""Shapes and gradients of the Max-Min localizer + classifier (Fig. 2, Algorithm 1)."""

from __future__ import annotations

import pytest
import torch

from milkit.losses.maxmin import MaxMinTerms, maxmin_loss
from milkit.models.maxmin import MaxMinNet


def test_forward_shapes_mask_range_and_shared_backbone():
    torch.manual_seed(0)
    net = MaxMinNet(stages=2, modalities=2)
    x = torch.randn(2, 3, 32, 24)
    out = net(x)
    assert out.loc_logits.shape == out.fg_logits.shape == out.bg_logits.shape == (2, 2)
    assert out.cams.shape == (2, 2, 4, 3) and out.mask_fg.shape == (2, 32, 24)
    assert (out.mask_fg > 0).all() and (out.mask_fg < 1).all()
    assert out.image_logit.shape == (2,)
    assert net(x, with_background=False).bg_logits is None
    # one backbone, two heads
    names = {n.split(".")[0] for n, _ in net.named_parameters()}
    assert names == {"features", "localizer_head", "classifier_head"}


def test_loss_gradients_reach_localizer_through_the_mask():
    torch.manual_seed(0)
    net = MaxMinNet(stages=2, modalities=2, dropout=0.0)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([0, 1])
    out = net(x)
    # only the classifier's terms: the localizer head gets gradient only through M⁺ (Eq. 12)
    terms = MaxMinTerms(use_background=True, use_size=True, lam=1.0, localizer_weight=0.0)
    loss, logs = maxmin_loss(out.fg_logits, out.bg_logits, out.loc_logits, out.mask_fg, y, 5.0, terms)
    loss.backward()
    g = net.localizer_head.transfer.weight.grad
    assert g is not None and g.abs().sum() > 0 and torch.isfinite(g).all()
    assert set(logs) >= {"ce_fg", "ce_loc", "bg_sem", "size_barrier", "fg_fraction"}


def test_bad_input_named():
    with pytest.raises(ValueError, match="at least 2 classes"):
        MaxMinNet(stages=1, n_classes=1)
    with pytest.raises(ValueError, match="images of shape"):
        MaxMinNet(stages=1)(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="RGB"):
        MaxMinNet(stages=1)(torch.zeros(1, 1, 8, 8))


def test_segment_contract_and_mask_normalisation():
    torch.manual_seed(0)
    net = MaxMinNet(stages=1, modalities=2).eval()
    p, m = net.segment(torch.rand(3, 3, 16, 16))
    assert p.shape == (3,) and m.shape == (3, 16, 16)
    assert (0 <= p).all() and (p <= 1).all() and not m.requires_grad
    # per-image min–max: every image reaches both ends of Eq. 12's range
    lo, hi = torch.sigmoid(torch.tensor(-0.75)), torch.sigmoid(torch.tensor(4.25))
    assert torch.allclose(m.flatten(1).min(1).values, lo.expand(3), atol=1e-4)
    assert torch.allclose(m.flatten(1).max(1).values, hi.expand(3), atol=1e-4)
    with pytest.raises(ValueError, match="normalisation"):
        MaxMinNet(stages=1, mask_normalisation="global")

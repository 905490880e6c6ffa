"""WILDCAT pooling (Durand et al. Eqs. 1–2) on hand-made maps."""

from __future__ import annotations

import pytest
import torch

from milkit.nn.wildcat import WildcatHead, WildcatPool, wildcat_spatial_pool


def test_spatial_pool_hand_computed():
    m = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[-1.0, 0.0], [5.0, 7.0]]]])  # (1, 2, 2, 2)
    # kmax = 0.5 → 2 cells, kmin = 0.25 → 1 cell, α = 0.6
    s = wildcat_spatial_pool(m, kmax=0.5, kmin=0.25, alpha=0.6)
    assert torch.allclose(s, torch.tensor([[(4 + 3) / 2 + 0.6 * 1.0, (7 + 5) / 2 + 0.6 * -1.0]]))
    # kmin = 0: top-k mean only; integer k counts cells
    assert torch.allclose(wildcat_spatial_pool(m, kmax=1, kmin=0), torch.tensor([[4.0, 7.0]]))
    assert torch.allclose(wildcat_spatial_pool(m, kmax=3, kmin=2, alpha=1.0),
                          torch.tensor([[3.0 + 1.5, 4.0 - 0.5]]))


def test_class_wise_pooling_averages_modalities():
    pool = WildcatPool(n_classes=2, modalities=2, kmax=1.0, kmin=0.0, alpha=0.0, dropout=0.0)
    maps = torch.tensor([[[[0.0, 2.0], [2.0, 4.0]], [[2.0, 2.0], [4.0, 4.0]],  # class 0
                          [[1.0, 1.0], [1.0, 1.0]], [[3.0, 3.0], [3.0, 5.0]]]])  # class 1
    scores, cams = pool(maps)
    assert torch.allclose(cams[0, 0], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert torch.allclose(cams[0, 1], torch.tensor([[2.0, 2.0], [2.0, 3.0]]))
    assert torch.allclose(scores, torch.tensor([[4.0, 3.0]]))


def test_dropout_only_in_training_and_never_empty():
    torch.manual_seed(0)
    pool = WildcatPool(n_classes=1, modalities=1, kmax=1, dropout=0.5)
    m = torch.arange(16.0).reshape(1, 1, 4, 4)
    pool.eval()
    assert pool(m)[0].item() == 15.0
    pool.train()
    vals = {pool(m)[0].item() for _ in range(20)}
    assert len(vals) > 1 and max(vals) <= 15.0  # the top cell is sometimes dropped


def test_head_shapes_gradients_and_errors():
    torch.manual_seed(0)
    head = WildcatHead(8, n_classes=2, modalities=3, kmax=0.3, kmin=0.1, alpha=0.6, dropout=0.1)
    f = torch.randn(2, 8, 5, 5, requires_grad=True)
    s, cams = head(f)
    assert s.shape == (2, 2) and cams.shape == (2, 2, 5, 5)
    s.sum().backward()
    assert f.grad is not None and torch.isfinite(f.grad).all()
    with pytest.raises(ValueError, match="C·M"):
        WildcatPool(2, 3)(torch.zeros(1, 5, 2, 2))
    with pytest.raises(ValueError, match="dropout"):
        WildcatPool(2, 3, dropout=1.0)
    with pytest.raises(ValueError, match="selects no cell"):
        wildcat_spatial_pool(torch.zeros(1, 1, 2, 2), kmax=0)

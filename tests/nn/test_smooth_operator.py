"""Sm (Sm paper Eq. 3, 7, 8): hand-computed values, exact vs approximation, the three Â·G paths."""

import math

import numpy as np
import pytest
import torch

from milkit.data.graph import BagGraph, grid_adjacency, graph_from_dense
from milkit.nn.smooth import (
    SmoothOperator,
    SparseOperator,
    dense_propagate,
    dirichlet_energy,
    grid_propagate,
    sm_approx,
    sm_exact,
    sparse_sm_approx,
)


def path4() -> BagGraph:
    w = torch.zeros(4, 4)
    for i in range(3):
        w[i, i + 1] = w[i + 1, i] = 1
    return graph_from_dense(w)


def cycle4() -> BagGraph:
    w = torch.zeros(4, 4)
    for i in range(4):
        w[i, (i + 1) % 4] = w[(i + 1) % 4, i] = 1
    return graph_from_dense(w)


def holey_grid(h=7, w=9, seed=0, step=256):
    ys, xs = np.mgrid[0:h, 0:w]
    keep = np.random.default_rng(seed).random(h * w) > 0.3
    return grid_adjacency(np.stack([xs.ravel(), ys.ravel()], 1)[keep] * step, step)


def test_approximation_by_hand_on_a_path():
    # Â on the path 0-1-2-3: Â01 = 1/√2, Â12 = 1/2, Â23 = 1/√2 (degrees 1, 2, 2, 1)
    g = path4()
    u = torch.tensor([[1.0], [0.0], [0.0], [0.0]], dtype=torch.float64)
    op = SparseOperator.from_graph(g)
    g1 = sm_approx(op, u, 0.5, 1).squeeze(1)
    assert torch.allclose(g1, torch.tensor([0.5, 0.5 / math.sqrt(2), 0, 0], dtype=torch.float64))
    g2 = sm_approx(op, u, 0.5, 2).squeeze(1)
    assert torch.allclose(g2, torch.tensor([0.625, 0.125 * math.sqrt(2), 0.0625 * math.sqrt(2), 0], dtype=torch.float64))


def test_exact_by_hand_on_a_cycle():
    # C4, α = 1/2, U = e0: (I − Â/2) G = e0/2 gives G = (7/12, 1/6, 1/12, 1/6)
    g = cycle4()
    u = torch.tensor([[1.0], [0.0], [0.0], [0.0]], dtype=torch.float64)
    got = sm_exact(g, u, 0.5).squeeze(1)
    assert torch.allclose(got, torch.tensor([7 / 12, 1 / 6, 1 / 12, 1 / 6], dtype=torch.float64))
    ones = torch.ones(4, 1, dtype=torch.float64)  # a constant signal on a regular graph is a fixed point
    assert torch.allclose(sm_exact(g, ones, 0.3), ones)


def test_dirichlet_energy_by_hand_and_trace_form():
    g = path4()
    e0 = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64)
    assert float(dirichlet_energy(g, e0)) == pytest.approx(1.0)  # one edge, (1/√1 − 0)² · ½ · 2
    f = torch.randn(4, 3, dtype=torch.float64)
    assert float(dirichlet_energy(g, f)) == pytest.approx(float(torch.trace(f.T @ g.laplacian() @ f)))


@pytest.mark.parametrize("alpha", [0.1, 0.5, 0.9])
def test_approximation_converges_to_exact(alpha):
    g = holey_grid()
    u = torch.randn(g.num_nodes, 5, dtype=torch.float64)
    exact = sm_exact(g, u, alpha)
    op = SparseOperator.from_graph(g)
    errs = [float((sm_approx(op, u, alpha, t) - exact).abs().max()) for t in (1, 4, 400)]
    assert errs[0] > errs[1] >= errs[2]
    assert errs[1] <= 2 * alpha**5 * float(u.abs().max()) + 1e-12  # |G_T − G*| shrinks like α^(T+1)
    assert errs[2] < 1e-8
    # Eq. 9: Sm lowers the Dirichlet energy
    assert float(dirichlet_energy(g, exact)) < float(dirichlet_energy(g, u))


def test_grid_sparse_dense_paths_agree():
    g = holey_grid()
    assert g.grid is not None
    x = torch.randn(g.num_nodes, 8)
    ref = dense_propagate(g, x.double()).float()
    assert torch.allclose(SparseOperator.from_graph(g)(x), ref, atol=1e-5)
    assert torch.allclose(grid_propagate(g, x), ref, atol=1e-5)
    outs = {}
    for path in ("sparse", "grid", "dense"):
        sm = SmoothOperator(0.7, trainable_alpha=False, steps=10, path=path)
        outs[path] = sm(x.unsqueeze(0), [g])
    assert torch.allclose(outs["sparse"], outs["dense"], atol=1e-5)
    assert torch.allclose(outs["grid"], outs["dense"], atol=1e-5)


def test_sparse_backward_matches_autograd_of_dense():
    g = holey_grid(4, 5)
    x = torch.randn(g.num_nodes, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SparseOperator.from_graph(g), (x,))


def test_fused_sparse_sm_matches_stepwise_autograd():
    g = holey_grid(4, 5)
    op = SparseOperator.from_graph(g)
    u = torch.randn(g.num_nodes, 3, dtype=torch.float64, requires_grad=True)
    a = torch.tensor(0.6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda uu, aa: sparse_sm_approx(op, uu, aa, 4), (u, a))
    w = torch.randn(g.num_nodes, 3, dtype=torch.float64)
    fused = (sparse_sm_approx(op, u, a, 10) * w).sum()
    gu, ga = torch.autograd.grad(fused, (u, a))
    step = (sm_approx(op, u, a, 10) * w).sum()
    su, sa = torch.autograd.grad(step, (u, a))
    assert torch.allclose(fused, step) and torch.allclose(gu, su) and torch.allclose(ga, sa)


def test_alpha_is_parameterised_and_trainable():
    sm = SmoothOperator(0.5)
    assert float(sm.alpha) == pytest.approx(0.5)
    g = holey_grid(4, 4)
    u = torch.randn(1, g.num_nodes, 3)
    sm(u, [g]).pow(2).sum().backward()
    assert sm.alpha_param.grad is not None and sm.alpha_param.grad.abs() > 0
    fixed = SmoothOperator(0.3, trainable_alpha=False)
    assert not list(fixed.parameters()) and float(fixed.alpha) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        SmoothOperator(1.0)


def test_batch_padding_never_leaks():
    g1, g2 = holey_grid(4, 5, seed=1), holey_grid(3, 3, seed=2)
    n = max(g1.num_nodes, g2.num_nodes) + 3
    u = torch.randn(2, n, 4)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[0, : g1.num_nodes] = True
    mask[1, : g2.num_nodes] = True
    sm = SmoothOperator(0.6)
    out = sm(u, [g1, g2], mask)
    u2 = u.clone()
    u2[~mask] = 1e3  # garbage in padded slots
    out2 = sm(u2, [g1, g2], mask)
    assert torch.equal(out, out2)
    alone = sm(u[1:, : g2.num_nodes], [g2])
    assert torch.allclose(out[1, : g2.num_nodes], alone[0], atol=1e-6)
    assert torch.all(out[~mask] == 0)


def test_named_errors():
    sm = SmoothOperator()
    g = holey_grid(3, 3)
    with pytest.raises(ValueError, match="bag graph"):
        sm(torch.randn(1, g.num_nodes, 2), None)
    with pytest.raises(ValueError, match="real instances"):
        sm(torch.randn(1, g.num_nodes + 1, 2), [g])

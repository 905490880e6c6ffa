"""Bag graphs: 8-neighbour grid adjacency, normalisation, off-grid fallback, errors."""

import numpy as np
import pytest
import torch

from milkit.data.graph import chain_adjacency, feature_weighted, grid_adjacency


def test_full_grid_degrees_and_normalisation():
    ys, xs = np.mgrid[0:3, 0:4]
    g = grid_adjacency(np.stack([xs.ravel(), ys.ravel()], 1) * 512 + 100, patch_size=512)
    assert g.grid is not None and (g.grid.height, g.grid.width) == (3, 4)
    deg = g.degree().view(3, 4)
    assert deg[0, 0] == 3 and deg[0, 1] == 5 and deg[1, 1] == 8
    a = g.dense_normalized_adjacency()
    assert torch.allclose(a, a.T)
    assert a[0, 1] == pytest.approx(1 / np.sqrt(3 * 5))
    assert a[0, 2] == 0  # two steps apart


def test_inferred_step_and_chain():
    g = chain_adjacency(5)
    assert g.num_edges == 8 and g.degree().tolist() == [1, 2, 2, 2, 1]
    c = np.array([[0, 0], [256, 0], [256, 256], [1024, 1024]])
    g2 = grid_adjacency(c)  # step inferred as 256
    assert g2.degree().tolist() == [2, 2, 2, 0]
    assert float(g2.inv_sqrt_degree()[3]) == 0.0


def test_off_grid_coords_use_radius_graph():
    c = np.array([[0.0, 0.0], [1.1, 0.2], [5.0, 5.0]])
    g = grid_adjacency(c, patch_size=1.0)
    assert g.grid is None
    assert g.degree().tolist() == [1, 1, 0]


def test_permute_and_feature_weights():
    ys, xs = np.mgrid[0:3, 0:3]
    g = grid_adjacency(np.stack([xs.ravel(), ys.ravel()], 1), 1)
    perm = torch.randperm(9)
    a, b = g.dense_normalized_adjacency(), g.permute(perm).dense_normalized_adjacency()
    assert torch.allclose(a[perm][:, perm], b)
    fw = feature_weighted(g, torch.randn(9, 4), scale=2.0)
    assert fw.grid is None and torch.all((fw.edge_weight > 0) & (fw.edge_weight <= 1))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="duplicate"):
        grid_adjacency(np.array([[0, 0], [0, 0]]), 1)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        grid_adjacency(np.zeros((3, 3)), 1)
    with pytest.raises(ValueError, match="empty"):
        grid_adjacency(np.zeros((0, 2)), 1)

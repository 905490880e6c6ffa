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


def test_induced_subgraph_renormalises_on_kept_nodes_and_isolates_appended():
    """Issue 16: Â of the kept nodes is D^{-1/2} W D^{-1/2} with the kept degrees; noise nodes get no edge."""
    from milkit.data.graph import follow_mask, induced_subgraph

    ys, xs = np.mgrid[0:2, 0:3]  # 2×3 grid, nodes 0..5 row-major
    g = grid_adjacency(np.stack([xs.ravel(), ys.ravel()], 1), 1)
    keep = torch.tensor([True, True, False, True, False, False])  # nodes 0, 1, 3 (an L: all pairwise neighbours)
    s = induced_subgraph(g, keep, n_isolated=2)
    assert s.num_nodes == 5 and s.grid is None
    assert s.degree().tolist() == [2, 2, 2, 0, 0]
    a = s.dense_normalized_adjacency()
    assert a[0, 1] == pytest.approx(0.5) and a[1, 2] == pytest.approx(0.5)  # 1/√(2·2), not 1/√(3·5) as in g
    assert torch.all(a[3:] == 0) and torch.all(a[:, 3:] == 0)
    # without appended nodes the grid fast path survives and describes the kept positions
    s2 = induced_subgraph(g, keep)
    assert s2.grid is not None and s2.grid.rows.tolist() == [0, 0, 1] and s2.grid.cols.tolist() == [0, 1, 0]
    # batch form: bag 0 padded (5 real of 6 slots), drop its node 2, append 1 noise instance
    g5 = grid_adjacency(np.stack([np.arange(5), np.zeros(5)], 1), 1)  # a chain
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    new = torch.tensor([[1, 1, 0, 1, 1, 0, 1]], dtype=torch.bool)
    (f,) = follow_mask([g5], mask, new)
    assert f.num_nodes == 5 and f.degree().tolist() == [1, 1, 1, 1, 0]
    assert follow_mask(None, mask, new) is None
    with pytest.raises(ValueError, match="padded position"):
        follow_mask([g5], mask, torch.ones(1, 6, dtype=torch.bool))


def test_vectorised_grid_builder_equals_pairwise_reference():
    """The 8-neighbour edges, in CSR order (source, then destination), as an O(N²) scan finds them."""
    import pickle

    rng = np.random.default_rng(3)
    for h, w in [(1, 1), (1, 6), (5, 7), (9, 4)]:
        ys, xs = np.mgrid[0:h, 0:w]
        keep = rng.random(h * w) > 0.3
        keep[0] = True
        perm = rng.permutation(int(keep.sum()))  # node numbering unrelated to grid order
        rc = np.stack([ys.ravel(), xs.ravel()], 1)[keep][perm]
        g = grid_adjacency(rc[:, ::-1] * 256, 256)
        d = np.abs(rc[:, None, :] - rc[None, :, :]).max(-1)
        src, dst = np.nonzero((d <= 1) & (d > 0))  # row-major: sorted by source, then destination
        assert g.edge_index.tolist() == [src.tolist(), dst.tolist()]
        assert g.grid is not None
    g.memo()["x"] = 1
    assert g.to("cpu") is g and "x" in g.to("cpu").memo()  # same device: the same graph, cache kept
    copy = pickle.loads(pickle.dumps(g))
    assert copy.memo() == {} and torch.equal(copy.edge_index, g.edge_index)  # the cache is not pickled
    with pytest.raises(ValueError, match="same grid position"):
        grid_adjacency(np.array([[0, 0], [256, 0], [0, 0]]), 256)

"""Bag graphs for Sm (Sm paper §4.1; NOTES.md "Sm"): nodes are instances, edges join neighbours.

``grid_adjacency(coords, patch_size)`` builds the 8-neighbourhood of a patch grid
(two patches are neighbours when their grid positions differ by at most one step in
x and in y). The normalised adjacency is Â = D^{-1/2} W D^{-1/2} (W_ij = 1 on edges,
or exp(−‖x_i − x_j‖/d) with :func:`feature_weighted`); L = I − Â.

A :class:`BagGraph` keeps the edge list (both directions, no self loops) and, when the
instances lie on a regular grid with binary weights, a :class:`GridLayout` (row, col
of each node on an H×W canvas). ``milkit.nn.smooth`` then computes Â·G as a masked
3×3 neighbourhood sum on the canvas (the fast path) instead of a sparse product.

Isolated nodes (no neighbour) have degree 0; their row of Â is zero (D^{-1/2} is
taken as 0 there).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

#: largest canvas (cells per node) for which the grid fast path is kept
MAX_CANVAS_PER_NODE = 8


@dataclass(frozen=True)
class GridLayout:
    """Grid position of every node: ``rows``/``cols`` (N,) long on an ``height``×``width`` canvas."""

    rows: Tensor
    cols: Tensor
    height: int
    width: int

    def to(self, device: torch.device | str) -> "GridLayout":
        return replace(self, rows=self.rows.to(device), cols=self.cols.to(device))

    @property
    def flat(self) -> Tensor:
        """Index of each node in the row-major H×W canvas."""
        return self.rows * self.width + self.cols


@dataclass(frozen=True)
class BagGraph:
    """Symmetric graph on ``num_nodes`` instances.

    ``edge_index`` (2, E) long holds both directions of every edge and no self loops;
    ``edge_weight`` (E,) the raw weights W_ij; ``grid`` is set only when the graph is
    exactly the binary 8-neighbour graph of the grid positions it describes.
    """

    num_nodes: int
    edge_index: Tensor
    edge_weight: Tensor
    grid: GridLayout | None = None

    def __post_init__(self) -> None:
        if self.edge_index.ndim != 2 or self.edge_index.shape[0] != 2:
            raise ValueError(f"edge_index must be (2, E), got {tuple(self.edge_index.shape)}")
        if self.edge_weight.shape != (self.edge_index.shape[1],):
            raise ValueError("edge_weight must have one weight per edge")
        if self.edge_index.numel() and (int(self.edge_index.min()) < 0 or int(self.edge_index.max()) >= self.num_nodes):
            raise ValueError(f"edge_index refers to nodes outside 0..{self.num_nodes - 1}")
        src = self.edge_index[0]
        if src.numel() > 1 and bool((src[1:] < src[:-1]).any()):
            # canonical order: sorted by source node, so the edge list is a CSR row list
            order = torch.argsort(src * self.num_nodes + self.edge_index[1])
            object.__setattr__(self, "edge_index", self.edge_index[:, order].contiguous())
            object.__setattr__(self, "edge_weight", self.edge_weight[order].contiguous())

    def memo(self) -> dict:
        """A per-graph cache for derived operators (``milkit.nn.smooth`` keeps Â's CSR form here).
        The graph is immutable, so what is derived from it stays valid; the cache is not pickled."""
        m = self.__dict__.get("_memo")
        if m is None:
            m = {}
            object.__setattr__(self, "_memo", m)
        return m

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_memo"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    # -- basic quantities -----------------------------------------------------------
    def to(self, device: torch.device | str) -> "BagGraph":
        """This graph on ``device`` (itself when it is already there, so its cached operators stay)."""
        dev = torch.device(device)
        if self.edge_index.device == dev and self.edge_weight.device == dev and (
                self.grid is None or self.grid.rows.device == dev):
            return self
        return BagGraph(
            self.num_nodes,
            self.edge_index.to(device),
            self.edge_weight.to(device),
            None if self.grid is None else self.grid.to(device),
        )

    @property
    def num_edges(self) -> int:
        """Number of directed edges (twice the undirected count)."""
        return int(self.edge_index.shape[1])

    def degree(self, dtype: torch.dtype | None = None) -> Tensor:
        """d_i = Σ_j W_ij, (N,)."""
        w = self.edge_weight if dtype is None else self.edge_weight.to(dtype)
        d = torch.zeros(self.num_nodes, dtype=w.dtype, device=w.device)
        return d.index_add_(0, self.edge_index[0], w)

    def inv_sqrt_degree(self, dtype: torch.dtype | None = None) -> Tensor:
        """D^{-1/2} with 0 for isolated nodes, (N,)."""
        d = self.degree(dtype)
        return torch.where(d > 0, d.clamp_min(1e-30).rsqrt(), torch.zeros_like(d))

    def normalized_weight(self, dtype: torch.dtype | None = None) -> Tensor:
        """Â_ij = W_ij / √(d_i d_j) on every edge, (E,)."""
        s = self.inv_sqrt_degree(dtype)
        w = self.edge_weight if dtype is None else self.edge_weight.to(dtype)
        return w * s[self.edge_index[0]] * s[self.edge_index[1]]

    def row_offsets(self) -> Tensor:
        """CSR row pointer (N + 1,) of the (source-sorted) edge list."""
        counts = torch.bincount(self.edge_index[0], minlength=self.num_nodes)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)])

    def normalized_adjacency(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """Â as a sparse (N, N) CSR tensor."""
        return torch.sparse_csr_tensor(
            self.row_offsets(), self.edge_index[1], self.normalized_weight().to(dtype), (self.num_nodes, self.num_nodes),
            check_invariants=False,
        )

    def dense_normalized_adjacency(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Â as a dense (N, N) matrix: the reference path, small bags only."""
        a = torch.zeros(self.num_nodes, self.num_nodes, dtype=dtype, device=self.edge_index.device)
        a.index_put_((self.edge_index[0], self.edge_index[1]), self.normalized_weight(dtype), accumulate=True)
        return a

    def laplacian(self, dtype: torch.dtype = torch.float64) -> Tensor:
        """Dense L = I − Â (Sm paper Eq. 3)."""
        return torch.eye(self.num_nodes, dtype=dtype, device=self.edge_index.device) - self.dense_normalized_adjacency(dtype)

    def permute(self, perm: Tensor) -> "BagGraph":
        """The same graph with node ``perm[k]`` renamed ``k`` (instances reordered as ``x[perm]``)."""
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(perm.numel(), device=perm.device)
        grid = None
        if self.grid is not None:
            grid = GridLayout(self.grid.rows[perm], self.grid.cols[perm], self.grid.height, self.grid.width)
        return BagGraph(self.num_nodes, inv[self.edge_index], self.edge_weight, grid)


# -- builders -----------------------------------------------------------------------
_OFFSETS = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1) if (dr, dc) != (0, 0)]


def _as_numpy_coords(coords) -> np.ndarray:
    c = coords.detach().cpu().numpy() if isinstance(coords, Tensor) else np.asarray(coords)
    if c.ndim != 2 or c.shape[1] != 2:
        raise ValueError(f"coords must be (N, 2) (x, y), got shape {tuple(c.shape)}")
    if not np.all(np.isfinite(c)):
        raise ValueError("coords hold NaN or infinite values")
    return c.astype(np.float64)


def _infer_step(c: np.ndarray) -> float:
    """Smallest positive gap between distinct x or y values (the patch step)."""
    gaps = []
    for axis in (0, 1):
        u = np.unique(c[:, axis])
        if u.size > 1:
            gaps.append(np.diff(u).min())
    return float(min(gaps)) if gaps else 1.0


def grid_adjacency(coords, patch_size: float | None = None, radius: float = 1.5) -> BagGraph:
    """8-neighbour graph of patches at ``coords`` (N, 2) (x, y), binary weights (NOTES.md "Sm").

    ``patch_size`` is the grid step in the units of ``coords`` (level-0 pixels for slide
    patches; inferred as the smallest coordinate gap when None). When every coordinate is
    a multiple of the step from the minimum, positions are snapped to the grid and the
    graph carries a :class:`GridLayout` (fast path); otherwise two patches are neighbours
    when their Chebyshev distance is at most ``radius`` patch sizes (1.5 gives the
    8-neighbourhood on a grid) and Sm uses the sparse product.
    """
    c = _as_numpy_coords(coords)
    n = c.shape[0]
    if n == 0:
        raise ValueError("cannot build a graph on an empty bag")
    step = float(patch_size) if patch_size is not None else _infer_step(c)
    if not step > 0:
        raise ValueError(f"patch_size must be > 0, got {patch_size}")
    pos = (c - c.min(axis=0)) / step
    snapped = np.rint(pos)
    on_grid = np.allclose(pos, snapped, atol=1e-6)
    if on_grid:
        cols = snapped[:, 0].astype(np.int64)
        rows = snapped[:, 1].astype(np.int64)
        height, width = int(rows.max()) + 1, int(cols.max()) + 1
        if height * width <= 64 * n + 4096:
            return _grid_graph(rows, cols, height, width)
    return _radius_graph(pos, radius)


def _grid_graph(rows: np.ndarray, cols: np.ndarray, height: int, width: int) -> BagGraph:
    """The 8-neighbour graph, built vectorised and already in CSR order (by source, then destination)."""
    n = rows.size
    ids = np.arange(n)
    canvas = np.full((height + 2, width + 2), -1, dtype=np.int64)
    canvas[rows + 1, cols + 1] = ids
    if not np.array_equal(canvas[rows + 1, cols + 1], ids):  # a later node overwrote an earlier one
        raise ValueError("two instances share the same grid position (duplicate coords)")
    nb = np.stack([canvas[rows + 1 + dr, cols + 1 + dc] for dr, dc in _OFFSETS], axis=1)  # (N, 8), −1: none
    nb.sort(axis=1)
    keep = nb >= 0
    src = np.broadcast_to(ids[:, None], nb.shape)[keep]
    ei = torch.from_numpy(np.stack([src, nb[keep]]))
    w = torch.ones(ei.shape[1], dtype=torch.float32)
    grid = None
    if height * width <= MAX_CANVAS_PER_NODE * n + 1024:
        grid = GridLayout(torch.from_numpy(rows), torch.from_numpy(cols), height, width)
    return BagGraph(n, ei, w, grid)


def _radius_graph(pos: np.ndarray, radius: float) -> BagGraph:
    from scipy.spatial import cKDTree

    pairs = cKDTree(pos).query_pairs(r=radius, p=np.inf, output_type="ndarray")
    if pairs.size and np.any(np.all(pos[pairs[:, 0]] == pos[pairs[:, 1]], axis=1)):
        raise ValueError("two instances share the same position (duplicate coords)")
    ei = np.concatenate([pairs.T, pairs.T[::-1]], axis=1) if pairs.size else np.zeros((2, 0), dtype=np.int64)
    ei_t = torch.from_numpy(np.ascontiguousarray(ei).astype(np.int64))
    return BagGraph(pos.shape[0], ei_t, torch.ones(ei_t.shape[1], dtype=torch.float32), None)


def chain_adjacency(n: int) -> BagGraph:
    """Adjacent-slice graph of a CT scan of ``n`` slices (NOTES.md "Sm": CT: adjacent slices)."""
    return grid_adjacency(np.stack([np.arange(n), np.zeros(n)], axis=1), patch_size=1.0)


def feature_weighted(graph: BagGraph, features: Tensor, scale: float) -> BagGraph:
    """Same edges with W_ij = exp(−‖x_i − x_j‖ / scale) (NOTES.md "Sm"); drops the grid fast path."""
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if features.shape[0] != graph.num_nodes:
        raise ValueError(f"{features.shape[0]} feature rows for a graph of {graph.num_nodes} nodes")
    f = features.detach().float().reshape(graph.num_nodes, -1)
    d = (f[graph.edge_index[0]] - f[graph.edge_index[1]]).norm(dim=-1)
    return BagGraph(graph.num_nodes, graph.edge_index, torch.exp(-d / scale), None)


def graph_from_dense(w: Tensor) -> BagGraph:
    """BagGraph from a symmetric dense weight matrix (tests, small hand-made graphs)."""
    if w.ndim != 2 or w.shape[0] != w.shape[1]:
        raise ValueError(f"adjacency must be square, got {tuple(w.shape)}")
    if not torch.allclose(w, w.T):
        raise ValueError("adjacency must be symmetric (Sm paper §4.1)")
    w = w.clone()
    w.fill_diagonal_(0)
    idx = torch.nonzero(w, as_tuple=False).T
    return BagGraph(int(w.shape[0]), idx.long(), w[idx[0], idx[1]].float(), None)


# -- graphs that follow dropped / appended instances (issue 16) -------------------------
def induced_subgraph(graph: BagGraph, keep: Tensor, n_isolated: int = 0) -> BagGraph:
    """The graph on the kept nodes, plus ``n_isolated`` appended nodes with no edge.

    ``keep`` (num_nodes,) bool: node ``i`` survives when ``keep[i]``; survivors are
    renumbered in order, appended nodes come after them. Edges between two kept nodes
    keep their weight W_ij; Â = D^{-1/2} W D^{-1/2} is then computed from the degrees
    of the kept nodes only (re-normalised; a node whose neighbours were all dropped is
    isolated, its row of Â is 0). Added noise instances (D2L's X_n) get no edge. The
    grid fast path is kept when nothing is appended (an induced subgraph of an
    8-neighbour grid graph is the 8-neighbour graph of the kept positions).
    """
    keep = keep.to(device=graph.edge_index.device, dtype=torch.bool).reshape(-1)
    if keep.numel() != graph.num_nodes:
        raise ValueError(f"keep has {keep.numel()} entries for a graph of {graph.num_nodes} nodes")
    if n_isolated < 0:
        raise ValueError(f"n_isolated must be >= 0, got {n_isolated}")
    n_keep = int(keep.sum())
    new_id = torch.cumsum(keep.long(), 0) - 1
    src, dst = graph.edge_index
    e = keep[src] & keep[dst]
    ei = new_id[graph.edge_index[:, e]]
    grid = None
    if graph.grid is not None and n_isolated == 0 and n_keep > 0:
        g = graph.grid
        grid = GridLayout(g.rows[keep], g.cols[keep], g.height, g.width)
    return BagGraph(n_keep + int(n_isolated), ei, graph.edge_weight[e], grid)


def follow_mask(graphs: list | None, mask: Tensor, new_mask: Tensor) -> list | None:
    """Per-bag graphs for a padded batch whose mask changed from ``mask`` (B, N) to ``new_mask`` (B, N').

    Node k of a bag graph is the k-th real (True) position of its mask (the convention of
    :mod:`milkit.nn.smooth`). Positions ``< N`` may only be dropped (True → False: WENO's
    hard positive mining, D2L's sub-bags); positions ``≥ N`` are appended instances (D2L's
    noise instances) and become isolated nodes. Returns None when ``graphs`` is None.
    """
    if graphs is None:
        return None
    b, n = mask.shape
    if new_mask.shape[0] != b or new_mask.shape[1] < n:
        raise ValueError(f"new mask {tuple(new_mask.shape)} does not extend mask {tuple(mask.shape)}")
    if len(graphs) != b:
        raise ValueError(f"{len(graphs)} bag graphs for a batch of {b} bags")
    old, head, tail = mask.to(torch.bool), new_mask[:, :n].to(torch.bool), new_mask[:, n:].to(torch.bool)
    if bool((head & ~old).any()):
        raise ValueError("new mask switches on a padded position; append new instances after the bag instead")
    out = []
    for i, g in enumerate(graphs):
        if g is None:
            out.append(None)
            continue
        keep = head[i][old[i]]
        n_new = int(tail[i].sum())
        out.append(g if (n_new == 0 and bool(keep.all())) else induced_subgraph(g, keep, n_new))
    return out

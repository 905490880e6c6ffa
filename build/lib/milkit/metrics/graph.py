"""Smoothness of instance scores on the bag graph: Dirichlet energy (Sm paper Eq. 3) as a metric.

Raw instance scores differ in scale between models (attention logits, probabilities),
so by default each bag's scores are min–max scaled to [0, 1] before the energy is
taken, and the energy is divided by the number of instances: the mean per-node energy
of a [0, 1] map, comparable across models and bag sizes.
"""

from __future__ import annotations

from typing import Iterable, Literal

import numpy as np
import torch

from milkit.data.graph import BagGraph
from milkit.nn.smooth import dirichlet_energy

Normalize = Literal["minmax", "zscore", "none"]


def score_dirichlet_energy(scores, graph: BagGraph, normalize: Normalize = "minmax", per_node: bool = True) -> float:
    """Eq. 3 of one bag's instance scores (N,) on its graph."""
    s = torch.as_tensor(np.asarray(scores, dtype=np.float64))
    if s.ndim != 1 or s.shape[0] != graph.num_nodes:
        raise ValueError(f"{tuple(s.shape)} scores for a graph of {graph.num_nodes} nodes")
    if normalize == "minmax":
        span = s.max() - s.min()
        s = (s - s.min()) / span if span > 0 else torch.zeros_like(s)
    elif normalize == "zscore":
        sd = s.std(unbiased=False)
        s = (s - s.mean()) / sd if sd > 0 else torch.zeros_like(s)
    elif normalize != "none":
        raise ValueError(f"unknown normalisation {normalize!r}")
    e = float(dirichlet_energy(graph, s))
    return e / graph.num_nodes if per_node else e


def mean_dirichlet_energy(scores: Iterable, graphs: Iterable[BagGraph | None], normalize: Normalize = "minmax") -> float:
    """Mean over bags (those with a graph) of :func:`score_dirichlet_energy`; NaN when none has one."""
    vals = [score_dirichlet_energy(s, g, normalize) for s, g in zip(scores, graphs) if g is not None]
    return float(np.mean(vals)) if vals else float("nan")

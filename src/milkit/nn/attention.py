"""Attention pooling (Ilse et al. 2018) as used by ABMIL and Distill-to-Label Eq. 1–2."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from milkit.nn import dnnl, fused


def masked_softmax(logits: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax over ``dim`` that gives exactly 0 weight to masked-out positions."""
    neg = torch.finfo(logits.dtype).min
    z = logits.masked_fill(~mask, neg)
    w = torch.softmax(z, dim=dim)
    return w * mask.to(w.dtype)


def weighted_sum(a: Tensor, h: Tensor) -> Tensor:
    """Σ_k a_k h_k per bag: a (B, N), h (B, N, D) → (B, D) (one bmm; faster on CPU than einsum)."""
    return torch.bmm(a.unsqueeze(1).to(h.dtype), h).squeeze(1)


class AttentionScorer(nn.Module):
    """Attention logits s_k = wᵀ tanh(V h_k) (Ilse et al. Eq. 8)."""

    def __init__(self, in_dim: int, hidden: int = 128):
        super().__init__()
        self.V = dnnl.Linear(in_dim, hidden)  # oneDNN GEMMs on CPU float32 (issue 15)
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.w(fused.tanh(self.V(h))).squeeze(-1)


class GatedAttentionScorer(nn.Module):
    """Gated attention logits s_k = wᵀ(tanh(V h_k) ⊙ sigm(U h_k)) (D2L Eq. 2, Ilse et al. Eq. 9).

    From :data:`milkit.nn.dnnl.MIN_ROWS` instances on, V h and U h are one oneDNN GEMM with [V; U] stacked
    (h is read once, forward and backward); below, two plain GEMMs. tanh is :func:`milkit.nn.fused.tanh`.
    The parameters stay ``V``, ``U`` and ``w``."""

    def __init__(self, in_dim: int, hidden: int = 128):
        super().__init__()
        self.V = nn.Linear(in_dim, hidden)
        self.U = nn.Linear(in_dim, hidden)
        self.w = nn.Linear(hidden, 1)

    def forward(self, h: Tensor) -> Tensor:
        if h.numel() < dnnl.MIN_ROWS * h.shape[-1]:  # small bags: two plain GEMMs (stacking cost ~4 % at 1k)
            v, u = self.V(h), self.U(h)
        else:
            vu = dnnl.dense(h, torch.cat([self.V.weight, self.U.weight]), torch.cat([self.V.bias, self.U.bias]))
            v, u = vu.split(self.V.out_features, dim=-1)
        return self.w(fused.tanh(v) * torch.sigmoid(u)).squeeze(-1)


class AttentionPool(nn.Module):
    """z = Σ_k a_k h_k with a = softmax(s) over the real instances (D2L Eq. 1)."""

    def __init__(self, in_dim: int, hidden: int = 128, gated: bool = True):
        super().__init__()
        self.scorer = GatedAttentionScorer(in_dim, hidden) if gated else AttentionScorer(in_dim, hidden)

    def forward(self, h: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h (B, N, D), mask (B, N) → pooled (B, D), weights a (B, N), logits s (B, N) (0 where padded)."""
        s = self.scorer(h)
        if bool(mask.all()):  # unpadded: the masking below would change nothing
            a = torch.softmax(s, dim=-1)
            return weighted_sum(a, h), a, s
        a = masked_softmax(s, mask)
        z = weighted_sum(a, h)
        return z, a, s.masked_fill(~mask, 0.0)


def dropout_mask(x: Tensor, p: float) -> Tensor:
    """A dropout multiplier for ``x``: 0 with probability ``p``, else 1/(1−p) (inverted dropout)."""
    keep = 1.0 - p
    return (torch.rand_like(x) < keep).to(x.dtype).mul_(1.0 / keep)


class FastDropout(nn.Dropout):
    """``nn.Dropout`` with the same distribution (each element kept with probability 1−p,
    scaled by 1/(1−p)) drawn from ``torch.rand`` instead of ``bernoulli_``, which is several
    times slower on a CPU. Same state dict (none) and the same output in eval mode; while
    training, a given seed draws other masks than ``nn.Dropout`` would."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        if not self.training or self.p == 0.0:
            return x
        if self.p >= 1.0:
            return x * 0.0
        return x * dropout_mask(x, self.p)

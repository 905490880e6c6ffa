"""Pre-LN transformer layers for MIL bags (Sm paper §4.3 / App. B.2: SmTAP's encoder).

Multi-head self-attention with ``torch.nn.functional.scaled_dot_product_attention``
(as the paper's code), skip connections and layer normalisation before attention.
Padded instances are excluded as keys, so they never change a real instance's output.
An optional ``post`` hook (SmTAP: Sm) is applied to the attention output before the
residual, and the feed-forward block is optional (SmTAP: none).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from milkit.nn import dnnl


class MultiheadSelfAttention(nn.Module):
    """Standard multi-head self-attention; ``dim`` split over ``heads``."""

    def __init__(self, dim: int = 512, heads: int = 8, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, dropout
        self.qkv = dnnl.Linear(dim, 3 * dim)  # oneDNN GEMMs on CPU float32 (issue 15)
        self.out = dnnl.Linear(dim, dim)

    def forward(self, x: Tensor, mask: Tensor, full: bool | None = None) -> Tensor:
        """``full``: the mask has no padding (computed from ``mask`` when None)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        full = bool(mask.all()) if full is None else full
        attn_mask = None if full else mask[:, None, None, :]
        # contiguous (B, H, N, d) heads: the CPU flash kernel is 3 % (1k) to 8 % (4k) faster on them
        # than on the strided views of the qkv output (docs/benchmarks.md, SmTAP section)
        o = F.scaled_dot_product_attention(q.contiguous(), k.contiguous(), v.contiguous(), attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(o.transpose(1, 2).reshape(b, n, d))


class TransformerLayer(nn.Module):
    """x ← x + post(MHSA(LN(x))) [+ FF(LN(x)) when ``ff_dim`` > 0]."""

    def __init__(self, dim: int = 512, heads: int = 8, ff_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = MultiheadSelfAttention(dim, heads, dropout)
        self.ff = None
        if ff_dim > 0:
            self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_dim), nn.GELU(), nn.Linear(ff_dim, dim))

    def forward(self, x: Tensor, mask: Tensor, post: Callable[[Tensor], Tensor] | None = None,
                full: bool | None = None) -> Tensor:
        full = bool(mask.all()) if full is None else full
        a = self.attn(self.norm(x), mask, full)
        if post is not None:
            a = post(a)
        x = x + a
        if self.ff is not None:
            x = x + self.ff(x)
        return x if full else x * mask.unsqueeze(-1).to(x.dtype)  # (no padding: nothing to zero)


class TransformerEncoder(nn.Module):
    """A stack of :class:`TransformerLayer` sharing one optional ``post`` hook per layer."""

    def __init__(self, dim: int = 512, heads: int = 8, layers: int = 2, ff_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(TransformerLayer(dim, heads, ff_dim, dropout) for _ in range(layers))

    def forward(self, x: Tensor, mask: Tensor, posts: list[Callable[[Tensor], Tensor]] | None = None) -> Tensor:
        full = bool(mask.all())
        for i, layer in enumerate(self.layers):
            x = layer(x, mask, None if posts is None else posts[i], full)
        return x

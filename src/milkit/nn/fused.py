"""Small fused elementwise autograd nodes (issue 15: SmAP-early at 100k; the attention scorers at 1k).

:func:`bias_tanh` is tanh(y + b) computed as 2σ(2y + 2b) − 1: ``torch.tanh`` on float32 ran
~6× slower per element than ``torch.sigmoid`` on this project's CPU (33 vs 5 ms on 100k × 128,
docs/benchmarks.md ``smspeed``), so four cheap passes beat one add and one tanh. The identity is
exact; in float32 the two differ by at most ~2.4e-7 (absolute). Its backward is
∂L/∂y = ∂L/∂t ⊙ (1 − t²) (``tanh_backward`` on the saved output) and ∂L/∂b = Σ_rows ∂L/∂y.

:func:`tanh` is the same identity without a bias, for the attention scorers' tanh(V h) (ABMIL, gated
ABMIL, CLAM, SmAP): on a strided half of a stacked [V; U] GEMM output ``torch.tanh`` ran 8 ns an element
(1k × 128: 1.03 ms, 2 threads) against 0.6 ns for ``torch.sigmoid`` (docs/benchmarks.md, "tanh").
"""

from __future__ import annotations

import torch
from torch import Tensor


class _BiasTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, b: Tensor) -> Tensor:  # noqa: D102
        t = torch.add(b * 2, y, alpha=2)  # 2y + 2b in one pass
        torch.sigmoid_(t)
        t.mul_(2).sub_(1)  # tanh(z) = 2σ(2z) − 1
        ctx.save_for_backward(t)
        ctx.b_shape = b.shape
        return t

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        (t,) = ctx.saved_tensors
        gy = torch.ops.aten.tanh_backward(g.contiguous(), t)
        gb = None
        if ctx.needs_input_grad[1]:
            gb = gy.reshape(-1, gy.shape[-1]).sum(0).reshape(ctx.b_shape) if len(ctx.b_shape) else gy.sum()
        return gy, gb


def bias_tanh(y: Tensor, b: Tensor) -> Tensor:
    """tanh(y + b) for y (..., D) and a bias b (D,) as one autograd node (see the module docstring)."""
    if b.ndim > 1 or (b.ndim == 1 and b.shape[0] != y.shape[-1]):
        raise ValueError(f"bias_tanh needs a (D,) bias for (..., D) input, got {tuple(b.shape)} and {tuple(y.shape)}")
    return _BiasTanh.apply(y, b)


class _Tanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: Tensor) -> Tensor:  # noqa: D102
        t = torch.mul(z, 2)  # a fresh contiguous tensor, also for a strided z
        torch.sigmoid_(t)
        t.mul_(2).sub_(1)  # tanh(z) = 2σ(2z) − 1
        ctx.save_for_backward(t)
        return t

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        (t,) = ctx.saved_tensors
        return torch.ops.aten.tanh_backward(g.contiguous(), t)


#: from this many elements on, a contiguous CPU tanh also takes 2σ(2z) − 1: below it the autograd node's own
#: overhead cost ABMIL ~2 % of a 1k-instance step (1k × 128 contiguous: ratio to torchmil 1.03–1.05 against
#: 1.02 with ``torch.tanh``), above it the node was ~10 % faster (10k × 128)
TANH_MIN_ELEMENTS = 4096 * 128


def tanh(z: Tensor) -> Tensor:
    """tanh(z) as 2σ(2z) − 1 on the CPU for strided or large z (see the module docstring; within ~2.4e-7 of
    ``torch.tanh`` in float32); ``torch.tanh`` itself for small contiguous z and off the CPU (measured on
    this project's CPU only)."""
    if z.device.type == "cpu" and (not z.is_contiguous() or z.numel() >= TANH_MIN_ELEMENTS):
        return _Tanh.apply(z)
    return torch.tanh(z)

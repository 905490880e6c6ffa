"""float32 GEMMs through oneDNN on the CPU, with their own backward (issue 15: SmAP-early at 100k).

PyTorch's CPU ``mm``/``addmm``/``linear`` in float32 call MKL's SGEMM. On AMD processors MKL
does not take its AVX-512 code path (``MKL_VERBOSE``: "Intel(R) Architecture processors"):
on this project's 2-core AMD EPYC it ran the 100k × 512 × 512 GEMMs of SmAP-early at 75–90
GFLOP per CPU-second, oneDNN (``torch.ops.mkldnn._linear_pointwise``, shipped with PyTorch,
what ``torch.compile`` uses for CPU linears) at 140–195 (docs/benchmarks.md, ``smspeed``
section). Both are IEEE float32; they differ by summation order (~1e-6 relative).

:func:`linear` and :func:`linear_gelu` are autograd Functions whose forward and backward
GEMMs all go through :func:`mm_nt` (oneDNN for float32 CPU tensors, ``torch`` otherwise, e.g.
float64 for ``gradcheck``, CUDA). :func:`linear_gelu` is Linear+GELU in one node: it keeps the
input, the weight and the pre-activation, and its backward is the GELU gradient followed by the
weight-gradient GEMM on it (no input gradient unless the input needs one).
``MILKIT_ONEDNN_MATMUL=0`` sends everything to ``torch``'s own GEMM.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
_state: dict[str, bool] = {}


def onednn_enabled() -> bool:
    """True when float32 CPU GEMMs go through oneDNN: PyTorch has it, ``MILKIT_ONEDNN_MATMUL`` is
    not ``0``, and a probe on a small product equals ``torch.mm`` (checked once per process)."""
    if "on" not in _state:
        ok = os.environ.get("MILKIT_ONEDNN_MATMUL", "1") != "0" and _LINEAR is not None
        if ok:
            try:
                ok = bool(torch.backends.mkldnn.is_available())
                g = torch.Generator().manual_seed(0)
                a, b = torch.randn(37, 19, generator=g), torch.randn(11, 19, generator=g)
                ok = ok and torch.allclose(_LINEAR(a, b, None, "none", [], ""), a @ b.t(), rtol=1e-5, atol=1e-5)
            except (RuntimeError, AttributeError, NotImplementedError):
                ok = False
        _state["on"] = ok
    return _state["on"]


def mm_nt(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """a @ bᵀ (+ bias) for a (M, K), b (N, K): oneDNN for float32 CPU tensors, else ``torch``.
    Either operand may be a transposed view (the weight gradient passes gᵀ and xᵀ)."""
    ts = (a, b) if bias is None else (a, b, bias)
    if all(t.device.type == "cpu" and t.dtype == torch.float32 for t in ts) and onednn_enabled():
        try:
            return _LINEAR(a, b, bias, "none", [], "")
        except RuntimeError:  # a layout oneDNN declines: torch's GEMM (which names a real shape error)
            pass
    return a @ b.t() if bias is None else torch.addmm(bias, a, b.t())


class _Linear(torch.autograd.Function):
    """y = x Wᵀ (+ b) on 2-D x; the backward's GEMMs through :func:`mm_nt` too."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return mm_nt(x, w, b)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        x, w = ctx.saved_tensors
        return _linear_grads(ctx, g.contiguous(), x, w)


def _linear_grads(ctx, g: Tensor, x: Tensor, w: Tensor):
    """∂L/∂x = g W, ∂L/∂W = gᵀ x, ∂L/∂b = Σ_rows g, each only when asked for."""
    gx = mm_nt(g, w.t()) if ctx.needs_input_grad[0] else None
    gw = mm_nt(g.t(), x.t()) if ctx.needs_input_grad[1] else None
    gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return gx, gw, gb


class _LinearGELU(torch.autograd.Function):
    """h = GELU(x Wᵀ + b) (exact erf GELU) on 2-D x in one node; keeps x, W and x Wᵀ + b."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:  # noqa: D102
        pre = mm_nt(x, w, b)
        ctx.save_for_backward(x, w, pre)
        ctx.has_bias = b is not None
        return F.gelu(pre)

    @staticmethod
    def backward(ctx, gh: Tensor):  # noqa: D102
        x, w, pre = ctx.saved_tensors
        # g = GELU'(x Wᵀ + b) ⊙ ∂L/∂h, written column-major: gᵀ is then contiguous, the operand the
        # weight-gradient GEMM gᵀ x wants (oneDNN would otherwise copy the transposed view first;
        # the strided write costs less than that copy, docs/benchmarks.md smspeed)
        g = torch.empty(pre.shape[1], pre.shape[0], dtype=pre.dtype, device=pre.device).t()
        torch.ops.aten.gelu_backward.grad_input(gh, pre, grad_input=g)
        gx = mm_nt(g, w.t()) if ctx.needs_input_grad[0] else None
        gw = mm_nt(g.t(), x.t()) if ctx.needs_input_grad[1] else None
        gb = g.t().sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def _flat(fn, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    lead = x.shape[:-1]
    y = fn.apply(x.reshape(-1, x.shape[-1]), w, b)
    return y.reshape(*lead, y.shape[-1])


def linear(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, b)`` (x (..., K), w (N, K)) with every GEMM through :func:`mm_nt`."""
    return _flat(_Linear, x, w, b)


def linear_gelu(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``F.gelu(F.linear(x, w, b))`` as one autograd node, GEMMs through :func:`mm_nt`."""
    return _flat(_LinearGELU, x, w, b)


class LinearGELU(nn.Sequential):
    """``nn.Sequential(nn.Linear(i, o), nn.GELU())`` (same children, same state dict) whose forward
    is :func:`linear_gelu` (exact GELU, as ``nn.GELU()``'s default)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        lin, act = self[0], self[1]
        if act.approximate != "none":
            return act(lin(x))
        return linear_gelu(x, lin.weight, lin.bias)


def _onednn_ok(*ts: Tensor | None) -> bool:
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32) for t in ts) and onednn_enabled()


class _Dense(_Linear):
    """y = x Wᵀ (+ b) on 2-D x: :class:`_Linear`'s forward (oneDNN), ∂L/∂x through oneDNN, ∂L/∂W = gᵀx
    through ``torch`` (MKL reads the transposed operands in place; oneDNN would first copy gᵀ, which made
    its weight gradient 10–35 % slower at 1k–10k rows, docs/benchmarks.md issue-15 dnnl section)."""

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        x, w = ctx.saved_tensors
        g = g.contiguous()
        gx = mm_nt(g, w.t()) if ctx.needs_input_grad[0] else None
        gw = g.t() @ x if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


#: :func:`dense` takes oneDNN only from this many rows (of x, or of w) on: at ≤ 2,000 rows its GEMMs were
#: as fast as MKL's or slower (it reorders W on every call), from 3,000 on faster (1 thread, K = 128–512,
#: N = 128–1536; ABMIL, gated ABMIL, DSMIL, DTFD at 1k instances 0–10 % slower; docs/benchmarks.md issue-15 dnnl).
#: ``MILKIT_ONEDNN_MIN_ROWS`` overrides it (0: every float32 CPU call).
def _min_rows() -> int:
    raw = os.environ.get("MILKIT_ONEDNN_MIN_ROWS", "4096")
    try:
        v = int(raw)
    except ValueError:
        v = -1
    if v < 0:
        raise ValueError(f"MILKIT_ONEDNN_MIN_ROWS must be a non-negative integer, got {raw!r}")
    return v


MIN_ROWS = _min_rows()


def dense(x: Tensor, w: Tensor, b: Tensor | None = None) -> Tensor:
    """``F.linear(x, w, b)`` = x Wᵀ (+ b): :class:`_Dense` (oneDNN forward and input gradient) for float32
    CPU tensors while oneDNN is on and x or W has at least :data:`MIN_ROWS` rows; else ``F.linear`` itself
    (small bags, CUDA, float64, bf16, ``MILKIT_ONEDNN_MATMUL=0``: exactly the plain path)."""
    rows = x.numel() // max(1, x.shape[-1])
    if max(rows, w.shape[0]) >= MIN_ROWS and _onednn_ok(x, w, b):
        return _flat(_Dense, x, w, b)
    return F.linear(x, w, b)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state dict and init) whose forward is :func:`dense`: every
    GEMM through oneDNN for float32 CPU tensors (issue 15: MKL's SGEMM skips AVX-512 on this AMD
    EPYC), ``F.linear`` otherwise."""

    def forward(self, x: Tensor) -> Tensor:  # noqa: D102
        return dense(x, self.weight, self.bias)

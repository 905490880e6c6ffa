"""milkit.nn.dnnl (issue 15): the oneDNN GEMMs and the fused Linear+GELU node used by SmAP/SmTAP
equal the plain modules, and their hand-written backward passes gradcheck."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from milkit.nn import dnnl
from milkit.nn.dnnl import LinearGELU, linear, linear_gelu, mm_nt

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fn,ref", [(linear, F.linear), (linear_gelu, lambda x, w, b: F.gelu(F.linear(x, w, b)))],
                         ids=["linear", "linear_gelu"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_float64(fn, ref, bias):
    """float64 (the torch GEMM path): the backward formulas are the Jacobian of the forward."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    args = (x, w, b) if bias else (x, w)
    assert torch.autograd.gradcheck(lambda *a: fn(*a) if bias else fn(*a, None), args)
    torch.testing.assert_close(fn(x, w, b), ref(x, w, b))


@pytest.mark.parametrize("onednn", [True, False])
def test_float32_equals_plain_modules(monkeypatch, onednn):
    """float32 (oneDNN where available): LinearGELU and linear equal nn.Linear+nn.GELU and
    F.linear within 1e-5, values and every gradient (input, weights, bias)."""
    monkeypatch.setattr(dnnl, "_state", {} if onednn else {"on": False})
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(40, 48), nn.GELU())
    fused = LinearGELU(40, 48)
    fused.load_state_dict(plain.state_dict())
    v = torch.randn(16, 48, requires_grad=True)
    x = torch.randn(1, 300, 40, requires_grad=True)
    outs = []
    for emb, lin in ((plain, F.linear), (fused, linear)):
        x.grad = v.grad = None
        emb.zero_grad()
        h = emb(x)
        y = lin(h, v)
        loss = (y.square().sum() + h.sum()) / 100
        loss.backward()
        outs.append((h, y, x.grad.clone(), v.grad.clone(), emb[0].weight.grad.clone(), emb[0].bias.grad.clone()))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, **TOL)


def test_mm_nt_on_transposed_views_equals_torch():
    """The weight gradient passes gᵀ and xᵀ (transposed views): the product is still a @ bᵀ, as
    close to the float64 product as torch's own float32 GEMM (sums of 500 terms of size ~20)."""
    g, x, w = torch.randn(500, 64), torch.randn(500, 32), torch.randn(24, 32)
    for got, ref32, exact in ((mm_nt(g.t(), x.t()), g.t() @ x, g.t().double() @ x.double()),
                              (mm_nt(x, w.t().contiguous().t()), x @ w.t(), x.double() @ w.t().double()),
                              (mm_nt(x, w, torch.ones(24)), x @ w.t() + 1, x.double() @ w.t().double() + 1)):
        err, err32 = (got.double() - exact).abs().max(), (ref32.double() - exact).abs().max()
        assert err <= 4 * err32 + 1e-6, (err, err32)


def test_no_input_gradient_when_the_input_needs_none(monkeypatch):
    """Features need no gradient: the backward of the embedding runs one GEMM (∂L/∂W), not two."""
    calls = []
    real = dnnl.mm_nt
    monkeypatch.setattr(dnnl, "mm_nt", lambda *a: calls.append(a[0].shape) or real(*a))
    emb = LinearGELU(8, 6)
    x = torch.randn(20, 8)
    h = emb(x)
    calls.clear()
    h.sum().backward()
    assert calls == [torch.Size([6, 20])]  # gᵀ x only
    x.requires_grad_(True)
    h = emb(x)
    calls.clear()
    h.sum().backward()
    assert calls == [torch.Size([20, 6]), torch.Size([6, 20])] and x.grad is not None  # g W, then gᵀ x


def test_state_dict_is_the_sequential_one():
    """Checkpoints written before the fused node (nn.Sequential(Linear, GELU)) still load."""
    assert list(LinearGELU(5, 3).state_dict()) == list(nn.Sequential(nn.Linear(5, 3), nn.GELU()).state_dict())


def test_env_switch_turns_onednn_off(monkeypatch):
    monkeypatch.setenv("MILKIT_ONEDNN_MATMUL", "0")
    monkeypatch.setattr(dnnl, "_state", {})
    assert dnnl.onednn_enabled() is False
    x, w = torch.randn(7, 5), torch.randn(3, 5)
    torch.testing.assert_close(mm_nt(x, w), x @ w.t())


def test_bias_tanh_gradcheck_and_equals_tanh():
    """tanh(y + b) as 2σ(2y + 2b) − 1: gradcheck in float64; in float32 the value is within 1e-6 of
    torch.tanh and both gradients within 1e-5, also for saturated inputs (|y| up to 30)."""
    from milkit.nn.fused import bias_tanh

    g = torch.Generator().manual_seed(0)
    y = torch.randn(3, 7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(bias_tanh, (y, b))
    y32 = (torch.randn(2000, 16, generator=g) * 10).clamp(-30, 30).requires_grad_(True)
    b32 = torch.randn(16, generator=g, requires_grad=True)
    w = torch.randn(2000, 16, generator=g)
    outs = []
    for f in (bias_tanh, lambda u, c: torch.tanh(u + c)):
        y32.grad = b32.grad = None
        t = f(y32, b32)
        (t * w).sum().backward()
        outs.append((t, y32.grad.clone(), b32.grad.clone()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=1e-6)
    for a, c in zip(outs[0][1:], outs[1][1:]):
        torch.testing.assert_close(a, c, **TOL)
    with pytest.raises(ValueError, match="bias"):
        bias_tanh(y32, torch.zeros(3))

"""``milkit.nn.fused.tanh`` (tanh as 2σ(2z) − 1, issue 15) and the attention scorers that use it."""

import pytest
import torch

from milkit.nn import dnnl, fused
from milkit.nn.attention import AttentionScorer, GatedAttentionScorer


def test_tanh_equals_torch_tanh_in_value_and_gradient():
    z = torch.linspace(-12, 12, fused.TANH_MIN_ELEMENTS)  # large: the 2σ(2z) − 1 node
    assert torch.allclose(fused.tanh(z), torch.tanh(z), atol=3e-7, rtol=0)
    assert fused.tanh(z.requires_grad_()).grad_fn.name().endswith("_TanhBackward")
    small = torch.randn(10, 8, requires_grad=True)  # small and contiguous: torch.tanh itself
    assert fused.tanh(small).grad_fn.name() == "TanhBackward0"
    strided = torch.randn(10, 16, requires_grad=True)[:, :8]  # small but strided: the node
    assert fused.tanh(strided).grad_fn.name().endswith("_TanhBackward")
    assert fused.tanh(torch.tensor([0.0])).item() == 0.0
    zz = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fused.tanh, (zz,))
    # a strided half of a stacked GEMM output, as the gated scorers hand it over
    vu = torch.randn(50, 16, requires_grad=True)
    v = vu[:, :8]
    g = torch.randn(50, 8)
    (fused.tanh(v) * g).sum().backward()
    want = torch.autograd.grad((torch.tanh(vu[:, :8]) * g).sum(), vu)[0]
    assert torch.allclose(vu.grad, want, atol=1e-6)
    assert vu.grad[:, 8:].abs().max() == 0


@pytest.mark.parametrize("gated", [False, True])
def test_scorers_equal_the_plain_equations_on_both_sides_of_the_onednn_threshold(gated):
    torch.manual_seed(0)
    sc = GatedAttentionScorer(32, 16) if gated else AttentionScorer(32, 16)
    for n in (dnnl.MIN_ROWS - 1, dnnl.MIN_ROWS):  # two plain GEMMs / one stacked GEMM for the gated scorer
        h = torch.randn(1, n, 32, requires_grad=True)
        s = sc(h)
        t = torch.tanh(h @ sc.V.weight.T + sc.V.bias)
        if gated:
            t = t * torch.sigmoid(h @ sc.U.weight.T + sc.U.bias)
        want = (t @ sc.w.weight.T + sc.w.bias).squeeze(-1)
        assert s.shape == (1, n) and torch.allclose(s, want, atol=1e-5)
        gs = torch.autograd.grad(s.square().sum(), [h, sc.V.weight])
        gw = torch.autograd.grad(want.square().sum(), [h, sc.V.weight])
        for a, b in zip(gs, gw):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)

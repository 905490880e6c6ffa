"""TransMIL without its dead work (issue 15, 100k-instance bags) equals the implementation it
replaced (milkit e64603a, kept below as the reference, on the same parameters) within 1e-5:
bag logits and instance scores in eval mode, every parameter's gradient, and the training-mode
output under the same seed (the dropout masks the classifier reads are drawn alike). Bags
smaller than, equal to and larger than the landmark count, square and non-square; plus the
depth-wise convolution's hand-written backward against autograd's and float64."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from milkit.models.factory import build_mil_model, model_config
from milkit.models.transmil import depthwise_conv, moore_penrose_pinv, segment_means
from milkit.nn.encoders import EncoderConfig

TOL = dict(rtol=1e-5, atol=1e-5)


# -- the reference: TransMIL as of e64603a, on the new model's parameters ---------------------
def ref_attention(att, x: torch.Tensor, return_cls_attention: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, n, _ = x.shape
    q, k, v = att.to_qkv(x).view(b, n, 3, att.heads, att.dim_head).permute(2, 0, 3, 1, 4)
    q = q / math.sqrt(att.dim_head)
    m = min(att.landmarks, n)
    ql, kl = segment_means(q, m), segment_means(k, m)
    f1 = torch.softmax(q @ kl.transpose(-1, -2), dim=-1)
    mid = moore_penrose_pinv(torch.softmax(ql @ kl.transpose(-1, -2), dim=-1), att.pinv_iters)
    f2 = torch.softmax(ql @ k.transpose(-1, -2), dim=-1)
    out = f1 @ (mid @ (f2 @ v)) + att.res_conv(v)
    cls_attn = ((f1[:, :, :1] @ mid) @ f2).squeeze(2).mean(1) if return_cls_attention else None
    out = out.transpose(1, 2).reshape(b, n, att.heads * att.dim_head)
    return att.to_out(out), cls_attn


def ref_ppeg(p, x: torch.Tensor, side: int) -> torch.Tensor:
    b, _, c = x.shape
    cls, feat = x[:, :1], x[:, 1:].transpose(1, 2).reshape(b, c, side, side)
    k = p.proj.weight + F.pad(p.proj1.weight, (1, 1, 1, 1)) + F.pad(p.proj2.weight, (2, 2, 2, 2))
    k = k + F.pad(torch.ones_like(p.proj2.weight[..., :1, :1]), (3, 3, 3, 3))
    feat = F.conv2d(feat, k, p.proj.bias + p.proj1.bias + p.proj2.bias, padding=3, groups=c)
    return torch.cat([cls, feat.flatten(2).transpose(1, 2)], dim=1)


def ref_transmil(m, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One bag (1, n, P) → bag logit (1,), instance scores (1, n)."""
    h = m.fc(x)
    n = h.shape[1]
    side = math.ceil(math.sqrt(n))
    extra = side * side - n
    if extra:
        h = torch.cat([h, h.repeat(1, math.ceil(extra / n), 1)[:, :extra]], dim=1)
    t = torch.cat([m.cls_token.expand(1, -1, -1).to(h.dtype), h], dim=1)
    t = t + ref_attention(m.layer1.attn, m.layer1.norm(t), False)[0]
    t = ref_ppeg(m.ppeg, t, side)
    a, cls_attn = ref_attention(m.layer2.attn, m.layer2.norm(t), True)
    t = t + a
    return m.classifier(m.norm(t)[:, 0]).squeeze(-1), cls_attn[:, 1 : n + 1]


def _model(dropout: float = 0.0, dim: int = 24):
    torch.manual_seed(0)
    cfg = {"name": "transmil", "embed_dim": 32, "heads": 4, "landmarks": 16, "dropout": dropout}
    return build_mil_model(model_config(cfg), EncoderConfig(name="identity", in_dim=dim))


def _grads(m) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


#: fewer tokens than landmarks, exactly as many (15 + class token), more (Nyström), a square bag
SIZES = [1, 7, 15, 37, 100, 150]


@pytest.mark.parametrize("n", SIZES)
def test_transmil_equals_the_replaced_implementation(n):
    m = _model()
    x = torch.randn(1, n, 24, generator=torch.Generator().manual_seed(n))
    m.eval()
    with torch.no_grad():
        out = m(x)
        logit, scores = ref_transmil(m, x)
    torch.testing.assert_close(out.bag_logits, logit, **TOL)
    torch.testing.assert_close(out.instance_scores, scores, **TOL)
    m.train()  # dropout 0: both sides deterministic; every parameter's gradient
    for side in ("fast", "ref"):
        m.zero_grad()
        lo, sc = (lambda o: (o.bag_logits, o.instance_scores))(m(x)) if side == "fast" else ref_transmil(m, x)
        (lo.sum() + 0.1 * sc.square().sum()).backward()
        if side == "fast":
            fast = _grads(m)
    slow = _grads(m)
    assert fast.keys() == slow.keys() and len(fast) > 10
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], **TOL, msg=f"n={n}: gradient of {k}")


def test_training_mode_output_under_the_same_seed():
    """With dropout 0.1 the two draw the first layer's masks alike, and the class token's row of
    the last layer's mask from the start of the same stream: the same training-mode logit."""
    m = _model(dropout=0.1)
    x = torch.randn(1, 150, 24, generator=torch.Generator().manual_seed(1))
    m.train()
    torch.manual_seed(5)
    fast = m(x)
    torch.manual_seed(5)
    logit, scores = ref_transmil(m, x)
    torch.testing.assert_close(fast.bag_logits, logit, **TOL)
    torch.testing.assert_close(fast.instance_scores, scores, **TOL)
    torch.manual_seed(6)
    assert not torch.allclose(m(x).bag_logits, logit, atol=1e-6)  # dropout is on: another seed, another logit


def test_padded_batch_equals_its_bags_alone():
    m = _model().eval()
    a, b = torch.randn(1, 20, 24), torch.randn(1, 33, 24)
    x = torch.zeros(2, 33, 24)
    x[0, :20], x[1] = a[0], b[0]
    mask = torch.arange(33).expand(2, 33) < torch.tensor([[20], [33]])
    with torch.no_grad():
        both = m(x, mask)
        for i, bag in enumerate((a, b)):
            logit, scores = ref_transmil(m, bag)
            torch.testing.assert_close(both.bag_logits[i : i + 1], logit, **TOL)
            torch.testing.assert_close(both.instance_scores[i : i + 1, : bag.shape[1]], scores, **TOL)
    assert torch.all(both.instance_scores[0, 20:] == 0)


@pytest.mark.parametrize("shape,kernel", [((2, 3, 9, 11), (7, 7)), ((1, 4, 5, 40), (1, 33)), ((1, 4, 40, 5), (33, 1))])
def test_depthwise_conv_backward_is_autograds(shape, kernel):
    g = torch.Generator().manual_seed(0)
    c = shape[1]
    x = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c, 1, *kernel, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, generator=g, dtype=torch.float64, requires_grad=True)
    pad = (kernel[0] // 2, kernel[1] // 2)
    gy = torch.randn(shape, generator=g, dtype=torch.float64)
    mine = torch.autograd.grad(depthwise_conv(x, w, b, pad), (x, w, b), gy)
    ref = torch.autograd.grad(F.conv2d(x, w, b, padding=pad, groups=c), (x, w, b), gy)
    for u, v in zip(mine, ref):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: depthwise_conv(x, w, None, pad), (x[:1, :, :5], w))

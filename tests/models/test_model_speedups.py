"""The optimised CLAM, DSMIL and TransMIL equal their plain, unoptimised equations (1e-5):
outputs in eval mode and every parameter's gradient. The references below are the
models' equations written out one step at a time, as the code was before the speed work
(two attention GEMMs, separate dropouts, (f₁ mid)(f₂ v), three PPEG convolutions)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from milkit.models.factory import build_mil_model, model_config
from milkit.nn.attention import FastDropout, dropout_mask, masked_softmax
from milkit.nn.encoders import EncoderConfig

TOL = dict(rtol=1e-5, atol=1e-5)


def _model(name: str, dim: int = 24, **over):
    torch.manual_seed(0)
    return build_mil_model(model_config({"name": name, **over}), EncoderConfig(name="identity", in_dim=dim))


# -- references -----------------------------------------------------------------------
def ref_clam(m, x):
    h = F.relu(m.fc[0](x))
    att = m.attention
    s = att.W(torch.tanh(att.V[0](h)) * torch.sigmoid(att.U[0](h))).permute(0, 2, 1)  # (B, K, N)
    a = torch.softmax(s, dim=-1)
    z = torch.bmm(a, h)
    if m.multi_branch:
        logits = torch.cat([c(z[:, i]) for i, c in enumerate(m.classifiers)], dim=-1)
        pos = 1
    else:
        logits, pos = m.classifier(z[:, 0]), 0
    return logits[:, 1] - logits[:, 0], s[:, pos], a[:, pos]


def ref_dsmil(m, x):
    h = x
    c = m.instance_classifier(h).squeeze(-1)
    crit = c.argmax(dim=1)
    q = m.q(h)
    q_max = q[torch.arange(q.shape[0]), crit]
    s = torch.bmm(q, q_max.unsqueeze(-1)).squeeze(-1) / math.sqrt(m.query_dim)
    a = torch.softmax(s, dim=-1)
    bag = torch.bmm(a.unsqueeze(1), h).squeeze(1)
    return m.bag_classifier(bag).squeeze(-1), c, a


def ref_nystrom(att, x, return_cls):
    from milkit.models.transmil import moore_penrose_pinv, segment_means

    b, n, _ = x.shape
    q, k, v = att.to_qkv(x).view(b, n, 3, att.heads, att.dim_head).permute(2, 0, 3, 1, 4)
    q = q / math.sqrt(att.dim_head)
    mm = min(att.landmarks, n)
    ql, kl = segment_means(q, mm), segment_means(k, mm)
    f1 = torch.softmax(q @ kl.transpose(-1, -2), dim=-1)
    mid = moore_penrose_pinv(torch.softmax(ql @ kl.transpose(-1, -2), dim=-1), att.pinv_iters)
    f2 = torch.softmax(ql @ k.transpose(-1, -2), dim=-1)
    out = (f1 @ mid) @ (f2 @ v) + att.res_conv(v)
    cls = ((f1 @ mid) @ f2)[:, :, 0].mean(1) if return_cls else None
    return att.to_out[0](out.transpose(1, 2).reshape(b, n, -1)), cls


def ref_transmil(m, x):
    h = F.relu(m.fc[0](x))
    n = h.shape[1]
    side = math.ceil(math.sqrt(n))
    extra = side * side - n
    if extra:
        h = torch.cat([h, h.repeat(1, math.ceil(extra / n), 1)[:, :extra]], dim=1)
    t = torch.cat([m.cls_token, h], dim=1)
    t = t + ref_nystrom(m.layer1.attn, m.layer1.norm(t), False)[0]
    cls, feat = t[:, :1], t[:, 1:].transpose(1, 2).reshape(1, -1, side, side)
    p = m.ppeg
    feat = feat + p.proj(feat) + p.proj1(feat) + p.proj2(feat)
    t = torch.cat([cls, feat.flatten(2).transpose(1, 2)], dim=1)
    a, cls_attn = ref_nystrom(m.layer2.attn, m.layer2.norm(t), True)
    t = t + a
    return m.classifier(m.norm(t)[:, 0]).squeeze(-1), cls_attn[:, 1 : n + 1], None


CASES = [  # (model, config overrides, bag size, reference)
    ("clam_sb", {"embed_dim": 16, "attention_hidden": 8}, 40, ref_clam),
    ("clam_mb", {"embed_dim": 16, "attention_hidden": 8}, 40, ref_clam),
    ("dsmil", {"query_dim": 8}, 40, ref_dsmil),
    ("transmil", {"embed_dim": 32, "heads": 4, "landmarks": 16}, 150, ref_transmil),  # n > landmarks: Nyström
]


def _grads(m):
    return {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,over,n,ref", CASES, ids=[c[0] for c in CASES])
def test_optimised_model_equals_reference(name, over, n, ref):
    m = _model(name, dropout=0.0, **over) if name != "dsmil" else _model(name, **over)
    x = torch.randn(1, n, 24)
    m.eval()
    with torch.no_grad():
        out = m(x)
        logit, scores, attn = ref(m, x)
    torch.testing.assert_close(out.bag_logits, logit, **TOL)
    torch.testing.assert_close(out.instance_scores, scores, **TOL)
    if attn is not None:
        torch.testing.assert_close(out.attention, attn, **TOL)
    # gradients of every parameter (train mode; dropout 0 so both sides are deterministic)
    m.train()
    m.zero_grad()
    (m(x).bag_logits.sum() + 0.1 * m(x).instance_scores.square().sum()).backward()
    fast = _grads(m)
    m.zero_grad()
    lo, sc, _ = ref(m, x)
    (lo.sum() + 0.1 * sc.square().sum()).backward()
    slow = _grads(m)
    assert fast.keys() == slow.keys() and len(fast) > 3
    for k in fast:
        torch.testing.assert_close(fast[k], slow[k], **TOL, msg=f"{name}: gradient of {k}")


def test_padded_dsmil_equals_its_bags_alone():
    """The unpadded fast path and the masked path agree (padding never changes a result)."""
    m = _model("dsmil", query_dim=8).eval()
    a, b = torch.randn(1, 5, 24), torch.randn(1, 9, 24)
    x = torch.zeros(2, 9, 24)
    x[0, :5], x[1] = a[0], b[0]
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, :5] = True
    mask[1] = True
    with torch.no_grad():
        both, alone = m(x, mask), [m(a), m(b)]
    for i, o in enumerate(alone):
        torch.testing.assert_close(both.bag_logits[i], o.bag_logits[0], **TOL)
        k = o.instance_scores.shape[1]
        torch.testing.assert_close(both.instance_scores[i, :k], o.instance_scores[0], **TOL)
    assert torch.all(both.instance_scores[0, 5:] == 0)


def test_fast_dropout_is_inverted_dropout():
    torch.manual_seed(0)
    x = torch.ones(200_000)
    d = FastDropout(0.25)
    y = d.train()(x)
    zero = (y == 0).float().mean().item()
    assert abs(zero - 0.25) < 4 * math.sqrt(0.25 * 0.75 / x.numel())  # 4 σ
    assert set(torch.unique(y).tolist()) == {0.0, torch.tensor(1 / 0.75).item()}
    assert abs(y.mean().item() - 1.0) < 0.01  # unbiased
    assert torch.equal(d.eval()(x), x)
    # CLAM's one mask for two dropouts keeps q² of the products, scaled by 1/q²
    mk = dropout_mask(torch.ones(200_000), 1 - 0.75**2)
    assert abs((mk > 0).float().mean().item() - 0.75**2) < 0.01 and abs(mk.mean().item() - 1) < 0.01
    x.requires_grad_(True)
    y = d.train()(x)
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # ∂y/∂x = the mask (x = 1)


def test_masked_softmax_unchanged():
    s = torch.tensor([[1.0, 2.0, 3.0]])
    mask = torch.tensor([[True, False, True]])
    w = masked_softmax(s, mask)
    e = torch.exp(torch.tensor([1.0, 3.0]))
    torch.testing.assert_close(w, torch.tensor([[e[0] / e.sum(), 0.0, e[1] / e.sum()]]))


def test_gated_attention_pool_equals_reference():
    """The stacked [V; U] GEMM and the unpadded fast path of AttentionPool (ABMIL, D2L Eq. 1–2)."""
    from milkit.nn.attention import AttentionPool

    torch.manual_seed(0)
    pool = AttentionPool(24, 8, gated=True)
    h = torch.randn(2, 30, 24, requires_grad=True)
    sc = pool.scorer

    def ref(h, mask):
        s = sc.w(torch.tanh(sc.V(h)) * torch.sigmoid(sc.U(h))).squeeze(-1)
        a = masked_softmax(s, mask)
        return torch.bmm(a.unsqueeze(1), h).squeeze(1), a, s.masked_fill(~mask, 0.0)

    for mask in (torch.ones(2, 30, dtype=torch.bool), torch.arange(30).expand(2, 30) < torch.tensor([[30], [17]])):
        outs = []
        for f in (pool, ref):
            pool.zero_grad()
            h.grad = None
            z, a, s = f(h, mask)
            (z.square().sum() + s.sum()).backward()
            outs.append((z, a, s, h.grad.clone(), sc.V.weight.grad.clone(), sc.U.bias.grad.clone()))
        for x, y in zip(*outs):
            torch.testing.assert_close(x, y, **TOL)


# -- SmAP-early and SmTAP (issue 15): the plain equations, Sm as Eq. 8 with a dense Â -----
def _holey_graph(h: int, w: int, seed: int):
    import numpy as np

    from milkit.data.graph import grid_adjacency

    ys, xs = np.mgrid[0:h, 0:w]
    keep = np.random.default_rng(seed).random(h * w) > 0.25
    return grid_adjacency(np.stack([xs.ravel(), ys.ravel()], 1)[keep] * 256, 256)


def ref_sm(sm, graph, u):
    """Eq. 8 step by step: G₀ = U, G_t = α Â G_{t−1} + (1−α) U, Â dense."""
    adj = graph.dense_normalized_adjacency(torch.float64).to(u.dtype)
    a = sm.alpha
    g = u
    for _ in range(sm.steps):
        g = a * (adj @ g) + (1 - a) * u
    return g


def ref_pool_early(pool, h, graph):
    """SmAP-early as NOTES.md writes it: Sm on the 512-d embeddings, then attention on them."""
    hs = ref_sm(pool.sm, graph, h)
    s = pool.w(torch.tanh(pool.V(hs))).squeeze(-1)
    a = torch.softmax(s, dim=0)
    return a @ hs, s, a


def ref_mhsa(att, x):
    """Standard multi-head self-attention written out: softmax(QKᵀ/√d)V per head, output projection."""
    n, d = x.shape
    heads = att.heads
    q, k, v = F.linear(x, att.qkv.weight, att.qkv.bias).view(n, 3, heads, d // heads).permute(1, 2, 0, 3)
    p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1)
    return att.out((p @ v).transpose(0, 1).reshape(n, d))


def ref_smap_early(m, x, graph):
    h = F.gelu(F.linear(x, m.embed[0].weight, m.embed[0].bias))
    z, s, a = ref_pool_early(m.pool, h, graph)
    return m.classifier(z).squeeze(-1), s, a


def ref_smtap(m, x, graph):
    h = F.gelu(F.linear(x, m.embed[0].weight, m.embed[0].bias))
    for layer, sm in zip(m.transformer.layers, m.layer_sm):
        h = h + ref_sm(sm, graph, ref_mhsa(layer.attn, layer.norm(h)))  # pre-LN, Sm before the residual
    z, s, a = ref_pool_early(m.pool, h, graph)
    return m.classifier(z).squeeze(-1), s, a


SM_CASES = [
    ("smap", {"sm_where": "early"}, ref_smap_early),
    ("smtap", {"embed_dim": 32, "heads": 4, "attention_hidden": 16}, ref_smtap),
]


@pytest.mark.parametrize("name,over,ref", SM_CASES, ids=[c[0] for c in SM_CASES])
def test_sm_models_equal_their_plain_equations(name, over, ref):
    """One bag and a padded batch of two: bag logits, instance scores, attention and every
    parameter's gradient equal the reference within 1e-5 (eval mode: spectral norm fixed)."""
    m = _model(name, **over).eval()
    graphs = [_holey_graph(6, 7, 1), _holey_graph(5, 5, 2)]
    sizes = [g.num_nodes for g in graphs]
    xs = [torch.randn(n, 24) for n in sizes]
    x = torch.zeros(2, max(sizes), 24)
    mask = torch.zeros(2, max(sizes), dtype=torch.bool)
    for i, xi in enumerate(xs):
        x[i, : sizes[i]], mask[i, : sizes[i]] = xi, True
    for batch in ([0], [0, 1]):
        bx, bm = (xs[0].unsqueeze(0), None) if batch == [0] else (x, mask)
        m.zero_grad()
        out = m(bx, bm, [graphs[i] for i in batch])
        loss = out.bag_logits.sum() + 0.1 * out.instance_scores.square().sum()
        loss.backward()
        fast = _grads(m)
        m.zero_grad()
        ref_loss = 0.0
        for j, i in enumerate(batch):
            logit, s, a = ref(m, xs[i], graphs[i])
            n = sizes[i]
            torch.testing.assert_close(out.bag_logits[j], logit, **TOL)
            torch.testing.assert_close(out.instance_scores[j, :n], s, **TOL)
            torch.testing.assert_close(out.attention[j, :n], a, **TOL)
            ref_loss = ref_loss + logit + 0.1 * s.square().sum()
        ref_loss.backward()
        slow = _grads(m)
        assert fast.keys() == slow.keys() and len(fast) >= 6
        for k in fast:
            torch.testing.assert_close(fast[k], slow[k], **TOL, msg=f"{name} batch {batch}: gradient of {k}")

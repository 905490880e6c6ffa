import math

import torch

from milkit.nn.attention import AttentionPool, GatedAttentionScorer, masked_softmax


def test_gated_attention_matches_hand_computed_eq2():
    # d = 2, L = 1: s_k = w·tanh(V h_k)·sigm(U h_k) + biases 0
    sc = GatedAttentionScorer(2, 1)
    with torch.no_grad():
        sc.V.weight.copy_(torch.tensor([[1.0, 0.0]]))
        sc.U.weight.copy_(torch.tensor([[0.0, 1.0]]))
        sc.w.weight.copy_(torch.tensor([[2.0]]))
        for lin in (sc.V, sc.U, sc.w):
            lin.bias.zero_()
    h = torch.tensor([[[1.0, 0.0], [0.5, 2.0]]])
    s = sc(h)
    s0 = 2 * math.tanh(1.0) * 0.5  # sigm(0) = 0.5
    s1 = 2 * math.tanh(0.5) * (1 / (1 + math.exp(-2.0)))
    assert torch.allclose(s, torch.tensor([[s0, s1]]), atol=1e-6)
    pool = AttentionPool(2, 1)
    pool.scorer = sc
    z, a, logits = pool(h, torch.ones(1, 2, dtype=torch.bool))
    e0, e1 = math.exp(s0), math.exp(s1)
    a_ref = torch.tensor([[e0 / (e0 + e1), e1 / (e0 + e1)]])
    assert torch.allclose(a, a_ref, atol=1e-6)
    assert torch.allclose(z, a_ref[0, 0] * h[0, 0] + a_ref[0, 1] * h[0, 1], atol=1e-6)  # Eq. 1


def test_masked_softmax_gives_padding_zero_weight():
    logits = torch.tensor([[1.0, 2.0, 100.0]])
    mask = torch.tensor([[True, True, False]])
    w = masked_softmax(logits, mask)
    assert w[0, 2] == 0
    assert torch.allclose(w[0, :2], torch.softmax(logits[0, :2], 0))

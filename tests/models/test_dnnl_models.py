"""The MIL models whose linears go through ``milkit.nn.dnnl.dense`` (issue 15: oneDNN GEMMs) equal
their plain ``nn.Linear`` / ``F.linear`` path within 1e-5 — outputs and every parameter's gradient —,
keep their state-dict keys (old checkpoints load), and work in float64. ``dnnl.MIN_ROWS`` is set to 0
so that these small bags take the oneDNN path (the real threshold is 4096 rows); the plain path is
``dnnl._state = {"on": False}``, what ``MILKIT_ONEDNN_MATMUL=0`` gives."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from milkit.benchmarks.speed import _grid_coords
from milkit.data.graph import grid_adjacency
from milkit.models.factory import build_mil_model, model_config
from milkit.nn import dnnl
from milkit.nn.attention import AttentionPool
from milkit.nn.encoders import EncoderConfig

TOL = dict(rtol=1e-5, atol=1e-5)
DIM = 24
#: every model with a ``dnnl.Linear`` / ``dnnl.dense`` call site (SmTAP: the transformer's qkv and out)
MODELS = {
    "abmil": {"gated": False},
    "abmil_gated": {"name": "abmil", "gated": True},
    "clam_sb": {},
    "clam_mb": {},
    "dsmil": {},
    "dtfd": {},
    "transmil": {"landmarks": 8, "embed_dim": 32, "heads": 4},
    "smtap": {"embed_dim": 32, "heads": 4, "attention_hidden": 16},
}


def _build(label: str) -> nn.Module:
    over = dict(MODELS[label])
    name = over.pop("name", label)
    torch.manual_seed(0)
    return build_mil_model(model_config({"name": name, **over}), EncoderConfig(name="identity", in_dim=DIM))


def _bag(n: int = 30, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, n, DIM, generator=g, dtype=dtype), grid_adjacency(_grid_coords(n), 256)


def _step(m: nn.Module, x, graph, seed: int = 3):
    """One training-mode forward (dropout and DTFD's random pseudo-bags drawn from ``seed``) and backward,
    on a copy (spectral norm's power iteration updates its buffers in every training forward)."""
    m = copy.deepcopy(m)
    m.train()
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = m(x, None, [graph])
    (out.bag_logits.sum() + out.instance_scores.pow(2).sum()).backward()
    grads = {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}
    return out, grads, m


@pytest.mark.parametrize("label", list(MODELS))
def test_onednn_path_equals_plain_linear(label, monkeypatch):
    m, (x, graph) = _build(label), _bag()
    monkeypatch.setattr(dnnl, "MIN_ROWS", 0)
    calls = []
    real = dnnl.mm_nt
    monkeypatch.setattr(dnnl, "mm_nt", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(dnnl, "_state", {"on": False})
    ref, ref_g, _ = _step(m, x, graph)
    n_plain = len(calls)
    monkeypatch.setattr(dnnl, "_state", {})
    got, got_g, _ = _step(m, x, graph)
    if dnnl.onednn_enabled():
        assert len(calls) > n_plain, "the oneDNN path was not taken"
    torch.testing.assert_close(got.bag_logits, ref.bag_logits, **TOL)
    torch.testing.assert_close(got.instance_scores, ref.instance_scores, **TOL)
    if ref.attention is not None:
        torch.testing.assert_close(got.attention, ref.attention, **TOL)
    assert set(got_g) == set(ref_g)
    dnnl_params = {f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, dnnl.Linear)}
    assert dnnl_params <= set(ref_g)  # (CLAM's instance classifiers only get gradients from aux_loss)
    for k in ref_g:
        torch.testing.assert_close(got_g[k], ref_g[k], **TOL, msg=lambda s, k=k: f"{label} {k}: {s}")


def test_below_min_rows_is_exactly_f_linear():
    """Bags under ``MIN_ROWS`` take ``F.linear`` itself: bit-identical to the code before (1k bags)."""
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(2, 50, 16, generator=g), torch.randn(8, 16, generator=g), torch.randn(8, generator=g)
    assert torch.equal(dnnl.dense(x, w, b), F.linear(x, w, b))
    assert dnnl.MIN_ROWS > 1000


@pytest.mark.parametrize("label", list(MODELS))
def test_state_dict_keys_unchanged(label, monkeypatch):
    """The model built with plain ``nn.Linear`` (the code before) has the same keys, and each loads the
    other's state dict strictly."""
    new, cls = _build(label), dnnl.Linear
    monkeypatch.setattr(dnnl, "Linear", nn.Linear)
    old = _build(label)
    assert any(isinstance(mod, cls) for mod in new.modules()) or label == "abmil_gated"  # (gated: dense())
    assert not any(isinstance(mod, cls) for mod in old.modules())
    assert list(new.state_dict()) == list(old.state_dict())
    new.load_state_dict(old.state_dict())
    old.load_state_dict(new.state_dict())


def test_deep_mil_attention_pool_equal(monkeypatch):
    """DeepMILNet / ABMIL's AttentionPool (both scorers) on the oneDNN path equals the plain one."""
    monkeypatch.setattr(dnnl, "MIN_ROWS", 0)
    for gated in (False, True):
        torch.manual_seed(0)
        pool = AttentionPool(DIM, 8, gated=gated)
        h = torch.randn(2, 20, DIM, requires_grad=True)
        mask = torch.ones(2, 20, dtype=torch.bool)
        mask[1, 15:] = False
        outs = []
        for state in ({"on": False}, {}):
            monkeypatch.setattr(dnnl, "_state", state)
            pool.zero_grad(set_to_none=True)
            h.grad = None
            z, a, s = pool(h, mask)
            (z.sum() + s.pow(2).sum()).backward()
            outs.append([z, a, s, h.grad.clone()] + [p.grad.clone() for p in pool.parameters()])
        for u, v in zip(*outs):
            torch.testing.assert_close(u, v, **TOL)


def test_dense_gradcheck_float64():
    """:class:`dnnl._Dense`'s backward (input, weight, bias) against finite differences, float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(4, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: dnnl._Dense.apply(x, w, b), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: dnnl._Dense.apply(x, w, None), (x, w))


@pytest.mark.parametrize("label", ["abmil_gated", "dsmil", "clam_sb", "transmil"])
def test_float64_models_run_and_gradcheck(label, monkeypatch):
    """float64 models take ``F.linear`` (oneDNN is float32 only) and their bag logit's input gradient
    passes gradcheck on a small bag (eval mode: no dropout)."""
    monkeypatch.setattr(dnnl, "MIN_ROWS", 0)
    m = _build(label).double().eval()
    x, graph = _bag(9, torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: m(x, None, [graph]).bag_logits, (x,), atol=1e-6)


def test_min_rows_env(monkeypatch):
    """``MILKIT_ONEDNN_MIN_ROWS``: default 4096, an integer ≥ 0, anything else a one-line error naming it."""
    monkeypatch.delenv("MILKIT_ONEDNN_MIN_ROWS", raising=False)
    assert dnnl._min_rows() == 4096
    monkeypatch.setenv("MILKIT_ONEDNN_MIN_ROWS", "0")
    assert dnnl._min_rows() == 0
    for bad in ("-1", "many"):
        monkeypatch.setenv("MILKIT_ONEDNN_MIN_ROWS", bad)
        with pytest.raises(ValueError, match="MILKIT_ONEDNN_MIN_ROWS"):
            dnnl._min_rows()

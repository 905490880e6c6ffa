"""Every registered MIL model that needs no bag graph: shapes, gradients, permutation and padding invariance."""

import importlib

import pytest
import torch

from milkit import registry
from milkit.data.bag import Bag, collate_bags
from milkit.models.factory import build_mil_model, model_config
from milkit.nn.encoders import EncoderConfig

GRAPH_MODELS = {"smap", "smtap"}  # need a bag graph: covered by tests/models/test_sm*.py
ORDER_DEPENDENT = {"transmil"}  # PPEG convolves instances laid out in sequence order (Shao et al. 2021)


def _available():
    names = []
    for name, target in registry.MODELS.items():
        if name in GRAPH_MODELS:
            continue
        try:
            registry.resolve(target)
        except (ImportError, AttributeError):
            continue
        names.append(name)
    return names


def _model(name):
    torch.manual_seed(0)
    m = build_mil_model(model_config({"name": name}), EncoderConfig(name="linear", in_dim=6, out_dim=16))
    return m.eval()


def test_core_models_are_available():
    assert {"abmil", "meanpool", "maxpool"} <= set(_available())


@pytest.mark.parametrize("name", _available())
def test_shapes_and_gradients(name):
    m = _model(name).train()
    x = torch.randn(2, 7, 6)
    out = m(x)
    assert out.bag_logits.shape == (2,)
    assert out.instance_scores.shape == (2, 7)
    out.bag_logits.sum().backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", [n for n in _available() if n not in ORDER_DEPENDENT])
def test_permutation_invariance(name):
    m = _model(name)
    x = torch.randn(1, 9, 6)
    perm = torch.randperm(9)
    with torch.no_grad():
        a, b = m(x), m(x[:, perm])
    assert torch.allclose(a.bag_logits, b.bag_logits, atol=1e-5)
    assert torch.allclose(a.instance_scores[:, perm], b.instance_scores, atol=1e-5)


@pytest.mark.parametrize("name", _available())
def test_padding_invariance(name):
    m = _model(name)
    bags = [Bag(torch.randn(n, 6), 0, f"b{n}") for n in (3, 8, 5)]
    batch = collate_bags(bags)
    with torch.no_grad():
        padded = m(batch.instances, batch.mask)
        for i, bag in enumerate(bags):
            alone = m(bag.instances.unsqueeze(0))
            assert torch.allclose(padded.bag_logits[i], alone.bag_logits[0], atol=1e-5), name
            assert torch.allclose(padded.instance_scores[i, : len(bag)], alone.instance_scores[0], atol=1e-5), name


def test_abmil_singleton_logit_equals_bag_of_one():
    m = _model("abmil")
    x = torch.randn(1, 4, 6)
    with torch.no_grad():
        inst = m.instance_logits(x)
        for k in range(4):
            assert torch.allclose(inst[0, k], m(x[:, k : k + 1]).bag_logits[0], atol=1e-6)

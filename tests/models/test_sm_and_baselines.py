"""SmAP/SmTAP and the MIL baselines (CLAM, DSMIL, TransMIL, DTFD) + ABMIL: the MIL model contract.

Shapes, gradients, permutation equivariance of instance scores and invariance of the
bag logit (graph permuted with the instances), padding invariance in padded batches,
spectral norm where NOTES.md "Sm" puts it, and each model's auxiliary loss.
"""

import numpy as np
import pytest
import torch

from milkit.data.bag import Bag, collate_bags
from milkit.data.graph import grid_adjacency
from milkit.models.factory import build_mil_model, model_config
from milkit.nn.encoders import EncoderConfig

D_IN = 6
SMALL = {
    "abmil": {},
    "smap": {"embed_dim": 16, "attention_hidden": 8},
    "smap_mid": {"name": "smap", "sm_where": "mid", "embed_dim": 16, "attention_hidden": 8},
    "smap_late": {"name": "smap", "sm_where": "late", "embed_dim": 16, "attention_hidden": 8},
    "smap_exact": {"name": "smap", "sm_mode": "exact", "embed_dim": 16, "attention_hidden": 8},
    "smtap": {"embed_dim": 16, "attention_hidden": 8, "heads": 2},
    "clam_sb": {"embed_dim": 16, "attention_hidden": 8, "k_sample": 2, "dropout": 0.0},
    "clam_mb": {"embed_dim": 16, "attention_hidden": 8, "k_sample": 2, "dropout": 0.0},
    "dsmil": {"query_dim": 8},
    "transmil": {"embed_dim": 16, "heads": 2, "landmarks": 4, "dropout": 0.0},
    "dtfd": {"embed_dim": 16, "attention_hidden": 8, "n_pseudo_bags": 3},
}
ORDER_DEPENDENT = {"transmil"}  # PPEG and Nyström landmarks follow the sequence order


def build(key: str):
    cfg = {"name": key, **SMALL[key]}
    torch.manual_seed(0)
    return build_mil_model(model_config(cfg), EncoderConfig(name="linear", in_dim=D_IN, out_dim=12)).eval()


def grid_bag(h: int, w: int, seed: int, label: int = 0) -> Bag:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    keep = rng.random(h * w) > 0.2
    keep[0] = True
    coords = torch.from_numpy(np.stack([xs.ravel(), ys.ravel()], 1)[keep] * 224)
    n = coords.shape[0]
    return Bag(torch.from_numpy(rng.normal(size=(n, D_IN))).float(), label, f"g{seed}",
               torch.zeros(n, dtype=torch.long), coords, adj=grid_adjacency(coords, 224))


@pytest.mark.parametrize("key", list(SMALL))
def test_shapes_and_gradients(key):
    m = build(key).train()
    batch = collate_bags([grid_bag(4, 5, 1, 1), grid_bag(3, 3, 2, 0)])
    out = m(batch.instances, batch.mask, batch.adj)
    assert out.bag_logits.shape == (2,)
    assert out.instance_scores.shape == batch.mask.shape
    assert torch.all(out.instance_scores[~batch.mask] == 0)
    loss = out.bag_logits.sum() + out.instance_scores.sum()
    if hasattr(m, "aux_loss"):
        aux = m.aux_loss(out, batch)
        assert aux.ndim == 0 and torch.isfinite(aux)
        loss = loss + aux
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.encoder.parameters())


@pytest.mark.parametrize("key", [k for k in SMALL if k not in ORDER_DEPENDENT])
def test_permutation(key):
    m = build(key)
    bag = grid_bag(4, 5, 3)
    perm = torch.randperm(len(bag))
    with torch.no_grad():
        a = m(bag.instances.unsqueeze(0), None, [bag.adj])
        b = m(bag.instances[perm].unsqueeze(0), None, [bag.adj.permute(perm)])
    assert torch.allclose(a.bag_logits, b.bag_logits, atol=1e-5)
    assert torch.allclose(a.instance_scores[:, perm], b.instance_scores, atol=1e-5)


@pytest.mark.parametrize("key", list(SMALL))
def test_padding_invariance(key):
    m = build(key)
    bags = [grid_bag(3, 4, 4), grid_bag(5, 5, 5), grid_bag(2, 3, 6)]
    batch = collate_bags(bags)
    with torch.no_grad():
        padded = m(batch.instances, batch.mask, batch.adj)
        for i, bag in enumerate(bags):
            alone = m(bag.instances.unsqueeze(0), None, [bag.adj])
            assert torch.allclose(padded.bag_logits[i], alone.bag_logits[0], atol=1e-5), key
            assert torch.allclose(padded.instance_scores[i, : len(bag)], alone.instance_scores[0], atol=1e-5), key


@pytest.mark.parametrize("key", ["smap", "smtap"])
def test_early_linear_rewrite_gives_the_same_values(key):
    m = build(key)
    batch = collate_bags([grid_bag(4, 5, 9), grid_bag(3, 3, 10)])
    with torch.no_grad():
        fast = m(batch.instances, batch.mask, batch.adj)
        m.pool.linear_rewrite = False
        ref = m(batch.instances, batch.mask, batch.adj)
    assert torch.allclose(fast.bag_logits, ref.bag_logits, atol=1e-5)
    assert torch.allclose(fast.instance_scores, ref.instance_scores, atol=1e-5)


def test_sm_models_need_the_graph():
    m = build("smap")
    with pytest.raises(ValueError, match="bag graph"):
        m(torch.randn(1, 5, D_IN))


def _sigma_max(w: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(w.detach(), ord=2))


@pytest.mark.parametrize("where,normed", [("early", {"V", "w"}), ("mid", {"w"}), ("late", set())])
def test_spectral_norm_where_notes_say(where, normed):
    m = build({"early": "smap", "mid": "smap_mid", "late": "smap_late"}[where]).train()
    bag = grid_bag(3, 3, 7)
    for _ in range(5):  # a few power iterations
        m(bag.instances.unsqueeze(0), None, [bag.adj])
    m.eval()
    for name in ("V", "w"):
        s = _sigma_max(getattr(m.pool, name).weight)
        if name in normed:
            assert s == pytest.approx(1.0, abs=1e-2), (where, name)
        else:
            assert abs(s - 1.0) > 1e-2, (where, name)


def test_clam_instance_loss_targets_the_attended_instances():
    m = build("clam_sb")
    bag = grid_bag(3, 3, 8, label=1)
    batch = collate_bags([bag])
    out = m(batch.instances, batch.mask)
    loss = m.aux_loss(out, batch)
    assert loss > 0
    opt = torch.optim.SGD(m.instance_classifiers.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        m.aux_loss(m(batch.instances, batch.mask), batch).backward()
        opt.step()
    assert m.aux_loss(m(batch.instances, batch.mask), batch) < loss


def test_dsmil_scores_are_the_instance_classifier():
    m = build("dsmil")
    x = torch.randn(1, 7, D_IN)
    with torch.no_grad():
        out = m(x)
        c = m.instance_classifier(m.encoder(x[0])).squeeze(-1)
    assert torch.allclose(out.instance_scores[0], c, atol=1e-6)
    assert torch.allclose(out.extras["max_logit"], c.max().unsqueeze(0))

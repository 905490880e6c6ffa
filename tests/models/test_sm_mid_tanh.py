"""SmAP-mid: Sm after tanh (§4.3, default) or before it (torchmil), as an option."""

import numpy as np
import pytest
import torch

from milkit.config import load_experiment
from milkit.data.bag import Bag, collate_bags
from milkit.data.graph import grid_adjacency
from milkit.models.factory import build_mil_model, model_config
from milkit.models.sm import SmAP
from milkit.nn.encoders import EncoderConfig
from milkit.nn.smooth import BatchGraphs

D_IN = 6


def grid_bag(h: int, w: int, seed: int) -> Bag:
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:h, 0:w]
    coords = torch.from_numpy(np.stack([xs.ravel(), ys.ravel()], 1) * 224)
    n = coords.shape[0]
    return Bag(torch.from_numpy(rng.normal(size=(n, D_IN))).float(), 0, f"g{seed}",
               torch.zeros(n, dtype=torch.long), coords, adj=grid_adjacency(coords, 224))


def _model(mid_tanh: str | None):
    cfg = {"name": "smap", "sm_where": "mid", "embed_dim": 16, "attention_hidden": 8, "spectral_norm": False}
    if mid_tanh is not None:
        cfg["sm_mid_tanh"] = mid_tanh
    torch.manual_seed(0)
    return build_mil_model(model_config(cfg), EncoderConfig(name="linear", in_dim=D_IN, out_dim=12)).eval()


@pytest.mark.parametrize("mid_tanh", ["after", "before"])
def test_mid_sm_is_where_the_option_says(mid_tanh):
    m = _model(mid_tanh)
    batch = collate_bags([grid_bag(4, 5, 3), grid_bag(3, 3, 4)])
    with torch.no_grad():
        out = m(batch.instances, batch.mask, batch.adj)
        from milkit.models.base import encode_instances

        h = m.embed(encode_instances(m.encoder, batch.instances, batch.mask)) * batch.mask.unsqueeze(-1)
        g = BatchGraphs(batch.adj, batch.mask)
        pool = m.pool
        if mid_tanh == "after":
            t = pool.sm(torch.tanh(pool.V(h)), g, batch.mask)
        else:
            t = torch.tanh(pool.sm(pool.V(h), g, batch.mask))
        s = pool.w(t).squeeze(-1).masked_fill(~batch.mask, 0.0)
    assert torch.allclose(out.instance_scores, s, atol=1e-6)


def test_after_is_the_default_and_the_two_differ():
    assert SmAP.Config().sm_mid_tanh == "after"
    batch = collate_bags([grid_bag(4, 5, 3)])
    with torch.no_grad():
        a = _model(None)(batch.instances, batch.mask, batch.adj).instance_scores
        b = _model("before")(batch.instances, batch.mask, batch.adj).instance_scores
    assert torch.allclose(a, _model("after")(batch.instances, batch.mask, batch.adj).instance_scores)
    assert not torch.allclose(a, b, atol=1e-4)


def test_bad_value_is_named():
    with pytest.raises(Exception, match="sm_mid_tanh"):
        model_config({"name": "smap", "sm_where": "mid", "sm_mid_tanh": "inside"})

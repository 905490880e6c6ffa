"""DSMIL trains on 0.5·bag BCE + 0.5·max-instance BCE (DSMIL and WENO code), in plain MIL and as WENO's teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from milkit.config import TrainerConfig
from milkit.data.bag import Bag, BagDataset, collate_bags
from milkit.methods.mil import mil_loss
from milkit.methods.weno import WENOConfig, WENOModule, build_net
from milkit.models.factory import build_mil_model, model_config
from milkit.nn.encoders import EncoderConfig


def _batch():
    g = torch.Generator().manual_seed(0)
    bags = [Bag(torch.randn(5, 4, generator=g), 1, "b0"), Bag(torch.randn(3, 4, generator=g), 0, "b1")]
    return BagDataset(bags), collate_bags(bags)


def test_mil_loss_weights_dsmil_half_and_half() -> None:
    _, batch = _batch()
    model = build_mil_model(model_config({"name": "dsmil"}), EncoderConfig(name="linear", in_dim=4, out_dim=6))
    loss, _ = mil_loss(model, batch)
    out = model(batch.instances, batch.mask)
    y = batch.labels
    expected = 0.5 * F.binary_cross_entropy_with_logits(out.bag_logits, y) + 0.5 * F.binary_cross_entropy_with_logits(
        out.extras["max_logit"], y)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_weno_dsmil_teacher_loss_half_and_half() -> None:
    ds, batch = _batch()
    cfg = WENOConfig(encoder=EncoderConfig(name="linear", in_dim=4, out_dim=6), teacher={"name": "dsmil"}, hpm=False)
    mod = WENOModule(build_net(cfg), cfg, TrainerConfig(), ds)
    loss, out, _, _ = mod.teacher_loss(batch)
    y = batch.labels
    expected = 0.5 * F.binary_cross_entropy_with_logits(out.bag_logits, y) + 0.5 * F.binary_cross_entropy_with_logits(
        out.extras["max_logit"], y)
    assert torch.allclose(loss, expected, atol=1e-6)

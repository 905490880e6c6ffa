"""engine.fit_stage: same seed → identical weights; best checkpoint restored; model.pt loads weights-only."""

import torch

from milkit.config import TrainerConfig
from milkit.data.bag import Bag, BagDataset
from milkit.engine import fit_stage, restore_submodule
from milkit.methods.base import BagModule, bag_loader
from milkit.methods.mil import mil_loss
from milkit.models.factory import build_mil_model, model_config
from milkit.nn.encoders import EncoderConfig


def _bags(n, seed):
    g = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n):
        x = torch.randn(5, 4, generator=g)
        if i % 2:
            x[0, 0] += 3.0  # a positive instance
        bags.append(Bag(x, i % 2, f"b{i}"))
    return BagDataset(bags)


def _fit(tmp, seed=0):
    torch.manual_seed(123)  # model init is seeded by fit_stage's seed below, not by this
    cfg = TrainerConfig(max_epochs=3, lr=1e-2, progress_bar=False, accelerator="cpu", devices=1)
    from milkit.engine import seed_everything

    seed_everything(seed)
    model = build_mil_model(model_config({"name": "abmil"}), EncoderConfig(name="linear", in_dim=4, out_dim=8))
    path = fit_stage(BagModule(model, mil_loss, cfg), bag_loader(_bags(16, 0), cfg, True, seed),
                     bag_loader(_bags(8, 1), cfg, False), tmp, cfg, seed)
    return model, path


def test_same_seed_same_weights(tmp_path):
    m1, p1 = _fit(tmp_path / "a")
    m2, _ = _fit(tmp_path / "b")
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert (tmp_path / "a" / "logs" / "metrics.csv").is_file()
    assert (tmp_path / "a" / "checkpoints" / "best.ckpt").is_file()
    fresh = build_mil_model(model_config({"name": "abmil"}), EncoderConfig(name="linear", in_dim=4, out_dim=8))
    restore_submodule(fresh, p1)
    for (k, a), (_, b) in zip(m1.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k

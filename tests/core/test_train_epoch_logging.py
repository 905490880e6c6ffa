"""LossModule logs ``train/*`` once per epoch from sums it keeps itself (issue 15): the
metrics.csv it writes must be the one that ``self.log(on_epoch=True)`` on every step wrote."""

import copy

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from milkit.config import TrainerConfig
from milkit.engine import _quiet_lightning
from milkit.methods.base import LossModule


class XY:
    """A custom batch (as milkit's BagBatch): ``len`` is its batch size, ``to`` moves it."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def to(self, device):
        return XY(self.x.to(device), self.y.to(device))


def _collate(items):
    return XY(torch.stack([a for a, _ in items]), torch.stack([b for _, b in items]))


def _loss(model, batch):
    x, y = batch.x, batch.y
    err = (model(x).squeeze(-1) - y) ** 2
    return err.mean(), {"abs": (model(x).squeeze(-1) - y).abs().mean().detach(), "const": 0.25 * len(y)}


class PerStepLogging(LossModule):
    """The previous training_step: two ``self.log`` calls per step, Lightning's own epoch mean."""

    def training_step(self, batch, batch_idx):
        loss, logs = self.loss_fn(self.model, batch)
        bs = len(batch)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=bs)
        for k, v in logs.items():
            self.log(f"train/{k}", v, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def on_train_epoch_end(self):
        pass


def _fit(cls, model, tmp_path, name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(11, 5, generator=g)
    y = torch.randn(11, generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, collate_fn=_collate)  # batches of 4, 4, 3: weights matter
    module = cls(model, _loss, TrainerConfig(lr=1e-2, progress_bar=False))
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=CSVLogger(tmp_path, name=name, version=""),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, deterministic=True)
    trainer.fit(module, loader)
    return (tmp_path / name / "metrics.csv").read_text(), module, x, y


def test_epoch_means_equal_per_step_logging(tmp_path):
    _quiet_lightning()
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    new_csv, _, x, y = _fit(LossModule, copy.deepcopy(model), tmp_path, "new")
    old_csv, _, _, _ = _fit(PerStepLogging, copy.deepcopy(model), tmp_path, "old")
    assert new_csv == old_csv  # same rows, columns and digits
    rows = [ln.split(",") for ln in new_csv.strip().splitlines()]
    head = rows[0]
    assert {"train/loss", "train/abs", "train/const", "epoch"} <= set(head)
    assert len(rows) == 1 + 3  # one row per epoch
    const = [float(r[head.index("train/const")]) for r in rows[1:]]
    # batch-size-weighted mean of 0.25·bs over batches of 4, 4, 3: (4·1 + 4·1 + 3·0.75) / 11
    np.testing.assert_allclose(const, [(4 + 4 + 3 * 0.75) / 11] * 3, rtol=1e-6)


def test_epoch_loss_is_the_weighted_mean_of_the_step_losses(tmp_path):
    """The first epoch's train/loss recomputed by hand from the same weights, step by step."""
    _quiet_lightning()
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 1)
    ref = copy.deepcopy(model)
    csv, _, x, y = _fit(LossModule, copy.deepcopy(model), tmp_path, "run")
    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    total, n = 0.0, 0
    for s in range(0, 11, 4):
        xb, yb = x[s : s + 4], y[s : s + 4]
        loss = ((ref(xb).squeeze(-1) - yb) ** 2).mean()
        total += float(loss) * len(yb)
        n += len(yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    rows = [ln.split(",") for ln in csv.strip().splitlines()]
    assert abs(float(rows[1][rows[0].index("train/loss")]) - total / n) < 1e-5

"""Checkpoint ties go to the later epoch (Max-Min released code; issue 12)."""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from milkit.checkpointing import LaterOnTiesCheckpoint
from milkit.config import TrainerConfig
from milkit.engine import fit_stage


class _Tied(L.LightningModule):
    """Weights change every epoch; the monitored value is the same except where scripted."""

    def __init__(self, values: list[float]):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))
        self.values = values

    def training_step(self, batch, idx):
        return (self.w - 1.0 - self.current_epoch).pow(2).sum()  # keeps moving w

    def validation_step(self, batch, idx):
        pass

    def on_validation_epoch_end(self):
        self.log("val/err", self.values[self.current_epoch])
        self.log("val/epoch_seen", float(self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.3)


def _loader():
    return DataLoader(TensorDataset(torch.zeros(2, 1)), batch_size=2)


def _best_epoch(tmp_path, values, mode):
    cfg = TrainerConfig(max_epochs=len(values), progress_bar=False, accelerator="cpu", devices=1)
    m = _Tied(values)
    fit_stage(m, _loader(), _loader(), tmp_path, cfg, seed=0, monitor="val/err", monitor_mode=mode)
    ck = torch.load(tmp_path / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)
    return int(ck["epoch"])


def test_ties_keep_the_later_epoch_min(tmp_path):
    # epochs 1 and 3 tie at the best error 0.1: Lightning's ModelCheckpoint kept epoch 1
    assert _best_epoch(tmp_path, [0.3, 0.1, 0.2, 0.1, 0.4], "min") == 3


def test_ties_keep_the_later_epoch_max(tmp_path):
    assert _best_epoch(tmp_path, [0.5, 0.9, 0.9, 0.2], "max") == 2


def test_strict_improvement_still_wins(tmp_path):
    assert _best_epoch(tmp_path, [0.3, 0.05, 0.1, 0.1], "min") == 1


def test_is_a_model_checkpoint():
    from lightning.pytorch.callbacks import ModelCheckpoint

    assert issubclass(LaterOnTiesCheckpoint, ModelCheckpoint)

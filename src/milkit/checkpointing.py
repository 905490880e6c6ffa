"""Best-checkpoint selection that keeps the later epoch on ties (Max-Min released code).

Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` replaces its best
checkpoint only on a strict improvement, so ties go to the *earliest* epoch. With a
discrete monitor such as validation classification error (Max-Min §3.3(b)) ties are
the rule; the authors keep the latest epoch that reaches the best value. Issue 12.
"""

from __future__ import annotations

from typing import Optional

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor


class LaterOnTiesCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose comparison is ``>=`` (mode max) / ``<=`` (mode min)."""

    def check_monitor_top_k(self, trainer, current: Optional[Tensor] = None) -> bool:  # noqa: D102
        if current is None:
            return False
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        op = {"min": torch.le, "max": torch.ge}[self.mode]
        decision = bool(op(current, self.best_k_models[self.kth_best_model_path]))
        return trainer.strategy.reduce_boolean_decision(decision)


__all__ = ["LaterOnTiesCheckpoint"]

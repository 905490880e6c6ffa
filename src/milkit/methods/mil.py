"""Plain MIL training: any registered MIL model on bag labels with BCE (the ABMIL baseline).

Instance scores are the model's own (attention logits for ABMIL, D2L Tables I–II
"MIL [11]"), or single-instance-bag probabilities with ``instance_scores: singleton``.
A model that defines ``aux_loss(output, batch)`` (CLAM's clustering loss, DSMIL's
max-instance loss) has it added to the BCE; DSMIL's two terms are weighted 0.5/0.5 as in
the DSMIL and WENO code (``AUX_WEIGHTS``).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from milkit.config import StrictModel
from milkit.data.bag import BagBatch
from milkit.data.base import DataSplits
from milkit.engine import fit_stage, restore_submodule
from milkit.losses.bernoulli import bce_with_targets
from milkit.methods.base import BagModule, Labeler, Method, bag_loader
from milkit.models.base import MILModel
from milkit.models.factory import ModelSection, build_mil_model, model_config
from milkit.nn.encoders import EncoderConfig
from milkit.run_dir import RunDir


#: (bag, auxiliary) loss weights per model class name; DSMIL: 0.5·bag + 0.5·max-instance BCE
#: (DSMIL code ``0.5*bag_loss + 0.5*max_loss``; WENO's released DSMIL teacher the same)
AUX_WEIGHTS: dict[str, tuple[float, float]] = {"DSMIL": (0.5, 0.5)}


def loss_weights(model: torch.nn.Module) -> tuple[float, float]:
    """(bag weight, auxiliary weight) for ``model``; (1, 1) unless listed in ``AUX_WEIGHTS``."""
    return AUX_WEIGHTS.get(type(model).__name__, (1.0, 1.0))


def combine_losses(model: torch.nn.Module, bce: Tensor, batch: BagBatch, out, logs: dict | None = None) -> Tensor:
    """w_bag·BCE + w_aux·aux_loss (the model's auxiliary loss when it has one, see ``loss_weights``)."""
    if not hasattr(model, "aux_loss"):
        return bce
    wb, wa = loss_weights(model)
    aux = model.aux_loss(out, batch)
    if logs is not None:
        logs["aux"] = aux.detach()
    return wb * bce + wa * aux


def mil_loss(model: MILModel, batch: BagBatch) -> tuple[Tensor, dict[str, Tensor]]:
    """Bag BCE (+ the model's auxiliary loss when it has one, weighted by ``loss_weights``)."""
    out = model(batch.instances, batch.mask, batch.adj)
    bce = bce_with_targets(out.bag_logits, batch.labels).mean()
    logs = {"bce": bce.detach()}
    return combine_losses(model, bce, batch, out, logs), logs


class MILMethod(Method):
    """One stage, ``mil``: a MIL model trained on bag labels."""

    primary_stage = "mil"

    class Config(StrictModel):
        name: Literal["mil"] = "mil"
        encoder: EncoderConfig = Field(default_factory=EncoderConfig)
        model: ModelSection = Field(default_factory=lambda: model_config({"name": "abmil"}))
        instance_scores: Literal["model", "singleton"] = Field(
            "model", description="model: the model's own instance scores; singleton: each instance as a bag"
        )

    def build_model(self) -> MILModel:
        return build_mil_model(self.cfg.model, self.cfg.encoder)

    def fit(self, splits: DataSplits, run: RunDir) -> dict[str, Labeler]:
        tr = self.exp.trainer
        model = self.build_model()
        module = BagModule(model, mil_loss, tr)
        fit_stage(
            module,
            bag_loader(splits.train, tr, shuffle=True, seed=self.exp.seed),
            bag_loader(splits.val, tr, shuffle=False),
            run.stage_dir("mil"),
            tr,
            seed=self.exp.seed,
        )
        return {"mil": Labeler(model, self.cfg.instance_scores)}

    def load(self, run: RunDir) -> dict[str, Labeler]:
        model = restore_submodule(self.build_model(), run.model_path("mil"))
        return {"mil": Labeler(model, self.cfg.instance_scores, run.read_threshold("mil").get("threshold"))}


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Eval mode and no gradients (a frozen teacher)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model

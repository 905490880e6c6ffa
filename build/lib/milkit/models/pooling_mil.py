"""Embedding-level mean- and max-pooling MIL (Ilse et al. 2018 baselines; D2L Theorem 1).

Instance scores are the classifier's logit for each instance embedding, i.e. the
bag logit of that instance alone.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from milkit.config import StrictModel
from milkit.models.base import EmbeddingMILModel, MILOutput


class _PoolMIL(EmbeddingMILModel):
    def __init__(self, encoder: nn.Module, in_dim: int):
        super().__init__()
        self.encoder = encoder
        self.classifier = nn.Linear(in_dim, 1)

    @classmethod
    def from_config(cls, cfg: StrictModel, encoder: nn.Module, in_dim: int) -> "_PoolMIL":
        return cls(encoder, in_dim)

    def pool(self, h: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def head(self, h: Tensor, mask: Tensor) -> MILOutput:
        z = self.pool(h, mask)
        inst = self.instance_logits_from(h, mask)
        return MILOutput(bag_logits=self.classifier(z).squeeze(-1), instance_scores=inst, embeddings=h)

    def instance_logits_from(self, h: Tensor, mask: Tensor) -> Tensor:
        return self.classifier(h).squeeze(-1) * mask


class MeanPoolMIL(_PoolMIL):
    class Config(StrictModel):
        name: Literal["meanpool"] = "meanpool"

    def pool(self, h: Tensor, mask: Tensor) -> Tensor:
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class MaxPoolMIL(_PoolMIL):
    class Config(StrictModel):
        name: Literal["maxpool"] = "maxpool"

    def pool(self, h: Tensor, mask: Tensor) -> Tensor:
        return h.masked_fill(~mask.unsqueeze(-1), torch.finfo(h.dtype).min).amax(1)

"""ABMIL: attention-based deep MIL (Ilse et al. 2018); gated attention as in D2L Eq. 1–2.

Instance scores are the attention logits s_k (pre-softmax), as the baseline of
D2L Tables I–II and of the Sm paper. ``instance_logits`` classifies each instance
alone: with a bag of size one, a_k = 1 and z = h_k, so the bag logit is c(h_k).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from torch import Tensor, nn

from milkit.config import StrictModel
from milkit.models.base import EmbeddingMILModel, MILOutput
from milkit.nn.attention import AttentionPool


class ABMIL(EmbeddingMILModel):
    class Config(StrictModel):
        name: Literal["abmil"] = "abmil"
        gated: bool = Field(True, description="gated attention, D2L Eq. 2 (Ilse et al. Eq. 9)")
        attention_hidden: int = Field(128, ge=1, description="L, NOTES.md D2L (Ilse et al.: 128)")
        dropout: float = Field(0.0, ge=0, lt=1)

    def __init__(self, encoder: nn.Module, in_dim: int, attention_hidden: int = 128, gated: bool = True, dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.pool = AttentionPool(in_dim, attention_hidden, gated=gated)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, 1))

    @classmethod
    def from_config(cls, cfg: "ABMIL.Config", encoder: nn.Module, in_dim: int) -> "ABMIL":
        return cls(encoder, in_dim, cfg.attention_hidden, cfg.gated, cfg.dropout)

    def head(self, h: Tensor, mask: Tensor) -> MILOutput:
        z, a, s = self.pool(h, mask)
        return MILOutput(bag_logits=self.classifier(z).squeeze(-1), instance_scores=s, attention=a, embeddings=h)

    def instance_logits_from(self, h: Tensor, mask: Tensor) -> Tensor:
        return self.classifier(h).squeeze(-1) * mask

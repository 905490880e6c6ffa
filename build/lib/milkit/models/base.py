"""The contract every MIL model in milkit keeps (DESIGN.md "Contracts").

``forward(x, mask=None, adj=None) -> MILOutput`` with ``bag_logits (B,)`` and
``instance_scores (B, N)``. Padding never changes a result: a padded bag scores
exactly as the unpadded one (positions where ``mask`` is False hold 0 in
``instance_scores`` and must be ignored by callers).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn


@dataclass
class MILOutput:
    """What a MIL model returns for a batch of B bags of (padded) size N."""

    bag_logits: Tensor  # (B,)
    instance_scores: Tensor  # (B, N); 0 where padded
    attention: Tensor | None = None  # (B, N) normalised attention weights, 0 where padded
    embeddings: Tensor | None = None  # (B, N, D) instance embeddings, when the model has them
    extras: dict[str, Tensor] = field(default_factory=dict)


def full_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    """``mask`` or an all-True (B, N) mask for an unpadded batch ``x`` of shape (B, N, ...)."""
    if mask is None:
        return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    return mask.to(torch.bool)


def encode_instances(encoder: nn.Module, x: Tensor, mask: Tensor) -> Tensor:
    """Run ``encoder`` on the real instances only, so that padding and batch statistics
    (BatchNorm) never see padded zeros; returns (B, N, D) with zeros where padded."""
    b, n = x.shape[:2]
    if bool(mask.all()):  # unpadded batch: no gather/scatter copies (the common batch-size-1 case)
        h = encoder(x.reshape(b * n, *x.shape[2:]))
        return h.reshape(b, n, h.shape[-1])
    h_real = encoder(x[mask])
    h = h_real.new_zeros((b, n, h_real.shape[-1]))
    h[mask] = h_real
    return h


class MILModel(nn.Module):
    """Base class: subclasses implement ``forward(x, mask=None, adj=None) -> MILOutput``.

    ``instance_logits(x, mask)`` scores each instance as a bag of size one (what
    Distill-to-Label's student and WENO's student use); models that cannot do so
    raise ``NotImplementedError``.
    """

    def forward(self, x: Tensor, mask: Tensor | None = None, adj: object | None = None) -> MILOutput:  # noqa: D102
        raise NotImplementedError

    def instance_logits(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logit of each instance taken alone as a bag of size one; (B, N), 0 where padded."""
        raise NotImplementedError(f"{type(self).__name__} cannot score single-instance bags")


class EmbeddingMILModel(MILModel):
    """A MIL model split into an instance encoder and a head on the embeddings.

    Subclasses set ``self.encoder`` and implement ``head(h, mask) -> MILOutput`` and
    ``instance_logits_from(h, mask)``; recipes that look at one bag several ways (VAT-MIL's
    noise and sub-bags, distillation's single-instance bags) then encode each instance once.
    """

    encoder: nn.Module

    def encode(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        return encode_instances(self.encoder, x, full_mask(x, mask))

    def head(self, h: Tensor, mask: Tensor) -> MILOutput:
        raise NotImplementedError

    def instance_logits_from(self, h: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor, mask: Tensor | None = None, adj: object | None = None) -> MILOutput:
        mask = full_mask(x, mask)
        return self.head(self.encode(x, mask), mask)

    def instance_logits(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = full_mask(x, mask)
        return self.instance_logits_from(self.encode(x, mask), mask)


def bag_and_instance_logits(model: MILModel, x: Tensor, mask: Tensor, adj: object | None = None) -> tuple[MILOutput, Tensor]:
    """The model's output and its single-instance-bag logits (B, N), encoding each instance once
    when the model is an :class:`EmbeddingMILModel`."""
    if isinstance(model, EmbeddingMILModel):
        h = model.encode(x, mask)
        return model.head(h, mask), model.instance_logits_from(h, mask)
    return model(x, mask, adj), model.instance_logits(x, mask)

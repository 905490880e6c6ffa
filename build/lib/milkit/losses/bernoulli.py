"""Losses on Bernoulli (sigmoid) outputs: BCE, Bernoulli KL (D2L Eq. 6), entropy.

A two-class softmax over logits (z₀, z₁) is a sigmoid of z₁ − z₀, so D2L's
softmax outputs (§III-C) are written here with one logit per bag.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

EPS = 1e-7


def bce_with_targets(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy of sigmoid(logits) against (soft) targets in [0, 1], per element."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none")


def bernoulli_kl(p: Tensor, q: Tensor, eps: float = EPS) -> Tensor:
    """KL(Bern(p) ‖ Bern(q)) = p log(p/q) + (1−p) log((1−p)/(1−q)), D2L Eq. 6; per element."""
    p = p.clamp(eps, 1 - eps)
    q = q.clamp(eps, 1 - eps)
    return p * (p.log() - q.log()) + (1 - p) * ((1 - p).log() - (1 - q).log())


def bernoulli_kl_with_logits(p_logits: Tensor, q_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """KL between Bernoulli variables given logits, both softened by ``temperature`` (D2L Eq. 4, 6).

    Written with log-sigmoids so that it is exact and finite for large logits.
    """
    a = p_logits / temperature
    b = q_logits / temperature
    p = torch.sigmoid(a)
    return p * (F.logsigmoid(a) - F.logsigmoid(b)) + (1 - p) * (F.logsigmoid(-a) - F.logsigmoid(-b))


def bernoulli_entropy_with_logits(logits: Tensor) -> Tensor:
    """Entropy H(p) = −p log p − (1−p) log(1−p) of p = sigmoid(logits), per element (nats)."""
    p = torch.sigmoid(logits)
    return -(p * F.logsigmoid(logits) + (1 - p) * F.logsigmoid(-logits))

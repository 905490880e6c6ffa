"""Soft Dice loss and IKD-MIL's inversion for negative images (IKD-MIL §3.1, Eq. 1)."""

from __future__ import annotations

import torch
from torch import Tensor


def _check(pred: Tensor, target: Tensor) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"prediction has shape {tuple(pred.shape)} but target has shape {tuple(target.shape)}")
    if pred.dim() < 2:
        raise ValueError(f"expected maps of shape (B, ...), got {tuple(pred.shape)}")


def soft_dice_loss(pred: Tensor, target: Tensor, smooth: float = 1.0, reduction: str = "mean") -> Tensor:
    """1 − (2 Σ p·t + s) / (Σ p + Σ t + s) per image (sums over all but the batch dim).

    ``pred`` are probabilities, ``target`` soft or hard masks in [0, 1]; ``smooth`` = s
    (the usual +1 that keeps empty masks defined). ``reduction``: mean | sum | none.
    """
    _check(pred, target)
    p, t = pred.flatten(1), target.flatten(1).to(pred.dtype)
    loss = 1.0 - (2.0 * (p * t).sum(1) + smooth) / (p.sum(1) + t.sum(1) + smooth)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    if reduction == "none":
        return loss
    raise ValueError(f"unknown reduction {reduction!r}; use mean, sum or none")


def invert_negatives(pred: Tensor, target: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Eq. 1's inversion: for images with label 0 use 1 − f and 1 − l, else f and l."""
    _check(pred, target)
    neg = (labels.reshape(-1) < 0.5).reshape(-1, *([1] * (pred.dim() - 1)))
    return torch.where(neg, 1.0 - pred, pred), torch.where(neg, 1.0 - target.to(pred.dtype), target.to(pred.dtype))


def inverted_dice_loss(pred: Tensor, target: Tensor, labels: Tensor, smooth: float = 1.0, reduction: str = "mean") -> Tensor:
    """Dice(f̌, ľ) with the inversion of Eq. 1 applied to negative images (label 0)."""
    p, t = invert_negatives(pred, target, labels)
    return soft_dice_loss(p, t, smooth=smooth, reduction=reduction)


def label_masks(labels: Tensor, shape: tuple[int, int]) -> Tensor:
    """IKD §3.1 naive masks: ones(H, W) for positive images, zeros for negative ones."""
    return (labels.reshape(-1, 1, 1) >= 0.5).float().expand(-1, *shape)

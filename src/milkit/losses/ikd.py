"""IKD-MIL losses: teacher (Eq. 1), fusion knowledge distillation (Eq. 2),
weighted cross-entropy with soft teacher targets (Eq. 3) and the student objective (Eq. 4).

Maps are probabilities (B, H, W): side outputs ``sides`` (list of 3) and the fusion
``fused`` = Σ w_i f_i. Negative images (label 0) use their known all-zero mask, with
Eq. 1's inversion (Dice(1 − f, 1)); positives use the label mask (teacher) or the
frozen teacher's soft fused map (student).
"""

from __future__ import annotations

import torch
from torch import Tensor

from milkit.losses.dice import inverted_dice_loss, label_masks

#: IKD §3.2 / Table 4: weight of L_wce in Eq. 4
DEFAULT_A = 0.25


def teacher_loss(sides: list[Tensor], fused: Tensor, labels: Tensor, smooth: float = 1.0) -> Tensor:
    """Eq. 1: Dice(f̌_w, ľ) + Σ_i Dice(f̌_i, ľ) with l = ones for positives, zeros for negatives."""
    target = label_masks(labels, tuple(fused.shape[-2:]))
    loss = inverted_dice_loss(fused, target, labels, smooth)
    for f in sides:
        loss = loss + inverted_dice_loss(f, target, labels, smooth)
    return loss


def student_targets(teacher_fused: Tensor, labels: Tensor) -> Tensor:
    """Soft targets: the frozen teacher's fused map on positives, the known zero mask on negatives."""
    pos = (labels.reshape(-1, 1, 1) >= 0.5).to(teacher_fused.dtype)
    return teacher_fused.detach() * pos


def fusion_kd_loss(sides: list[Tensor], fused: Tensor, target: Tensor, labels: Tensor, smooth: float = 1.0) -> Tensor:
    """Eq. 2: Dice(f̌^s_w, f̌^t_w) + Σ_i Dice(f̌^s_i, f̌^t_w) — every student block learns the teacher's fusion."""
    loss = inverted_dice_loss(fused, target, labels, smooth)
    for f in sides:
        loss = loss + inverted_dice_loss(f, target, labels, smooth)
    return loss


#: Eq. 3's cross-entropy: two-class (the authors' code and OEEM [34], which Eq. 3 cites);
#: "positive" (−t log s alone, as printed) pushes every pixel towards foreground (issue 12)
DEFAULT_WCE_FORM = "binary"


def weighted_ce(
    student: Tensor, target: Tensor, eps: float = 1e-7, detach_weights: bool = True, form: str = DEFAULT_WCE_FORM
) -> Tensor:
    """Eq. 3: L_wce = Σ_i ce_i · w_i, w = softmax(−ce) over the pixels of an image; mean over images.

    ``target`` is soft (the teacher's probabilities, never rounded — NOTES.md).
    ``form="binary"`` (default): ce_i = −t_i log s_i − (1 − t_i) log(1 − s_i), the two-class
    CE of OEEM [34] that Eq. 3 cites; ``"positive"``: ce_i = −t_i log s_i as printed.
    ``detach_weights`` (default on) treats w as constants, as OEEM does: with gradients
    through w, ∂L/∂ce_i = w_i·(1 − ce_i + L) is negative on a hard pixel (ce_i > 1 + L),
    so descent would move that pixel *away* from the teacher.
    """
    if student.shape != target.shape:
        raise ValueError(f"student map has shape {tuple(student.shape)} but target has shape {tuple(target.shape)}")
    t = target.to(student.dtype)
    ce = -(t * torch.log(student.clamp(eps, 1.0)))
    if form == "binary":
        ce = ce - (1.0 - t) * torch.log((1.0 - student).clamp(eps, 1.0))
    elif form != "positive":
        raise ValueError(f"unknown weighted-CE form {form!r}; use positive or binary")
    ce = ce.flatten(1)
    w = torch.softmax(-(ce.detach() if detach_weights else ce), dim=1)
    return (ce * w).sum(1).mean()


def student_loss(
    sides: list[Tensor],
    fused: Tensor,
    teacher_fused: Tensor,
    labels: Tensor,
    a: float = DEFAULT_A,
    smooth: float = 1.0,
    wce_form: str = DEFAULT_WCE_FORM,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 4: L^s = L_kd + a·L_wce; returns the loss and its parts."""
    target = student_targets(teacher_fused, labels)
    kd = fusion_kd_loss(sides, fused, target, labels, smooth)
    wce = weighted_ce(fused, target, form=wce_form)
    return kd + a * wce, {"kd": kd.detach(), "wce": wce.detach()}

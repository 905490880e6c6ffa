"""Distill-to-Label student objective, Eq. 5 (§III-C).

L(S) = γc·Lc(Y, P_s) + γb·H(P_t^τ, P_s^τ) + γi·Σ_k H(P_t^{k,τ}, P_s^{k,τ}) + γe·Σ_k Le(P_s^k)

H is the Bernoulli KL (Eq. 6), P^τ the temperature-softened prediction (Eq. 4)
and P^k the prediction on the bag made of instance k alone.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

from milkit.losses.bernoulli import bce_with_targets, bernoulli_entropy_with_logits, bernoulli_kl_with_logits


def student_terms(
    student_bag: Tensor,
    teacher_bag: Tensor,
    student_inst: Tensor,
    teacher_inst: Tensor,
    labels: Tensor,
    mask: Tensor,
    temperature: float,
    instance_reduction: Literal["sum", "mean"] = "sum",
) -> dict[str, Tensor]:
    """The four terms of Eq. 5 (unweighted), averaged over the bags of the batch.

    ``*_inst`` are single-instance-bag logits (B, N); padded positions are ignored.
    ``instance_reduction="sum"`` is Eq. 5 as written (Σ_k).
    """
    m = mask.to(student_inst.dtype)
    kl_i = bernoulli_kl_with_logits(teacher_inst, student_inst, temperature) * m
    ent_i = bernoulli_entropy_with_logits(student_inst) * m
    if instance_reduction == "sum":
        kl_i, ent_i = kl_i.sum(1), ent_i.sum(1)
    else:
        kl_i, ent_i = kl_i.sum(1) / m.sum(1), ent_i.sum(1) / m.sum(1)
    return {
        "classification": bce_with_targets(student_bag, labels).mean(),
        "bag_kd": bernoulli_kl_with_logits(teacher_bag, student_bag, temperature).mean(),
        "instance_kd": kl_i.mean(),
        "instance_entropy": ent_i.mean(),
    }

"""Loss terms of Max-Min uncertainty (Belharbi et al.), by the paper's equation numbers.

- :func:`negative_entropy` — EEM regulariser R = −H(p̂⁻) (Eq. 4), equal to
  KL(p̂⁻‖q) − log c (Eq. 5, App. A.1);
- :func:`cross_entropy_to_uniform` — SEM regulariser R = H(q, p̂⁻) (Eq. 6), equal to
  KL(q‖p̂⁻) + log c (App. A.2);
- :func:`extended_log_barrier` — ψ_t of Kervadec et al. applied to the size
  constraints −s⁺ ≤ 0, −s⁻ ≤ 0 that replace −(1/t)[log s⁺ + log s⁻] in Eq. 7;
- :func:`t_schedule` — t₀·factor^epoch capped at t_max (§3.3(a));
- :func:`posterior_weighted_cam`, :func:`pseudo_binary_mask` — M⁺ = Σ_c p̂_c·CAM_c,
  min–max normalised, then Eq. 12;
- :func:`maxmin_loss` — the total of Eq. 7 plus the localizer's own CE (Fig. 2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def negative_entropy(logits: Tensor) -> Tensor:
    """EEM: −H(p̂) = Σ_l p̂_l log p̂_l per sample (Eq. 4); ``logits`` (B, C) → (B,)."""
    logp = F.log_softmax(logits, dim=-1)
    return (logp.exp() * logp).sum(dim=-1)


def kl_to_uniform(logits: Tensor) -> Tensor:
    """KL(p̂‖q) with q uniform (Eq. 5, App. A.1) = −H(p̂) + log c; (B, C) → (B,)."""
    return negative_entropy(logits) + math.log(logits.shape[-1])


def cross_entropy_to_uniform(logits: Tensor) -> Tensor:
    """SEM: H(q, p̂) = −(1/c) Σ_l log p̂_l per sample (Eq. 6); (B, C) → (B,)."""
    return -F.log_softmax(logits, dim=-1).mean(dim=-1)


def kl_uniform_to(logits: Tensor) -> Tensor:
    """KL(q‖p̂) with q uniform (App. A.2) = H(q, p̂) − log c; (B, C) → (B,)."""
    return cross_entropy_to_uniform(logits) - math.log(logits.shape[-1])


def uncertainty_regulariser(logits: Tensor, variant: str) -> Tensor:
    """R(p̂⁻) of Eq. 8: ``"eem"`` → −H(p̂⁻), ``"sem"`` → H(q, p̂⁻); (B, C) → (B,)."""
    if variant == "eem":
        return negative_entropy(logits)
    if variant == "sem":
        return cross_entropy_to_uniform(logits)
    raise ValueError(f"unknown max-uncertainty variant {variant!r}; use 'eem' or 'sem'")


def extended_log_barrier(z: Tensor, t: float) -> Tensor:
    """ψ_t(z) for a constraint z ≤ 0 (Kervadec et al.; NOTES.md "Max-Min"):

    ψ_t(z) = −(1/t)·log(−z)                      if z ≤ −1/t²
           = t·z − (1/t)·log(1/t²) + 1/t          otherwise.

    Both branches meet with equal value and slope at z = −1/t²; the linear branch
    keeps a finite penalty (and gradient t) for violated constraints.
    """
    if t <= 0:
        raise ValueError(f"log-barrier t must be > 0, got {t}")
    thr = -1.0 / t**2
    inside = z <= thr
    # evaluate the log only where it is defined, so the gradient stays finite
    safe = torch.where(inside, z, torch.full_like(z, thr))
    log_branch = -torch.log(-safe) / t
    lin_branch = t * z - math.log(1.0 / t**2) / t + 1.0 / t
    return torch.where(inside, log_branch, lin_branch)


def t_schedule(epoch: int, t0: float, factor: float, t_max: float) -> float:
    """t after ``epoch`` epochs: min(t0·factor^epoch, t_max) (§3.3(a): GlaS 5, ×1.01, ≤10)."""
    if t0 <= 0 or factor < 1 or t_max < t0:
        raise ValueError(f"bad log-barrier schedule t0={t0}, factor={factor}, t_max={t_max}")
    return float(min(t0 * factor**epoch, t_max))


def minmax_normalise(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """Per-image min–max normalisation of (B, H, W) maps to [0, 1] (NOTES.md "Max-Min")."""
    flat = maps.reshape(maps.shape[0], -1)
    lo = flat.min(dim=1).values.view(-1, *([1] * (maps.dim() - 1)))
    hi = flat.max(dim=1).values.view(-1, *([1] * (maps.dim() - 1)))
    return (maps - lo) / (hi - lo + eps)


def posterior_weighted_cam(cams: Tensor, logits: Tensor) -> Tensor:
    """Differentiable "winning CAM": Σ_c p̂_c·CAM_c (§3.3(a)); cams (B, C, h, w), logits (B, C)."""
    if cams.shape[:2] != logits.shape:
        raise ValueError(f"cams {tuple(cams.shape)} and logits {tuple(logits.shape)} disagree on (B, C)")
    p = torch.softmax(logits, dim=-1)
    return torch.einsum("bc,bchw->bhw", p, cams)


def pseudo_binary_mask(m: Tensor, sigma: float = 0.15, omega: float = 5.0) -> Tensor:
    """Eq. 12: M := 1 / (1 + exp(−ω·(M − σ))) on a map normalised to [0, 1]."""
    return torch.sigmoid(omega * (m - sigma))


def foreground_mask(cams: Tensor, logits: Tensor, size: tuple[int, int], sigma: float = 0.15,
                    omega: float = 5.0, normalisation: str = "image") -> Tensor:
    """M⁺ at image resolution: posterior-weighted CAM → bilinear upsampling → min–max → Eq. 12.

    ``normalisation``: ``"image"`` min–max per image (NOTES.md), ``"batch"`` over the
    whole batch (the authors' released code; equal to "image" at their evaluation batch
    size of 1), ``"none"``. Returns (B, H, W) in (0, 1); M⁻ = 1 − M⁺.
    """
    m = posterior_weighted_cam(cams, logits)
    m = F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    if normalisation == "image":
        m = minmax_normalise(m)
    elif normalisation == "batch":
        m = (m - m.min()) / (m.max() - m.min() + 1e-8)
    elif normalisation != "none":
        raise ValueError(f"unknown mask normalisation {normalisation!r}; use image, batch or none")
    return pseudo_binary_mask(m, sigma, omega)


@dataclass
class MaxMinTerms:
    """Switches and weights of Eq. 7 (Table 4's ablation: FG only, +BG, +ASC)."""

    use_background: bool = True  # λ·R(p̂⁻)
    use_size: bool = True  # ASC: extended log-barrier on s⁺, s⁻
    variant: str = "sem"  # "eem" (Eq. 4) or "sem" (Eq. 6)
    lam: float = 1e-7  # λ in Eq. 7 (§3.3(a), GlaS)
    localizer_weight: float = 1.0  # weight of the localizer's own CE (Fig. 2; paper: 1)
    size_normalised: bool = False  # s as a fraction of |Ω| instead of a pixel count (Eqs. 10–11)


def maxmin_loss(
    fg_logits: Tensor,
    bg_logits: Tensor | None,
    loc_logits: Tensor,
    mask_fg: Tensor,
    targets: Tensor,
    t: float,
    terms: MaxMinTerms,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Eq. 7 + localizer CE, averaged over the batch.

    ``fg_logits``/``bg_logits``: classifier on X⊙M⁺ / X⊙M⁻ (B, C); ``loc_logits``:
    localizer on X (B, C); ``mask_fg``: M⁺ (B, H, W); ``targets``: class indices (B,).
    """
    targets = targets.long()
    ce_fg = F.cross_entropy(fg_logits, targets)
    ce_loc = F.cross_entropy(loc_logits, targets)
    total = ce_fg + terms.localizer_weight * ce_loc
    logs: dict[str, Tensor] = {"ce_fg": ce_fg.detach(), "ce_loc": ce_loc.detach()}
    if terms.use_background:
        if bg_logits is None:
            raise ValueError("the background term needs the classifier's logits on X⊙M⁻")
        reg = uncertainty_regulariser(bg_logits, terms.variant).mean()
        total = total + terms.lam * reg
        logs[f"bg_{terms.variant}"] = reg.detach()
    s_fg = mask_fg.flatten(1).sum(dim=1)
    s_bg = (1.0 - mask_fg).flatten(1).sum(dim=1)
    if terms.size_normalised:
        n = mask_fg[0].numel()
        s_fg, s_bg = s_fg / n, s_bg / n
    logs["fg_fraction"] = (mask_fg.flatten(1).mean(dim=1)).mean().detach()
    if terms.use_size:
        barrier = (extended_log_barrier(-s_fg, t) + extended_log_barrier(-s_bg, t)).mean()
        total = total + barrier
        logs["size_barrier"] = barrier.detach()
    return total, logs

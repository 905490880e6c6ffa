"""Virtual adversarial training for MIL: the regularisers of Distill-to-Label Eq. 3 (§III-B).

L(T) = λc·Lc(Y, T(X)) + λn·Ln(T(X), T(X_n)) + λδ·Lδ(T(X), T(X_δ)) + λe·Le(T(X̄))

- X_n: the bag plus K_n − K uncorrelated noise instances, uniform in the data range.
- X_δ: every instance moved inside a norm ball of radius δ; the direction is
  adversarial (one power-iteration step, Miyato et al.) or random.
- X̄: a random sub-bag; Le is the entropy of the prediction on it.

Ln and Lδ are BCEs whose target is the clean prediction T(X), held fixed (VAT
treats the clean prediction as a constant, Miyato et al. 2018). Bags are padded
batches: extra instances are appended and sub-bags are taken through the mask,
so the model's padding invariance carries every term.
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor

from milkit.losses.bernoulli import bce_with_targets, bernoulli_entropy_with_logits, bernoulli_kl_with_logits

BagFn = Callable[[Tensor, Tensor], Tensor]  # (x (B,N,...), mask (B,N)) -> bag logits (B,)
Encode = Callable[[Tensor, Tensor], Tensor]  # (x, mask) -> instance embeddings h (B,N,D)
Head = Callable[[Tensor, Tensor], Tensor]  # (h, mask) -> bag logits (B,)


def _instance_norm(v: Tensor) -> Tensor:
    """L2 norm of each instance (over all but the first two dims), shaped to broadcast."""
    n = v.flatten(2).norm(dim=-1)
    return n.view(*n.shape, *([1] * (v.dim() - 2)))


def noise_bag(
    x: Tensor, mask: Tensor, n_noise: int, low: float, high: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """X_n: append ``n_noise`` instances drawn uniformly in [low, high] to every bag."""
    b = x.shape[0]
    noise = torch.rand((b, n_noise, *x.shape[2:]), generator=generator, device=x.device, dtype=x.dtype)
    noise = low + (high - low) * noise
    x_n = torch.cat([x, noise], dim=1)
    m_n = torch.cat([mask, torch.ones(b, n_noise, dtype=torch.bool, device=mask.device)], dim=1)
    return x_n, m_n


def n_noise_instances(n_real: int, fraction: float) -> int:
    """K_n − K = max(1, round(fraction·K)) (NOTES.md: paper silent; default fraction 0.2)."""
    return max(1, int(round(fraction * n_real)))


def perturbed_bag(
    bag_fn: BagFn,
    x: Tensor,
    mask: Tensor,
    clean_logits: Tensor,
    delta: float,
    mode: Literal["adversarial", "random"] = "adversarial",
    xi: float = 1e-6,
    power_iterations: int = 1,
    generator: torch.Generator | None = None,
) -> Tensor:
    """X_δ: each instance moved by a vector of norm δ (adversarial direction by default)."""
    d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    d = d * mask.view(*mask.shape, *([1] * (x.dim() - 2)))
    d = d / _instance_norm(d).clamp_min(1e-12)
    if mode == "adversarial":
        target = clean_logits.detach()
        for _ in range(power_iterations):
            d = (xi * d).requires_grad_(True)
            div = bernoulli_kl_with_logits(target, bag_fn(x.detach() + d, mask)).sum()
            (g,) = torch.autograd.grad(div, d)
            g = g * mask.view(*mask.shape, *([1] * (x.dim() - 2)))
            d = g / _instance_norm(g).clamp_min(1e-12)
        d = d.detach()
    elif mode != "random":
        raise ValueError(f"unknown perturbation mode {mode!r}; use 'adversarial' or 'random'")
    return x + delta * d


def random_subbag_mask(mask: Tensor, fraction: float, generator: torch.Generator | None = None) -> Tensor:
    """X̄ as a mask: keep round(fraction·K) (at least one) randomly chosen real instances per bag."""
    keys = torch.rand(mask.shape, generator=generator, device=mask.device)
    keys = keys.masked_fill(~mask, 2.0)  # padded positions sort last
    ranks = keys.argsort(dim=1).argsort(dim=1)
    k = (mask.sum(1).float() * fraction).round().clamp_min(1).long()
    return (ranks < k.unsqueeze(1)) & mask


def vat_mil_terms(
    encode: Encode,
    head: Head,
    x: Tensor,
    mask: Tensor,
    labels: Tensor,
    *,
    noise_fraction: float,
    data_range: tuple[float, float],
    delta: float,
    perturbation: Literal["adversarial", "random"],
    xi: float,
    power_iterations: int,
    subbag_fraction: float,
    subbag_realisations: int,
    use: dict[str, bool],
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """The four terms of D2L Eq. 3, each averaged over the bags of the batch (only those in ``use``).

    The model is given as ``encode`` (instances → embeddings) and ``head`` (embeddings →
    bag logit), so that each real instance is encoded once for the clean, noise and
    sub-bag terms. A model without that split passes ``encode = lambda x, m: x``.
    """
    h = encode(x, mask)
    logits = head(h, mask)
    target = torch.sigmoid(logits).detach()
    out: dict[str, Tensor] = {"classification": bce_with_targets(logits, labels).mean()}
    if use.get("noise", True):
        n_noise = n_noise_instances(int(mask.sum(1).min()), noise_fraction)
        x_n, m_n = noise_bag(x[:, :0], mask[:, :0], n_noise, data_range[0], data_range[1], generator)
        h_n = torch.cat([h, encode(x_n, m_n)], dim=1)
        out["noise"] = bce_with_targets(head(h_n, torch.cat([mask, m_n], dim=1)), target).mean()
    if use.get("perturbation", True):
        bag_fn = lambda xx, m: head(encode(xx, m), m)  # noqa: E731
        x_d = perturbed_bag(bag_fn, x, mask, logits, delta, perturbation, xi, power_iterations, generator)
        out["perturbation"] = bce_with_targets(bag_fn(x_d, mask), target).mean()
    if use.get("entropy", True):
        ents = []
        for _ in range(subbag_realisations):
            sub = random_subbag_mask(mask, subbag_fraction, generator)
            ents.append(bernoulli_entropy_with_logits(head(h, sub)).mean())
        out["entropy"] = torch.stack(ents).mean()
    return out

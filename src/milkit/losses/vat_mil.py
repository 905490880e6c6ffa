"""Virtual adversarial training for MIL: the regularisers of Distill-to-Label Eq. 3 (§III-B).

L(T) = λc·Lc(Y, T(X)) + λn·Ln(T(X), T(X_n)) + λδ·Lδ(T(X), T(X_δ)) + λe·Le(T(X̄))

- X_n: the bag plus K_n − K uncorrelated noise instances, uniform in the data range.
- X_δ: every instance moved inside a norm ball of radius δ; the direction is
  adversarial (one power-iteration step, Miyato et al.) or random; the radius is δ
  itself (``radius="sphere"``, VAT) or drawn uniformly in [0, δ] (``radius="ball"``,
  §III-B's "random perturbation within the norm ball"). The power step moves each
  instance by ξ·‖x_k‖ (ξ relative to the instance norm) and evaluates the divergence
  in float64, so that x + ξd differs from x in float32; an instance whose gradient is
  exactly zero keeps its random direction. For a scalar Bernoulli output the exact
  power-iteration limit is ±∇_x T(X) (the KL's Hessian is rank one), which one step
  already reaches up to O(ξ).
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

from milkit.data.graph import follow_mask
from milkit.losses.bernoulli import bce_with_targets, bernoulli_entropy_with_logits, bernoulli_kl_with_logits

BagFn = Callable[[Tensor, Tensor], Tensor]  # (x (B,N,...), mask (B,N)) -> bag logits (B,)
Encode = Callable[[Tensor, Tensor], Tensor]  # (x, mask) -> instance embeddings h (B,N,D)
#: (h, mask, adj) -> bag logits (B,); ``adj`` = per-bag graphs matching ``mask`` (or None)
Head = Callable[..., Tensor]


def _instance_norm(v: Tensor) -> Tensor:
    """L2 norm of each instance (over all but the first two dims), shaped to broadcast."""
    n = v.flatten(2).norm(dim=-1)
    return n.view(*n.shape, *([1] * (v.dim() - 2)))


def noise_bag(
    x: Tensor, mask: Tensor, n_noise: int | Tensor, low: float, high: float, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """X_n: append noise instances drawn uniformly in [low, high] to every bag.

    ``n_noise``: one count for every bag, or a (B,) tensor of per-bag counts (the appended
    block is as long as the largest; bag b's extra slots beyond its count are padding).
    """
    b = x.shape[0]
    counts = torch.as_tensor(n_noise, dtype=torch.long).reshape(-1).expand(b) if not isinstance(n_noise, Tensor) \
        else n_noise.to(torch.long).reshape(b)
    n_max = int(counts.max()) if b else 0
    noise = torch.rand((b, n_max, *x.shape[2:]), generator=generator, device=x.device, dtype=x.dtype)
    noise = low + (high - low) * noise
    m_noise = torch.arange(n_max, device=mask.device).unsqueeze(0) < counts.to(mask.device).unsqueeze(1)
    noise = noise * m_noise.view(b, n_max, *([1] * (x.dim() - 2))).to(x.dtype)
    x_n = torch.cat([x, noise], dim=1)
    m_n = torch.cat([mask, m_noise], dim=1)
    return x_n, m_n


def n_noise_instances(n_real: int | Tensor, fraction: float) -> int | Tensor:
    """K_n − K = max(1, round(fraction·K)) (NOTES.md: paper silent; default fraction 0.2); per bag for a tensor K."""
    if isinstance(n_real, Tensor):
        return (n_real.double() * fraction).round().clamp_min(1).long()
    return max(1, int(round(fraction * n_real)))


def perturbed_bag(
    bag_fn: BagFn,
    x: Tensor,
    mask: Tensor,
    clean_logits: Tensor,
    delta: float,
    mode: Literal["adversarial", "random"] = "adversarial",
    xi: float = 1e-3,
    power_iterations: int = 1,
    generator: torch.Generator | None = None,
    radius: Literal["sphere", "ball"] = "sphere",
) -> Tensor:
    """X_δ: each real instance moved by δ·d_k (``sphere``) or r_k·d_k, r_k ~ U(0, δ) (``ball``), ‖d_k‖ = 1.

    ``adversarial``: d from ``power_iterations`` power steps (Miyato et al.), each probing
    at x_k + ξ‖x_k‖·d_k (ξ relative; ξ absolute where ‖x_k‖ = 0) with the Bernoulli KL
    taken in float64; instances whose gradient is exactly zero keep their random d.
    ``random``: a uniformly random direction. Padded instances are never moved.
    """
    m = mask.view(*mask.shape, *([1] * (x.dim() - 2))).to(x.dtype)
    d = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * m
    d = d / _instance_norm(d).clamp_min(1e-12)
    if mode == "adversarial":
        target = clean_logits.detach().double()
        xn = _instance_norm(x.detach())
        step = xi * torch.where(xn > 0, xn, torch.ones_like(xn))
        for _ in range(power_iterations):
            r = (step * d).requires_grad_(True)
            div = bernoulli_kl_with_logits(target, bag_fn(x.detach() + r, mask).double()).sum()
            (g,) = torch.autograd.grad(div, r)
            g = g.to(x.dtype) * m
            gn = _instance_norm(g)
            d = torch.where(gn > 0, g / gn.clamp_min(1e-30), d)  # zero gradient: keep the random direction
        d = d.detach()
    elif mode != "random":
        raise ValueError(f"unknown perturbation mode {mode!r}; use 'adversarial' or 'random'")
    if radius == "sphere":
        return x + delta * d
    if radius != "ball":
        raise ValueError(f"unknown perturbation radius {radius!r}; use 'sphere' or 'ball'")
    r = torch.rand(mask.shape, generator=generator, device=x.device, dtype=x.dtype) * delta
    return x + r.view(*mask.shape, *([1] * (x.dim() - 2))) * d


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
    radius: Literal["sphere", "ball"] = "sphere",
    adj: list | None = None,
) -> dict[str, Tensor]:
    """The four terms of D2L Eq. 3, each averaged over the bags of the batch (only those in ``use``).

    The model is given as ``encode`` (instances → embeddings) and ``head`` (embeddings,
    mask, graphs → bag logit), so that each real instance is encoded once for the clean,
    noise and sub-bag terms. A model without that split passes ``encode = lambda x, m: x``.
    ``adj`` (per-bag graphs, Sm) follows every mask change: sub-bags get the induced
    subgraph, appended noise instances no edge (:func:`milkit.data.graph.follow_mask`).
    The noise count is per bag: K_n − K = max(1, round(noise_fraction·K_b)).
    """
    h = encode(x, mask)
    logits = head(h, mask, adj)
    target = torch.sigmoid(logits).detach()
    out: dict[str, Tensor] = {"classification": bce_with_targets(logits, labels).mean()}
    if use.get("noise", True):
        n_noise = n_noise_instances(mask.sum(1), noise_fraction)
        x_n, m_n = noise_bag(x[:, :0], mask[:, :0], n_noise, data_range[0], data_range[1], generator)
        h_n = torch.cat([h, encode(x_n, m_n)], dim=1)
        m_all = torch.cat([mask, m_n], dim=1)
        out["noise"] = bce_with_targets(head(h_n, m_all, follow_mask(adj, mask, m_all)), target).mean()
    if use.get("perturbation", True):
        bag_fn = lambda xx, m: head(encode(xx, m), m, adj)  # noqa: E731
        x_d = perturbed_bag(bag_fn, x, mask, logits, delta, perturbation, xi, power_iterations, generator, radius)
        out["perturbation"] = bce_with_targets(bag_fn(x_d, mask), target).mean()
    if use.get("entropy", True):
        ents = []
        for _ in range(subbag_realisations):
            sub = random_subbag_mask(mask, subbag_fraction, generator)
            ents.append(bernoulli_entropy_with_logits(head(h, sub, follow_mask(adj, mask, sub))).mean())
        out["entropy"] = torch.stack(ents).mean()
    return out

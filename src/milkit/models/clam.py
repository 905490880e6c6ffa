"""CLAM-SB and CLAM-MB (Lu et al., Nat. Biomed. Eng. 2021), binary case.

fc Linear(P→512)+ReLU, gated attention (hidden 256) with one branch (SB) or one per
class (MB), bag classifier, and per-class instance classifiers trained by the instance
clustering loss: in a bag of class c, the k most attended instances are pseudo-labelled
positive and the k least attended negative for classifier c (CE; k = 8). The total
CLAM loss is c₁·L_bag + (1−c₁)·L_inst with c₁ = 0.7; milkit's ``mil`` method adds
``aux_loss`` to the bag BCE, so ``aux_loss`` returns (1−c₁)/c₁·L_inst (same optimum,
loss scaled by 1/c₁).

Two classes (negative, positive): the bag logit is l₁ − l₀ (softmax over two classes
≡ sigmoid of the difference). Instance scores are the attention logits of the
positive class branch (CLAM-MB) or of the single branch (CLAM-SB).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from milkit.config import StrictModel
from milkit.data.bag import BagBatch
from milkit.models.base import MILModel, MILOutput, encode_instances, full_mask
from milkit.nn import dnnl, fused
from milkit.nn.attention import FastDropout, dropout_mask, masked_softmax


class _GatedBranches(nn.Module):
    """Gated attention a = W(drop(tanh(V h)) ⊙ drop(σ(U h))) with ``branches`` outputs
    (CLAM Attn_Net_Gated).

    Computed as one GEMM with [V; U] stacked, and one dropout multiplier on the product:
    two independent dropouts of keep probability q multiply to one of keep probability q²
    scaled by 1/q², the same distribution with half the random draws. Parameters keep
    CLAM's layout (``V.0``, ``U.0``, ``W``)."""

    def __init__(self, dim: int, hidden: int, branches: int, dropout: float):
        super().__init__()
        self.V = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), FastDropout(dropout))
        self.U = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), FastDropout(dropout))
        self.W = nn.Linear(hidden, branches)
        self.hidden, self.p = hidden, dropout

    def forward(self, h: Tensor) -> Tensor:
        v, u = self.V[0], self.U[0]
        vu = dnnl.dense(h, torch.cat([v.weight, u.weight]), torch.cat([v.bias, u.bias]))
        g = fused.tanh(vu[..., : self.hidden]) * torch.sigmoid(vu[..., self.hidden :])
        if self.training and self.p > 0:
            g = g * dropout_mask(g, 1.0 - (1.0 - self.p) ** 2)
        return self.W(g)  # (B, N, branches)


class _CLAM(MILModel):
    multi_branch = False

    class Config(StrictModel):
        name: str
        embed_dim: int = Field(512, ge=1, description="fc 1024→512 ('small'), CLAM code")
        attention_hidden: int = Field(256, ge=1, description="gated attention hidden 256, CLAM code")
        dropout: float = Field(0.25, ge=0, lt=1, description="CLAM code default with --drop_out")
        k_sample: int = Field(8, ge=1, description="B = 8 top/bottom instances, CLAM §Methods")
        bag_weight: float = Field(0.7, gt=0, le=1, description="c₁ = 0.7, CLAM §Methods")
        subtyping: bool = Field(False, description="also push out-of-class top-k to negative (CLAM: subtyping only)")

    def __init__(self, encoder: nn.Module, in_dim: int, embed_dim: int = 512, attention_hidden: int = 256,
                 dropout: float = 0.25, k_sample: int = 8, bag_weight: float = 0.7, subtyping: bool = False):
        super().__init__()
        self.encoder = encoder
        self.n_classes = 2
        self.k_sample, self.bag_weight, self.subtyping = k_sample, bag_weight, subtyping
        self.fc = nn.Sequential(dnnl.Linear(in_dim, embed_dim), nn.ReLU(), FastDropout(dropout))
        branches = self.n_classes if self.multi_branch else 1
        self.attention = _GatedBranches(embed_dim, attention_hidden, branches, dropout)
        if self.multi_branch:
            self.classifiers = nn.ModuleList(nn.Linear(embed_dim, 1) for _ in range(self.n_classes))
        else:
            self.classifier = nn.Linear(embed_dim, self.n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(embed_dim, 2) for _ in range(self.n_classes))

    @classmethod
    def from_config(cls, cfg, encoder: nn.Module, in_dim: int):
        return cls(encoder, in_dim, cfg.embed_dim, cfg.attention_hidden, cfg.dropout, cfg.k_sample,
                   cfg.bag_weight, cfg.subtyping)

    def forward(self, x: Tensor, mask: Tensor | None = None, adj: object | None = None) -> MILOutput:
        mask = full_mask(x, mask)
        h = self.fc(encode_instances(self.encoder, x, mask))
        s = self.attention(h).permute(0, 2, 1).masked_fill(~mask.unsqueeze(1), 0.0)  # (B, K, N)
        a = masked_softmax(s, mask.unsqueeze(1))
        m = torch.bmm(a, h)  # (B, K, D)
        if self.multi_branch:
            logits = torch.cat([c(m[:, i]) for i, c in enumerate(self.classifiers)], dim=-1)
        else:
            logits = self.classifier(m[:, 0])
        pos = 1 if self.multi_branch else 0
        return MILOutput(
            bag_logits=logits[:, 1] - logits[:, 0],
            instance_scores=s[:, pos],
            attention=a[:, pos],
            embeddings=h,
            extras={"attention_logits": s},
        )

    def aux_loss(self, out: MILOutput, batch: BagBatch) -> Tensor:
        """Instance clustering loss (CLAM §Methods), scaled by (1−c₁)/c₁ (see module docstring)."""
        s, h, mask = out.extras["attention_logits"], out.embeddings, batch.mask
        losses = []
        for b in range(s.shape[0]):
            real = torch.nonzero(mask[b]).squeeze(1)
            label = int(batch.labels[b] > 0.5)
            k = min(self.k_sample, real.numel() // 2)
            if k < 1:
                continue
            for c in range(self.n_classes):
                if c != label and not self.subtyping:
                    continue
                sc = s[b, c if self.multi_branch else 0, real]
                top = real[torch.topk(sc, k).indices]
                if c == label:
                    bottom = real[torch.topk(-sc, k).indices]
                    idx = torch.cat([top, bottom])
                    target = torch.cat([torch.ones(k), torch.zeros(k)]).long().to(h.device)
                else:  # out-of-class: the most attended instances are negatives for classifier c
                    idx, target = top, torch.zeros(k, dtype=torch.long, device=h.device)
                logits = self.instance_classifiers[c](h[b, idx])
                losses.append(F.cross_entropy(logits, target))
        if not losses:
            return s.sum() * 0.0
        return (1 - self.bag_weight) / self.bag_weight * torch.stack(losses).mean()


class CLAMSB(_CLAM):
    """CLAM single-branch."""

    multi_branch = False

    class Config(_CLAM.Config):
        name: Literal["clam_sb"] = "clam_sb"


class CLAMMB(_CLAM):
    """CLAM multi-branch (one attention branch and classifier per class)."""

    multi_branch = True

    class Config(_CLAM.Config):
        name: Literal["clam_mb"] = "clam_mb"

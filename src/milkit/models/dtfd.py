"""DTFD-MIL: double-tier feature distillation MIL (Zhang et al., CVPR 2022), binary case.

Tier 1: the bag's instances are split into M pseudo-bags (M = 4 in the DTFD code;
a random split while training as DTFD; at inference — where DTFD splits at random too —
the instances ranked by tier-1 attention are dealt round-robin, so that a result is
reproducible and does not depend on instance order). Each pseudo-bag goes through a shared dimension
reduction Linear(P→512)+ReLU, gated attention (hidden 128) and a classifier; its
pseudo-label is the bag label (tier-1 loss, ``aux_loss``). From every pseudo-bag a
feature is distilled (``distill``: "afs" — the attention-pooled pseudo-bag feature,
"maxmins" — the instances of largest and smallest instance probability, "maxs" —
the largest only). Tier 2: gated attention over the distilled features and a
classifier give the bag logit.

Instance scores: tier-1 instance logits a_k·wᵀh_k, the class-activation of each
instance in its pseudo-bag (DTFD "get_cam_1d", its instance probability before the
softmax over classes). Padding never changes a result (each bag is processed alone).
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
from milkit.nn import dnnl
from milkit.nn.attention import GatedAttentionScorer


class DTFDMIL(MILModel):
    class Config(StrictModel):
        name: Literal["dtfd"] = "dtfd"
        embed_dim: int = Field(512, ge=1, description="DTFD code: mDim 512")
        attention_hidden: int = Field(128, ge=1, description="DTFD code: Attention_Gated D = 128")
        n_pseudo_bags: int = Field(4, ge=1, description="DTFD code: numGroup = 4")
        distill: Literal["afs", "maxmins", "maxs"] = Field("afs", description="DTFD-MIL (AFS), paper's best variant")
        dropout: float = Field(0.0, ge=0, lt=1)

    def __init__(self, encoder: nn.Module, in_dim: int, embed_dim: int = 512, attention_hidden: int = 128,
                 n_pseudo_bags: int = 4, distill: str = "afs", dropout: float = 0.0):
        super().__init__()
        self.encoder = encoder
        self.reduce = nn.Sequential(dnnl.Linear(in_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.att1 = GatedAttentionScorer(embed_dim, attention_hidden)
        self.cls1 = nn.Linear(embed_dim, 1)
        self.att2 = GatedAttentionScorer(embed_dim, attention_hidden)
        self.cls2 = nn.Linear(embed_dim, 1)
        self.m, self.distill = n_pseudo_bags, distill

    @classmethod
    def from_config(cls, cfg: "DTFDMIL.Config", encoder: nn.Module, in_dim: int) -> "DTFDMIL":
        return cls(encoder, in_dim, cfg.embed_dim, cfg.attention_hidden, cfg.n_pseudo_bags, cfg.distill, cfg.dropout)

    def _groups(self, h: Tensor) -> list[Tensor]:
        """Random pseudo-bags while training (DTFD); at inference, instances ranked by their
        tier-1 attention logit are dealt round-robin (deterministic and order-free)."""
        n = h.shape[0]
        m = min(self.m, n)
        if self.training:
            return list(torch.tensor_split(torch.randperm(n, device=h.device), m))
        with torch.no_grad():
            order = torch.sort(self.att1(h), descending=True, stable=True).indices
        return [order[i::m] for i in range(m)]

    def _one_bag(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """h (n, D) → bag logit (), pseudo-bag logits (M,), instance scores (n,)."""
        scores = h.new_zeros(h.shape[0])
        pseudo, distilled = [], []
        for g in self._groups(h):
            hg = h[g]
            a = torch.softmax(self.att1(hg), dim=0)  # (n_g,)
            z = a @ hg
            pseudo.append(self.cls1(z).squeeze(-1))
            cam = a * (hg @ self.cls1.weight.squeeze(0))  # a_k wᵀh_k
            scores = scores.index_put((g,), cam)
            if self.distill == "afs":
                distilled.append(z.unsqueeze(0))
            else:
                top = hg[cam.argmax()].unsqueeze(0)
                distilled.append(top if self.distill == "maxs" else torch.cat([top, hg[cam.argmin()].unsqueeze(0)]))
        d = torch.cat(distilled)
        a2 = torch.softmax(self.att2(d), dim=0)
        return self.cls2(a2 @ d).squeeze(-1), torch.stack(pseudo), scores

    def forward(self, x: Tensor, mask: Tensor | None = None, adj: object | None = None) -> MILOutput:
        mask = full_mask(x, mask)
        h = self.reduce(encode_instances(self.encoder, x, mask))
        logits, pseudo = [], []
        scores = h.new_zeros(mask.shape)
        for b in range(h.shape[0]):
            real = torch.nonzero(mask[b]).squeeze(1)
            lb, pb, sb = self._one_bag(h[b, real])
            logits.append(lb)
            pseudo.append(pb)
            scores = scores.index_put((torch.full_like(real, b), real), sb)
        m = max(p.numel() for p in pseudo)
        pl = h.new_zeros(len(pseudo), m)
        pm = torch.zeros(len(pseudo), m, dtype=torch.bool, device=h.device)
        for b, p in enumerate(pseudo):
            pl[b, : p.numel()] = p
            pm[b, : p.numel()] = True
        return MILOutput(bag_logits=torch.stack(logits), instance_scores=scores, embeddings=h,
                         extras={"pseudo_logits": pl, "pseudo_mask": pm})

    def aux_loss(self, out: MILOutput, batch: BagBatch) -> Tensor:
        """Tier-1 loss: BCE of every pseudo-bag against its bag's label, averaged."""
        pl, pm = out.extras["pseudo_logits"], out.extras["pseudo_mask"]
        y = batch.labels.to(pl.dtype).unsqueeze(1).expand_as(pl)
        loss = F.binary_cross_entropy_with_logits(pl, y, reduction="none")
        return (loss * pm).sum() / pm.sum().clamp_min(1)

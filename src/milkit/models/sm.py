"""SmAP and SmTAP (Sm paper §4.3, App. B.2; NOTES.md "Sm").

SmAP: instance embedding Linear(P→512)+GELU, attention pooling with hidden 128 and tanh
(Eq. 1–2), and the smooth operator Sm (Eq. 7/8) at one of three places:

- ``early`` (default): on the embeddings before attention; the pooled vector uses the
  smoothed embeddings; spectral norm on both attention layers;
- ``mid``: on the hidden attention layer; spectral norm on the last layer w. ``sm_mid_tanh``
  says where: ``after`` (default) Sm(tanh(V h)) — §4.3 "before entering the last layer",
  i.e. on the input of w; ``before`` tanh(Sm(V h)) — torchmil's reading (logits differ ~0.07);
- ``late``: on the attention logits; no spectral norm.

SmTAP: the same embedding, two pre-LN transformer layers (512 dims, 8 heads, no
feed-forward, dropout 0) with Sm applied to the self-attention output before the
residual, then SmAP's pooling. Instance scores are the attention logits (after Sm for
``late``). Both need the bag graph: ``forward(x, mask, adj)`` with one
:class:`~milkit.data.graph.BagGraph` per bag; ``adj=None`` raises a ValueError.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm

from milkit.config import StrictModel
from milkit.models.base import MILModel, MILOutput, encode_instances, full_mask
from milkit.nn.attention import masked_softmax, weighted_sum
from milkit.nn.dnnl import LinearGELU, linear
from milkit.nn.fused import bias_tanh, tanh
from milkit.nn.smooth import BatchGraphs, SmoothOperator
from milkit.nn.transformer import TransformerEncoder

SmWhere = Literal["early", "mid", "late"]
SmMidTanh = Literal["after", "before"]


class SmSettings(StrictModel):
    """Sm's own settings, shared by SmAP and SmTAP."""

    alpha: float = Field(0.5, gt=0, lt=1, description="α initial value, NOTES.md Sm (0.5)")
    trainable_alpha: bool = Field(True, description="α trainable, NOTES.md Sm")
    sm_mode: Literal["approx", "exact"] = Field("approx", description="Eq. 8 (approx) or Eq. 7 (exact, small bags)")
    sm_steps: int = Field(10, ge=0, description="T of Eq. 8, App. B.3 (T = 10)")
    sm_path: Literal["auto", "sparse", "grid", "dense"] = Field("auto", description="how Â·G is computed")

    def build(self) -> SmoothOperator:
        return SmoothOperator(self.alpha, self.trainable_alpha, self.sm_mode, self.sm_steps, self.sm_path)


class SmPoolingSettings(SmSettings):
    """Sm's settings plus the SmAP pooling's, shared by SmAP and SmTAP (whose pooling is SmAP's, §4.3)."""

    sm_where: SmWhere = Field("early", description="the pooling's Sm: early, mid or late (NOTES.md Sm: default early)")
    embed_dim: int = Field(512, ge=1, description="Linear(P→512)+GELU, App. B.2")
    attention_hidden: int = Field(128, ge=1, description="attention hidden 128, tanh, App. B.2")
    spectral_norm: bool = Field(True, description="on the layers after Sm, NOTES.md Sm (paper §4.3)")
    sm_linear_rewrite: bool = Field(True, description="the pooling's early Sm computed on the 128-d hidden layer "
                                    "(same values)")
    sm_mid_tanh: SmMidTanh = Field(
        "after", description="mid Sm after tanh (§4.3: on the input of the last layer; default) or before (torchmil)")


class SmAttentionPool(nn.Module):
    """Attention pooling s_k = wᵀ tanh(V h_k) (Eq. 1–2) with Sm early, mid or late (§4.3)."""

    def __init__(self, dim: int, hidden: int, where: SmWhere, sm: SmoothOperator, use_spectral_norm: bool = True,
                 linear_rewrite: bool = True, mid_tanh: SmMidTanh = "after"):
        super().__init__()
        self.linear_rewrite = linear_rewrite
        if mid_tanh not in ("after", "before"):
            raise ValueError(f"sm_mid_tanh must be after or before, got {mid_tanh!r}")
        self.mid_tanh = mid_tanh
        if where not in ("early", "mid", "late"):
            raise ValueError(f"sm_where must be early, mid or late, got {where!r}")
        self.where, self.sm = where, sm
        v, w = nn.Linear(dim, hidden), nn.Linear(hidden, 1)
        if use_spectral_norm and where == "early":  # NOTES.md Sm: the layers after Sm
            v, w = spectral_norm(v), spectral_norm(w)
        elif use_spectral_norm and where == "mid":
            w = spectral_norm(w)
        self.V, self.w = v, w

    def forward(self, h: Tensor, graphs: BatchGraphs, mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """→ pooled (B, D), weights (B, N), logits (B, N) (0 where padded), pooled-over embeddings.

        Early Sm with ``linear_rewrite``: Sm(U) = p(Â)U is linear in U and p(Â) is symmetric,
        so V·Sm(h) = Sm(hVᵀ) (+ bias) and Σ_k a_k Sm(h)_k = Σ_k Sm(a)_k h_k: the same values
        with Sm on the 128-d hidden layer and on a instead of on the 512-d embeddings
        (4× less work); the returned embeddings are then the unsmoothed ones.
        """
        if self.where == "early" and self.linear_rewrite:
            hv = linear(h, self.V.weight)  # GEMMs through oneDNN on CPU (milkit.nn.dnnl)
            t = bias_tanh(self.sm(hv, graphs, mask), self.V.bias)  # tanh(Sm(h Vᵀ) + b_V)
            s = self.w(t).squeeze(-1)
            if graphs.full:  # no padding: the masking below would change nothing
                a = torch.softmax(s, dim=-1)
            else:
                s = s.masked_fill(~mask, 0.0)
                a = masked_softmax(s, mask)
            z = weighted_sum(self.sm(a, graphs, mask), h)
            return z, a, s, h
        if self.where == "early":
            h = self.sm(h, graphs, mask)
        vh = linear(h, self.V.weight, self.V.bias)  # V h (+ b), GEMMs through oneDNN on CPU
        if self.where == "mid" and self.mid_tanh == "before":
            t = tanh(self.sm(vh, graphs, mask))  # torchmil: Sm on V h, then tanh
        else:
            t = tanh(vh)
            if self.where == "mid":
                t = self.sm(t, graphs, mask)  # §4.3: Sm on the input of the last layer w
        s = self.w(t).squeeze(-1)
        if self.where == "late":
            s = self.sm(s, graphs, mask)
        s = s.masked_fill(~mask, 0.0)
        a = masked_softmax(s, mask)
        z = weighted_sum(a, h)
        return z, a, s, h


def _embedding(in_dim: int, dim: int) -> nn.Module:
    """Instance embedding Linear(P→512)+GELU (App. B.2): one autograd node, GEMMs through oneDNN on
    CPU (:class:`milkit.nn.dnnl.LinearGELU`; the children and state dict of ``nn.Sequential``)."""
    return LinearGELU(in_dim, dim)


class SmAP(MILModel):
    """ABMIL + Sm (Sm paper §4.3, Fig. 3(b))."""

    class Config(SmPoolingSettings):
        name: Literal["smap"] = "smap"

    def __init__(
        self,
        encoder: nn.Module,
        in_dim: int,
        sm: SmoothOperator | None = None,
        sm_where: SmWhere = "early",
        embed_dim: int = 512,
        attention_hidden: int = 128,
        use_spectral_norm: bool = True,
        linear_rewrite: bool = True,
        mid_tanh: SmMidTanh = "after",
    ):
        super().__init__()
        self.encoder = encoder
        self.embed = _embedding(in_dim, embed_dim)
        self.pool = SmAttentionPool(embed_dim, attention_hidden, sm_where, sm or SmoothOperator(), use_spectral_norm,
                                    linear_rewrite, mid_tanh)
        self.classifier = nn.Linear(embed_dim, 1)

    @classmethod
    def from_config(cls, cfg: "SmAP.Config", encoder: nn.Module, in_dim: int) -> "SmAP":
        return cls(encoder, in_dim, cfg.build(), cfg.sm_where, cfg.embed_dim, cfg.attention_hidden, cfg.spectral_norm,
                   cfg.sm_linear_rewrite, cfg.sm_mid_tanh)

    def forward(self, x: Tensor, mask: Tensor | None = None, adj: object | None = None) -> MILOutput:
        mask = full_mask(x, mask)
        graphs = BatchGraphs(adj, mask)  # type: ignore[arg-type]
        h = self.embed(encode_instances(self.encoder, x, mask))
        if not graphs.full:
            h = h * mask.unsqueeze(-1)
        z, a, s, hp = self.pool(h, graphs, mask)
        return MILOutput(bag_logits=self.classifier(z).squeeze(-1), instance_scores=s, attention=a, embeddings=hp)


class SmTAP(MILModel):
    """Transformer (with Sm on the attention output) + SmAP pooling (Sm paper §4.3, Fig. 3(c))."""

    class Config(SmPoolingSettings):
        name: Literal["smtap"] = "smtap"
        layers: int = Field(2, ge=1, description="two transformer layers, App. B.2")
        heads: int = Field(8, ge=1, description="8 heads, App. B.2")
        ff_dim: int = Field(0, ge=0, description="no feed-forward, NOTES.md Sm")
        dropout: float = Field(0.0, ge=0, lt=1, description="0, NOTES.md Sm")

    def __init__(
        self,
        encoder: nn.Module,
        in_dim: int,
        settings: SmSettings | None = None,
        sm_where: SmWhere = "early",
        embed_dim: int = 512,
        attention_hidden: int = 128,
        layers: int = 2,
        heads: int = 8,
        ff_dim: int = 0,
        dropout: float = 0.0,
        use_spectral_norm: bool = True,
        linear_rewrite: bool = True,
        mid_tanh: SmMidTanh = "after",
    ):
        super().__init__()
        settings = settings or SmSettings()
        self.encoder = encoder
        self.embed = _embedding(in_dim, embed_dim)
        self.transformer = TransformerEncoder(embed_dim, heads, layers, ff_dim, dropout)
        self.layer_sm = nn.ModuleList(settings.build() for _ in range(layers))
        self.pool = SmAttentionPool(embed_dim, attention_hidden, sm_where, settings.build(), use_spectral_norm,
                                    linear_rewrite, mid_tanh)
        self.classifier = nn.Linear(embed_dim, 1)

    @classmethod
    def from_config(cls, cfg: "SmTAP.Config", encoder: nn.Module, in_dim: int) -> "SmTAP":
        settings = SmSettings(**{k: getattr(cfg, k) for k in SmSettings.model_fields})
        return cls(
            encoder, in_dim, settings, cfg.sm_where, cfg.embed_dim, cfg.attention_hidden,
            cfg.layers, cfg.heads, cfg.ff_dim, cfg.dropout, cfg.spectral_norm, cfg.sm_linear_rewrite, cfg.sm_mid_tanh,
        )

    def forward(self, x: Tensor, mask: Tensor | None = None, adj: object | None = None) -> MILOutput:
        mask = full_mask(x, mask)
        graphs = BatchGraphs(adj, mask)  # type: ignore[arg-type]
        h = self.embed(encode_instances(self.encoder, x, mask))
        if not graphs.full:
            h = h * mask.unsqueeze(-1)
        posts = [lambda t, sm=sm: sm(t, graphs, mask) for sm in self.layer_sm]
        h = self.transformer(h, mask, posts)
        z, a, s, hp = self.pool(h, graphs, mask)
        return MILOutput(bag_logits=self.classifier(z).squeeze(-1), instance_scores=s, attention=a, embeddings=hp)

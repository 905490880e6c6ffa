"""TransMIL (Shao et al., NeurIPS 2021): two Nyström-attention layers around a PPEG.

fc Linear(P→512)+ReLU; a class token; TransLayer (pre-LN, Nyström self-attention,
8 heads × 64, 256 landmarks, 6 Moore–Penrose iterations, depth-wise residual conv of
kernel 33 on the values, as the Nyströmformer); PPEG (the tokens folded onto a
⌈√N⌉×⌈√N⌉ square, padded by repeating the first tokens, plus depth-wise 7×7, 5×5 and
3×3 convolutions); a second TransLayer; LayerNorm; linear classifier on the class token.

Nyström attention (Xiong et al. 2021): landmarks q̃, k̃ are segment means of q and k;
softmax(QKᵀ)V ≈ softmax(Q k̃ᵀ) · pinv(softmax(q̃ k̃ᵀ)) · softmax(q̃ Kᵀ) V, with pinv by
the iterative Moore–Penrose scheme. Written here (no extra package).

Computed without the dead work (outputs equal to the plain equations within 1e-5,
tests/models/test_transmil_speed.py): q, k, v are made transposed (one GEMM W·xᵀ gives
per-head (d, n) blocks every product below reads without a copy); the landmarks are segment
means of the layer's input projected afterwards (the projection is linear, without bias);
the depth-wise convolutions (residual and PPEG) get their weight gradient as a forward
convolution with the output gradient as kernel (oneDNN's weight-gradient kernel took 2-10×
longer, and much longer with two threads on a busy CPU); and the last layer computes the
attention output of the class token only, the one row the classifier reads.

TransMIL depends on instance order (PPEG, landmarks), so it is not permutation
invariant. Each bag is processed alone on its real instances, so padding never changes
a result. Instance scores: the class token's (Nyström) attention to each instance in
the last layer, averaged over heads (the "attention values" the Sm paper scores).
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from milkit.config import StrictModel
from milkit.models.base import MILModel, MILOutput, encode_instances, full_mask
from milkit.nn import dnnl
from milkit.nn.attention import FastDropout


def moore_penrose_pinv(a: Tensor, iters: int = 6) -> Tensor:
    """Iterative pseudo-inverse of (…, m, m) softmax matrices (Nyströmformer Eq. 16)."""
    eye = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device)
    col = a.abs().sum(-1).amax(-1, keepdim=True).unsqueeze(-1)
    row = a.abs().sum(-2).amax(-1, keepdim=True).unsqueeze(-1)
    z = a.transpose(-1, -2) / (col * row)
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def segment_means(x: Tensor, m: int) -> Tensor:
    """Means of ``m`` contiguous, near-equal segments along dim -2 of x (…, n, d)."""
    n = x.shape[-2]
    seg = torch.div(torch.arange(n, device=x.device) * m, n, rounding_mode="floor")
    counts = torch.bincount(seg, minlength=m).to(x.dtype).clamp_min(1)
    out = x.new_zeros(*x.shape[:-2], m, x.shape[-1]).index_add_(-2, seg, x)
    return out / counts.unsqueeze(-1)


class _DepthwiseConv(torch.autograd.Function):
    """``F.conv2d(x, w, b, padding, groups=C)`` (stride 1, odd kernel, "same" padding) whose
    backward is two forward convolutions: ∂x = conv(g, flipped w), ∂w = conv(pad(x), g as kernel)."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int]) -> Tensor:  # noqa: D102
        ctx.save_for_backward(x, w)
        ctx.padding, ctx.has_bias = padding, b is not None
        return F.conv2d(x, w, b, padding=padding, groups=x.shape[1])

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        x, w = ctx.saved_tensors
        (ph, pw), (bsz, c) = ctx.padding, x.shape[:2]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = F.conv2d(g, w.flip(-2, -1), padding=(ph, pw), groups=c)
        if ctx.needs_input_grad[1]:  # Σ_b,h,w g[b,c,h,w] · x[b,c,h+i,w+j]: the batch as a group's input channels
            xp = F.pad(x, (pw, pw, ph, ph)).transpose(0, 1).reshape(1, c * bsz, x.shape[2] + 2 * ph, x.shape[3] + 2 * pw)
            gw = F.conv2d(xp, g.transpose(0, 1).reshape(c, bsz, *g.shape[2:]), groups=c).view_as(w)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = g.sum((0, 2, 3))
        return gx, gw, gb, None


def depthwise_conv(x: Tensor, w: Tensor, b: Tensor | None, padding: tuple[int, int]) -> Tensor:
    """Depth-wise "same" convolution of x (B, C, H, W) by w (C, 1, kh, kw) (see :class:`_DepthwiseConv`)."""
    return _DepthwiseConv.apply(x, w, b, padding)


class _MatMulNT(torch.autograd.Function):
    """a @ bᵀ for a (…, m, n), b (…, d, n) whose gradients keep the operands' own layouts:
    ∂a = g b (…, m, n) and ∂b = gᵀ a (…, d, n), both row-major (autograd's bmm with a transposed
    operand hands back a transposed gradient, and copying it back costs more than the product)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(a, b)
        return a @ b.transpose(-1, -2)

    @staticmethod
    def backward(ctx, g: Tensor):  # noqa: D102
        a, b = ctx.saved_tensors
        ga = g @ b if ctx.needs_input_grad[0] else None
        gb = g.transpose(-1, -2) @ a if ctx.needs_input_grad[1] else None
        return ga, gb


def _project_t(w: Tensor, x: Tensor) -> Tensor:
    """(w xᵀ) for w (k, dim), x (b, n, dim): (b, k, n), row-major, without a transposing copy
    (``dnnl.dense(w, x_i)`` = w x_iᵀ: oneDNN GEMMs on CPU float32, issue 15)."""
    if x.shape[0] == 1:
        return dnnl.dense(w, x[0]).unsqueeze(0)
    return torch.stack([dnnl.dense(w, xi) for xi in x])


class NystromAttention(nn.Module):
    """Multi-head Nyström self-attention on one sequence (1, n, dim)."""

    def __init__(self, dim: int = 512, heads: int = 8, dim_head: int = 64, landmarks: int = 256,
                 pinv_iters: int = 6, residual_kernel: int = 33, dropout: float = 0.1):
        super().__init__()
        self.heads, self.dim_head, self.landmarks, self.pinv_iters = heads, dim_head, landmarks, pinv_iters
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Sequential(dnnl.Linear(heads * dim_head, dim), FastDropout(dropout))
        self.res_conv = nn.Conv2d(heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0),
                                  groups=heads, bias=False)

    def forward(self, x: Tensor, return_cls_attention: bool = False,
                cls_only: bool = False) -> tuple[Tensor, Tensor | None]:
        """Attention output (b, n, dim) — or (b, 1, dim), the class token's row only, with
        ``cls_only`` — and, asked for, the class token's attention to every token (b, n)."""
        b, n, _ = x.shape
        h, d = self.heads, self.dim_head
        hd, scale = h * d, 1.0 / math.sqrt(d)
        w = self.to_qkv.weight  # (3·h·d, dim): rows q, k, v
        m = min(self.landmarks, n)
        # landmarks: segment means of q = x Wqᵀ are the segment means of x, projected (no bias)
        lm = dnnl.dense(segment_means(x, m), w[: 2 * hd])  # (b, m, 2·h·d)
        ql, kl = lm.view(b, m, 2, h, d).permute(2, 0, 3, 1, 4)  # (b, h, m, d) each
        ql = ql * scale
        kv = _project_t(w[hd:], x).view(b, 2, h, d, n)  # kᵀ, vᵀ: (b, h, d, n) each
        kt, vt = kv[:, 0], kv[:, 1]
        mid = moore_penrose_pinv(torch.softmax(ql @ kl.transpose(-1, -2), dim=-1), self.pinv_iters)
        f2 = torch.softmax(ql @ kt, dim=-1)  # (b, h, m, n)
        a = _MatMulNT.apply(f2, vt).transpose(-1, -2) @ mid.transpose(-1, -2)  # ((f2 v)ᵀ midᵀ): (b, h, d, m)
        klt = (kl * scale).transpose(-1, -2)  # (b, h, d, m)
        if cls_only:  # the class token (row 0) alone: its query, attention row and residual
            q0 = x[:, :1] @ w[:hd].t()  # (b, 1, h·d)
            f1 = torch.softmax(q0.view(b, 1, h, d).transpose(1, 2) @ klt, dim=-1)  # (b, h, 1, m)
            out = (f1 @ a.transpose(-1, -2)).squeeze(2)  # (b, h, d)
            r = self.res_conv.weight.shape[2] // 2  # conv over tokens 0…r of v (zero padding before 0)
            k0 = self.res_conv.weight[:, 0, r:, 0]  # taps at offsets 0…r: (h, r+1)
            span = min(r + 1, n)
            out = out + (vt[..., :span] * k0[:, None, :span]).sum(-1)
            out = self.to_out(out.reshape(b, 1, hd))
        else:
            qt = _project_t(w[:hd], x).view(b, h, d, n)
            f1t = torch.softmax(klt.transpose(-1, -2) @ qt, dim=-2)  # f1ᵀ: (b, h, m, n), softmax over m
            out_t = a @ f1t  # (f1 mid f2 v)ᵀ: (b, h, d, n)
            # the (k, 1) kernel of each head along the tokens, on vᵀ as h·d channels of length n
            wr = self.res_conv.weight.view(h, 1, 1, -1).repeat_interleave(d, 0)  # (h·d, 1, 1, k)
            res = depthwise_conv(vt.reshape(b, hd, 1, n), wr, None, (0, wr.shape[-1] // 2))
            out_t = out_t + res.view(b, h, d, n)
            out = self.to_out(out_t.reshape(b, hd, n).transpose(1, 2))
            f1 = f1t[..., :1].transpose(-1, -2) if return_cls_attention else None  # (b, h, 1, m)
        cls_attn = None
        if return_cls_attention:  # row 0 of the approximate attention matrix, mean over heads
            cls_attn = ((f1 @ mid) @ f2).squeeze(2).mean(1)  # (b, n)
        return out, cls_attn


class TransLayer(nn.Module):
    """x ← x + NystromAttention(LN(x)) (TransMIL TransLayer); ``cls_only``: row 0 alone."""

    def __init__(self, dim: int, heads: int, landmarks: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = NystromAttention(dim, heads, dim // heads, landmarks, dropout=dropout)

    def forward(self, x: Tensor, return_cls_attention: bool = False,
                cls_only: bool = False) -> tuple[Tensor, Tensor | None]:
        a, cls_attn = self.attn(self.norm(x), return_cls_attention, cls_only)
        return (x[:, :1] if cls_only else x) + a, cls_attn


class PPEG(nn.Module):
    """Pyramid position encoding generator: depth-wise 7×7 + 5×5 + 3×3 convs on the token square.

    x + conv₇(x) + conv₅(x) + conv₃(x) is computed as one depth-wise 7×7 convolution whose
    kernel is k₇ + pad(k₅) + pad(k₃) + δ (δ: 1 at the centre) and whose bias is b₇ + b₅ + b₃:
    the same linear map, one convolution instead of three; the three kernels stay the
    parameters (TransMIL's layout) and get their gradients through the sum.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(dim, dim, 7, 1, 3, groups=dim)
        self.proj1 = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim)
        self.proj2 = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim)

    def forward(self, x: Tensor, side: int) -> Tensor:
        b, _, c = x.shape
        cls, feat = x[:, :1], x[:, 1:].transpose(1, 2).reshape(b, c, side, side).contiguous()
        k = self.proj.weight + F.pad(self.proj1.weight, (1, 1, 1, 1)) + F.pad(self.proj2.weight, (2, 2, 2, 2))
        k = k + F.pad(torch.ones_like(self.proj2.weight[..., :1, :1]), (3, 3, 3, 3))  # + identity
        feat = depthwise_conv(feat, k, self.proj.bias + self.proj1.bias + self.proj2.bias, (3, 3))
        return torch.cat([cls, feat.flatten(2).transpose(1, 2)], dim=1)


class TransMIL(MILModel):
    #: PPEG and the Nyström landmarks depend on instance order (see module docstring)
    permutation_invariant: ClassVar[bool] = False

    class Config(StrictModel):
        name: Literal["transmil"] = "transmil"
        embed_dim: int = Field(512, ge=8, description="TransMIL code: 512")
        heads: int = Field(8, ge=1, description="TransMIL code: 8 heads × 64")
        landmarks: int = Field(256, ge=1, description="TransMIL code: dim // 2 = 256 landmarks")
        dropout: float = Field(0.1, ge=0, lt=1, description="TransMIL code: attention output dropout 0.1")

    def __init__(self, encoder: nn.Module, in_dim: int, embed_dim: int = 512, heads: int = 8,
                 landmarks: int = 256, dropout: float = 0.1):
        super().__init__()
        if embed_dim % heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by {heads} heads")
        self.encoder = encoder
        self.fc = nn.Sequential(dnnl.Linear(in_dim, embed_dim), nn.ReLU())
        self.cls_token = nn.Parameter(torch.randn(1, 1, embed_dim))
        self.layer1 = TransLayer(embed_dim, heads, landmarks, dropout)
        self.ppeg = PPEG(embed_dim)
        self.layer2 = TransLayer(embed_dim, heads, landmarks, dropout)
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, 1)

    @classmethod
    def from_config(cls, cfg: "TransMIL.Config", encoder: nn.Module, in_dim: int) -> "TransMIL":
        return cls(encoder, in_dim, cfg.embed_dim, cfg.heads, cfg.landmarks, cfg.dropout)

    def _one_bag(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """h (1, n, D) real instances → bag logit (1,), instance scores (1, n)."""
        n = h.shape[1]
        side = math.ceil(math.sqrt(n))
        extra = side * side - n
        # TransMIL squares the sequence by repeating its first tokens (one copy with the class token)
        reps = h[:, :extra] if extra <= n else h.repeat(1, math.ceil(extra / n), 1)[:, :extra]
        x = torch.cat([self.cls_token.expand(1, -1, -1).to(h.dtype), h, reps], dim=1)
        x, _ = self.layer1(x)
        x = self.ppeg(x, side)
        x, cls_attn = self.layer2(x, return_cls_attention=True, cls_only=True)  # the classifier reads row 0
        logit = self.classifier(self.norm(x[:, 0])).squeeze(-1)
        return logit, cls_attn[:, 1 : n + 1]

    def forward(self, x: Tensor, mask: Tensor | None = None, adj: object | None = None) -> MILOutput:
        mask = full_mask(x, mask)
        h = self.fc(encode_instances(self.encoder, x, mask))
        logits, scores = [], h.new_zeros(mask.shape)
        for b in range(h.shape[0]):
            real = torch.nonzero(mask[b]).squeeze(1)
            lb, sb = self._one_bag(h[b : b + 1, real])
            logits.append(lb)
            scores = scores.index_put((torch.full_like(real, b), real), sb[0])
        return MILOutput(bag_logits=torch.cat(logits), instance_scores=scores, embeddings=h)

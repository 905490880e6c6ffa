"""Pathology foundation models from the Hugging Face hub, through timm: ``milkit extract --encoder uni``.

Each preset is what its model card says to call: the timm ``hf-hub:`` id, the extra
``timm.create_model`` arguments the card gives (LayerScale ``init_values``, SwiGLU MLPs, register
tokens…), the patch embedding the card reads off the output, and the card's normalisation. The
weights are gated on the hub: accept the licence on the model's page, then log in
(``huggingface-cli login`` or ``HF_TOKEN``); timm downloads and caches them. ``--weights none``
builds the same architecture with random weights (its config still comes from the hub), and
``--weights FILE`` loads a downloaded state dict into it, every key required.

Feature sizes are those TRIDENT lists for the same models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from milkit.slide.extract import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class HubEncoder:
    """One preset: what ``timm.create_model`` gets and how a patch embedding is read off the output."""

    hub_id: str
    dim: int
    card: str
    #: extra ``create_model`` arguments; the strings ``"SwiGLUPacked"`` / ``"SiLU"`` name timm / torch layers
    kwargs: dict = field(default_factory=dict)
    #: ``pooled``: the model's own output; ``cls+mean``: [class token, mean of the patch tokens] (Virchow)
    embedding: Literal["pooled", "cls+mean"] = "pooled"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    input_size: int = 224


_UNI2_ARGS = {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
              "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
              "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True}

HUB_ENCODERS: dict[str, HubEncoder] = {
    "uni": HubEncoder("hf-hub:MahmoodLab/uni", 1024, "https://huggingface.co/MahmoodLab/UNI",
                      {"init_values": 1e-5, "dynamic_img_size": True}),
    "uni2-h": HubEncoder("hf-hub:MahmoodLab/UNI2-h", 1536, "https://huggingface.co/MahmoodLab/UNI2-h", _UNI2_ARGS),
    "virchow2": HubEncoder("hf-hub:paige-ai/Virchow2", 2560, "https://huggingface.co/paige-ai/Virchow2",
                           {"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}, embedding="cls+mean"),
    "h-optimus-0": HubEncoder("hf-hub:bioptimus/H-optimus-0", 1536, "https://huggingface.co/bioptimus/H-optimus-0",
                              {"init_values": 1e-5, "dynamic_img_size": False},
                              mean=(0.707223, 0.578729, 0.703617), std=(0.211883, 0.230117, 0.177517)),
    "gigapath": HubEncoder("hf-hub:prov-gigapath/prov-gigapath", 1536,
                           "https://huggingface.co/prov-gigapath/prov-gigapath"),
}


class ClassAndMeanTokens(nn.Module):
    """[class token, mean of the patch tokens] of a token-output ViT (Virchow's card: the register
    tokens between them, ``num_prefix_tokens`` in all, are left out)."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit
        self.prefix = int(getattr(vit, "num_prefix_tokens", 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        tokens = self.vit(x)
        return torch.cat([tokens[:, 0], tokens[:, self.prefix:].mean(1)], dim=-1)


def _resolve(kwargs: dict, timm) -> dict:
    names = {"SwiGLUPacked": lambda: timm.layers.SwiGLUPacked, "SiLU": lambda: torch.nn.SiLU}
    return {k: names[v]() if isinstance(v, str) and v in names else v for k, v in kwargs.items()}


def build_hub_model(name: str, pretrained: bool) -> tuple[nn.Module, HubEncoder]:
    """The preset's model (its hub weights when ``pretrained``) wrapped to return (B, dim) embeddings."""
    spec = HUB_ENCODERS[name]
    try:
        import timm
    except ImportError:
        raise ValueError(f"encoder {name!r} needs timm: pip install 'milkit[timm]'") from None
    try:
        vit = timm.create_model(spec.hub_id, pretrained=pretrained, **_resolve(spec.kwargs, timm))
    except Exception as err:  # noqa: BLE001 - network, licence gate, token: one line naming the model card
        detail = " ".join(str(err).split())[:200]
        raise ValueError(f"encoder {name!r}: could not load {spec.hub_id} ({type(err).__name__}: {detail}); "
                         f"accept the licence at {spec.card} and log in (huggingface-cli login or HF_TOKEN)") from None
    return (ClassAndMeanTokens(vit) if spec.embedding == "cls+mean" else vit), spec

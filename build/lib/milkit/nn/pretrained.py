"""Local pretrained weights for torchvision backbones (never downloaded in milkit's code paths)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from milkit.io import load_state_dict

_HEADS = ("fc.", "classifier.")


def load_torchvision_weights(net: nn.Module, path: str | Path) -> None:
    """Load a torchvision state dict from a local file (``weights_only``); the ImageNet
    classifier (``fc.``/``classifier.``) may be absent or is dropped. Errors name the file."""
    state = load_state_dict(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith(_HEADS)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(_HEADS)]
    if missing or unexpected:
        raise ValueError(
            f"{path}: not a torchvision {type(net).__name__} state dict "
            f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
        )

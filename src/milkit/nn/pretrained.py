"""ImageNet weights for torchvision backbones: from a local file, or downloaded by torchvision.

``pretrained_path`` in the IKD-MIL, Max-Min and baseline configs is one of

* ``null`` — random initialisation (CPU test configs);
* a path — a torchvision state dict on disk (``weights_only`` load; the ImageNet
  classifier ``fc.``/``classifier.`` may be absent or is dropped). The paper configs
  name such a file (both papers start from ImageNet weights): a missing file is a
  one-line error that names the option and says how to get it;
* ``imagenet`` — torchvision's ImageNet-1k weights, downloaded (needs internet) into
  torch's hub cache (``$TORCH_HOME``) with the hash checked, loaded ``weights_only``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from milkit.io import load_state_dict

_HEADS = ("fc.", "classifier.")
#: ``pretrained_path`` value that downloads torchvision's weights
IMAGENET = "imagenet"
#: torchvision weight enums of the backbones milkit builds
TORCHVISION_WEIGHTS = {"vgg16": "VGG16_Weights.IMAGENET1K_V1", "resnet18": "ResNet18_Weights.IMAGENET1K_V1",
                       "resnet50": "ResNet50_Weights.IMAGENET1K_V1"}


def imagenet_state_dict(arch: str, option: str = "method.pretrained_path: imagenet",
                        instead: str = "set pretrained_path to its path") -> dict:
    """torchvision's ImageNet state dict of ``arch`` (downloaded once, then cached in torch's hub folder).
    A failed download is one line naming ``option``, the URL, the cache folder and what to do ``instead``."""
    import torchvision

    if arch not in TORCHVISION_WEIGHTS:
        raise ValueError(f"{option}: no torchvision ImageNet weights for backbone {arch!r}")
    url = torchvision.models.get_weight(TORCHVISION_WEIGHTS[arch]).url
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, check_hash=True,
                                                  weights_only=True)
    except Exception as err:  # noqa: BLE001 - no network, proxy, bad hash: one line naming the option
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise OSError(
            f"{option}: cannot download torchvision's {arch} weights from {url} ({reason}); download the file "
            f"elsewhere and {instead}, or copy it into {cache}"
        ) from None


def _load_into(net: nn.Module, state: object, source: str) -> None:
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{source}: not a state dict")
    state = {k: v for k, v in state.items() if not k.startswith(_HEADS)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(_HEADS)]
    if missing or unexpected:
        raise ValueError(
            f"{source}: not a torchvision {type(net).__name__} state dict "
            f"(missing {missing[:3]}, unexpected {list(unexpected)[:3]})"
        )


def check_pretrained_spec(spec: str | Path | None) -> None:
    """Refuse a ``pretrained_path`` naming a file that does not exist (``workflow.train_run`` calls
    this before it writes the run directory; the model build would fail the same way later)."""
    if spec is None or spec == "" or str(spec) == IMAGENET:
        return
    p = Path(spec)
    if not p.is_file():
        raise FileNotFoundError(
            f"method.pretrained_path: {p} does not exist; the paper starts from ImageNet weights: save torchvision's "
            f"state dict there, or set pretrained_path: {IMAGENET} to download it, or null for random weights"
        )


def load_torchvision_weights(net: nn.Module, path: str | Path) -> None:
    """Load a torchvision state dict from a local file (``weights_only``). Errors name the file."""
    check_pretrained_spec(path)
    _load_into(net, load_state_dict(Path(path)), str(path))


def load_pretrained(net: nn.Module, arch: str, spec: str | Path | None) -> None:
    """Apply ``pretrained_path`` (None, a file, or ``"imagenet"``) to a torchvision ``arch`` net."""
    if spec is None or spec == "":
        return
    if str(spec) == IMAGENET:
        _load_into(net, imagenet_state_dict(arch), f"torchvision {arch} ImageNet weights")
    else:
        load_torchvision_weights(net, spec)

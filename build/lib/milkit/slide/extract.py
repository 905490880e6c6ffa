"""Patch features: ``milkit extract DIR --encoder NAME`` adds ``features`` (N, D) to each h5.

Encoders: torchvision ResNet-18 (512-d, after global pooling), ResNet-50 truncated
after layer 3 (1024-d, as CLAM does), any ``timm:<name>`` model when timm is
installed, and ``tiny_cnn`` (a small random-weight CNN for tests and smoke runs).
ImageNet normalisation. Patches are decoded in DataLoader workers (each opens its own
OpenSlide handle) and normalised on the device in batches.

Resumable and safe: a slide whose h5 already holds features from the same encoder is
skipped; each slide is written to a temporary file and renamed, so an interrupted
run never leaves a half-written h5. Under torchrun (RANK/WORLD_SIZE) or SLURM
(SLURM_PROCID/SLURM_NTASKS) each rank takes its own share of the slides.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from milkit import io
from milkit.slide.reader import SLIDE_EXTENSIONS, Slide, slide_id

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODERS = ("tiny_cnn", "resnet18", "resnet50", "resnet50_trunc")


# -- encoders -------------------------------------------------------------------------
@dataclass
class PatchEncoder:
    """A feature extractor and how to feed it."""

    model: nn.Module
    name: str  # what goes into the h5 ``encoder`` attr (name + weights)
    dim: int
    input_size: int | None  # patches are resized to this (None: as read)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class TinyCNN(nn.Module):
    """Three strided convolutions and global average pooling (random weights, seeded):
    enough to tell colour and texture apart in tests; not a pathology encoder."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 5, stride=2, padding=2),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, dim, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        for m in self.modules():  # He init keeps the activations O(1) through the ReLUs
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(x)


class ResNetTrunc(nn.Module):
    """ResNet-50 up to layer 3, then global average pooling (CLAM's ``resnet50_trunc``)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        r = resnet
        self.body = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.flatten(self.pool(self.body(x)), 1)


def _weights_tag(weights: str) -> str:
    if weights in ("imagenet", "none"):
        return weights
    p = Path(weights)
    h = hashlib.sha256(p.read_bytes()).hexdigest()[:12]
    return f"{p.name}@{h}"


def _load_weights(model: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: encoder weights file does not exist")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{path}: reading .safetensors needs the 'safetensors' package") from None
        state = load_file(str(path))
    else:
        state = io.load_state_dict(path)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict of tensors")
    state = {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = set(model.state_dict())
    if len(missing) == len(own):
        raise ValueError(f"{path}: none of its keys match the encoder (first keys: {list(state)[:3]})")
    if missing:
        log.warning("%s: %d encoder weights missing (first: %s)", path, len(missing), missing[:3])


def build_patch_encoder(name: str, weights: str = "imagenet", seed: int = 0) -> PatchEncoder:
    """``name`` in :data:`ENCODERS` or ``timm:<model>``; ``weights`` is ``imagenet``
    (downloaded by torchvision/timm when not cached), ``none`` (random, seeded) or a file."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny_cnn":
            if weights == "imagenet":
                weights = "none"  # no pretrained tiny CNN exists
            model: nn.Module = TinyCNN()
            input_size, mean, std = None, IMAGENET_MEAN, IMAGENET_STD
        elif name == "resnet18":
            import torchvision

            tv = torchvision.models.ResNet18_Weights.IMAGENET1K_V1 if weights == "imagenet" else None
            model = torchvision.models.resnet18(weights=tv)
            model.fc = nn.Identity()
            input_size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
        elif name in ("resnet50", "resnet50_trunc"):
            import torchvision

            tv = torchvision.models.ResNet50_Weights.IMAGENET1K_V1 if weights == "imagenet" else None
            model = ResNetTrunc(torchvision.models.resnet50(weights=tv))
            name = "resnet50_trunc"
            input_size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
        elif name.startswith("timm:"):
            try:
                import timm
            except ImportError:
                raise ValueError(f"encoder {name!r} needs timm: pip install timm") from None
            model = timm.create_model(name[5:], pretrained=weights == "imagenet", num_classes=0)
            cfg = timm.data.resolve_data_config({}, model=model)
            input_size = int(cfg["input_size"][-1])
            mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        else:
            raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS)}, timm:<model>")
    if weights not in ("imagenet", "none"):
        _load_weights(model, Path(weights))
    model.eval()
    with torch.no_grad():
        probe = input_size if name.startswith("timm:") else 64  # CNNs pool globally: any size gives D
        dim = int(model(torch.zeros(1, 3, probe or 64, probe or 64)).shape[-1])
    return PatchEncoder(model, f"{name}:{_weights_tag(weights)}", dim, input_size, mean, std)  # type: ignore[arg-type]


# -- reading patches -------------------------------------------------------------------
class PatchDataset(Dataset):
    """Patches of one slide as uint8 (3, S, S) tensors; the slide is opened lazily in each worker."""

    def __init__(self, slide_path: Path, coords: np.ndarray, size_level0: int, patch_size: int,
                 input_size: int | None, mpp: float | None = None):
        self.slide_path = Path(slide_path)
        self.coords = coords
        self.size_level0 = int(size_level0)
        self.out = int(input_size or patch_size)
        self.patch_size = int(patch_size)
        self.mpp = mpp
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self._slide is None:
            self._slide = Slide(self.slide_path, self.mpp)
        x, y = self.coords[i]
        arr = self._slide.read_patch((int(x), int(y)), self.size_level0, self.patch_size)
        if self.out != self.patch_size:
            from PIL import Image

            arr = np.asarray(Image.fromarray(arr).resize((self.out, self.out), Image.BILINEAR))
        return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float, scaled to [0, 1] and standardised per channel."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


@torch.no_grad()
def encode_patches(enc: PatchEncoder, ds: PatchDataset, device: torch.device, batch_size: int = 64,
                   num_workers: int = 2, precision: str = "fp32", progress: bool = False) -> np.ndarray:
    """Features (N, D) float32 for every patch of ``ds``, in order."""
    from milkit.slide.progress import track

    if len(ds) == 0:
        return np.zeros((0, enc.dim), np.float32)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    model = enc.model.to(device)
    out = []
    amp = precision in ("bf16", "fp16") and device.type == "cuda"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    n_batches = (len(ds) + batch_size - 1) // batch_size
    for xb in track(loader, f"{ds.slide_path.name}", enabled=progress, total=n_batches):
        xb = normalise(xb.to(device, non_blocking=True), enc.mean, enc.std)
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            f = model(xb)
        out.append(f.float().cpu())
    return torch.cat(out).numpy().astype(np.float32)


# -- h5 in, h5 out --------------------------------------------------------------------
@dataclass
class PatchFile:
    """What extraction needs from a tiling h5."""

    path: Path
    coords: np.ndarray
    patch_size: int
    size_level0: int | None  # None: from CLAM's patch_level once the slide is open
    patch_level: int | None
    slide_path: Path | None
    mpp: float | None


def read_patch_file(path: Path) -> PatchFile:
    """Coords and patch geometry of a milkit/TRIDENT or CLAM patching h5 (named errors)."""
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise ValueError(f"{path}: no 'coords' dataset (not a patch/feature h5)")
            d = f["coords"]
            coords = np.asarray(d[()], dtype=np.int64)
            if coords.ndim != 2 or (coords.size and coords.shape[1] != 2):
                raise ValueError(f"{path}: 'coords' has shape {coords.shape}, expected (N, 2)")
            coords = coords.reshape(-1, 2)
            a = {**dict(f.attrs), **dict(d.attrs)}
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from None

    def num(k):
        v = a.get(k)
        if isinstance(v, bytes):
            v = v.decode()
        if v is None or (isinstance(v, str) and v in ("None", "")):
            return None
        return float(np.asarray(v).ravel()[0])

    if num("patch_size") is None:
        raise ValueError(f"{path}: 'coords' has no patch_size attribute; tile with 'milkit tile' first")
    sp = a.get("slide_path")
    return PatchFile(
        path=path,
        coords=coords,
        patch_size=int(num("patch_size")),  # type: ignore[arg-type]
        size_level0=None if num("patch_size_level0") is None else int(num("patch_size_level0")),  # type: ignore[arg-type]
        patch_level=None if num("patch_level") is None else int(num("patch_level")),  # type: ignore[arg-type]
        slide_path=Path(sp.decode() if isinstance(sp, bytes) else sp) if sp not in (None, "None") else None,
        mpp=num("mpp"),
    )


def has_features(path: Path, encoder_name: str) -> bool:
    """True when ``path`` holds complete features (one row per coord) from ``encoder_name``."""
    if not path.is_file():
        return False
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                return False
            enc = f["features"].attrs.get("encoder")
            enc = enc.decode() if isinstance(enc, bytes) else enc
            return enc == encoder_name and f["features"].shape[0] == f["coords"].shape[0]
    except OSError:
        return False


def write_features(src: Path, dst: Path, features: np.ndarray, encoder_name: str) -> None:
    """Copy ``src`` (coords + attrs) to a temp file beside ``dst``, add ``features``, rename."""

    def write(tmp: Path) -> None:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "a") as f:
            if "features" in f:
                del f["features"]
            d = f.create_dataset("features", data=features.astype(np.float32))
            d.attrs["encoder"] = encoder_name
            f["coords"].attrs["encoder"] = encoder_name
            f.attrs["encoder"] = encoder_name

    io.write_with(dst, write)


def find_slide(pf: PatchFile, slides_dir: Path | None) -> Path:
    """The slide a patch file came from: ``slides_dir/<id>.*`` first, then the recorded path."""
    sid = pf.path.stem.removesuffix("_patches")
    if slides_dir is not None:
        for q in sorted(Path(slides_dir).iterdir()):
            if q.is_file() and q.suffix.lower() in SLIDE_EXTENSIONS and slide_id(q) == sid:
                return q
    if pf.slide_path is not None and pf.slide_path.is_file():
        return pf.slide_path
    raise FileNotFoundError(
        f"{pf.path}: cannot find the slide {sid!r}"
        + (f" in {slides_dir}" if slides_dir else f" (recorded path {pf.slide_path})")
        + "; pass --slides DIR"
    )


# -- sharding across ranks --------------------------------------------------------------
def dist_env(environ: dict[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM
    (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID); (0, 1, 0) for a plain run."""
    env = os.environ if environ is None else environ
    for r, w, lr in (("RANK", "WORLD_SIZE", "LOCAL_RANK"), ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID")):
        if r in env and w in env:
            rank, world = int(env[r]), int(env[w])
            if not 0 <= rank < world:
                raise ValueError(f"{r}={rank} is not in [0, {w}={world})")
            return rank, world, int(env.get(lr, rank))
    return 0, 1, 0


def shard_assignment(sizes: list[int], world_size: int) -> list[int]:
    """Rank of each item: longest first to the least-loaded rank (ties → lowest rank).
    Deterministic, so every rank computes the same assignment from the same file list."""
    if world_size < 1:
        raise ValueError(f"world size must be ≥ 1, got {world_size}")
    load = [0] * world_size
    ranks = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        ranks[i] = r
        load[r] += sizes[i]
    return ranks


def pick_device(devices: str, local_rank: int) -> torch.device:
    """``auto`` (GPU local_rank mod count when CUDA is there, else CPU), ``cpu``, or GPU ids ``0,1``."""
    devices = devices.strip().lower()
    if devices == "cpu" or (devices == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if devices == "auto":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if not torch.cuda.is_available():
        raise ValueError(f"--devices {devices} asks for GPUs but CUDA is not available")
    try:
        ids = [int(d) for d in devices.split(",") if d.strip()]
    except ValueError:
        raise ValueError(f"--devices must be auto, cpu or GPU ids like 0,1 (got {devices!r})") from None
    return torch.device("cuda", ids[local_rank % len(ids)])


# -- the command -----------------------------------------------------------------------
def extract_dir(
    tiles_dir: Path,
    encoder: str,
    weights: str = "imagenet",
    out_dir: Path | None = None,
    slides_dir: Path | None = None,
    batch_size: int = 64,
    num_workers: int = 2,
    devices: str = "auto",
    precision: str = "fp32",
    mpp: float | None = None,
    progress: bool = True,
    environ: dict[str, str] | None = None,
) -> dict:
    """Extract features for this rank's share of ``tiles_dir/*.h5``; returns a summary.

    Slides are sharded on the full sorted file list before finished ones are skipped,
    so ranks never disagree about who does what.
    """
    tiles_dir = Path(tiles_dir)
    if not tiles_dir.is_dir():
        raise FileNotFoundError(f"{tiles_dir}: tiles folder does not exist")
    files = sorted(p for p in tiles_dir.glob("*.h5") if not p.name.startswith("."))
    if not files:
        raise ValueError(f"{tiles_dir}: no .h5 patch files (run 'milkit tile' first)")
    patch_files = [read_patch_file(p) for p in files]
    rank, world, local_rank = dist_env(environ)
    ranks = shard_assignment([len(pf.coords) for pf in patch_files], world)
    mine = [pf for pf, r in zip(patch_files, ranks) if r == rank]
    enc = build_patch_encoder(encoder, weights)
    device = pick_device(devices, local_rank)
    out_dir = Path(out_dir) if out_dir is not None else tiles_dir
    done, skipped, n_patches = [], [], 0
    for pf in mine:
        dst = out_dir / pf.path.name
        if has_features(dst, enc.name):
            skipped.append(dst)
            continue
        slide_path = find_slide(pf, slides_dir)
        size0 = pf.size_level0
        if size0 is None:  # CLAM patching: patch_size is at patch_level
            with Slide(slide_path, mpp) as s:
                size0 = int(round(pf.patch_size * s.level_downsamples[pf.patch_level or 0]))
        ds = PatchDataset(slide_path, pf.coords, size0, pf.patch_size, enc.input_size, mpp)
        feats = encode_patches(enc, ds, device, batch_size, num_workers, precision, progress)
        write_features(pf.path, dst, feats, enc.name)
        done.append(dst)
        n_patches += len(pf.coords)
    return {"rank": rank, "world_size": world, "device": str(device), "encoder": enc.name, "dim": enc.dim,
            "written": [str(p) for p in done], "skipped": [str(p) for p in skipped], "patches": n_patches}

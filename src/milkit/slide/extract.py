"""Patch features: ``milkit extract DIR --encoder NAME`` adds ``features`` (N, D) to each h5.

Encoders: torchvision ResNet-18 (512-d, after global pooling), ResNet-50 truncated
after layer 3 (1024-d, as CLAM does), any ``timm:<name>`` model when timm is
installed, and ``tiny_cnn`` (a small random-weight CNN for tests and smoke runs).
ImageNet normalisation. Whole batches are decoded in DataLoader workers (each opens its
own OpenSlide handle; a row of adjacent patches is one region read), pinned and copied
non-blocking, normalised on the device and encoded under ``inference_mode`` in
channels_last (bf16/fp16 autocast on a GPU when asked; float32 on the CPU, in forward
chunks of 8 patches per thread).

Resumable and safe: a slide whose h5 already holds features from the same encoder is
skipped; each slide is written to a temporary file and renamed, so an interrupted
run never leaves a half-written h5, and the stale temporary files such a run left are
removed by the next. An unreadable slide is recorded in ``failed.csv`` (slide, reason),
the others go on, and the run ends with an error. Extracting in place keeps the h5's
file mode. Under torchrun (RANK/WORLD_SIZE) or SLURM (SLURM_PROCID/SLURM_NTASKS) each
rank takes its own share of the slides.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io as _stdio
import logging
import os
import re
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from milkit import io
from milkit.slide.reader import Slide, find_slides, slide_id

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


def _load_weights(model: nn.Module, path: Path, strict: bool = False) -> None:
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
    if strict:  # a foundation model's card gives its architecture: a key that does not fit is an error
        target = getattr(model, "vit", model)  # ClassAndMeanTokens wraps the ViT
        missing, unexpected = target.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path}: does not fit the encoder ({len(missing)} missing keys, first {missing[:2]}; "
                             f"{len(unexpected)} unexpected, first {unexpected[:2]})")
        return
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = set(model.state_dict())
    if len(missing) == len(own):
        raise ValueError(f"{path}: none of its keys match the encoder (first keys: {list(state)[:3]})")
    if missing:
        log.warning("%s: %d encoder weights missing (first: %s)", path, len(missing), missing[:3])


def _hub_names() -> tuple[str, ...]:
    from milkit.slide.hub_encoders import HUB_ENCODERS

    return tuple(HUB_ENCODERS)


def _torchvision_imagenet(arch: str) -> dict:
    """torchvision's ImageNet weights of ``arch``; offline, one line saying what to pass instead."""
    from milkit.nn.pretrained import imagenet_state_dict

    return imagenet_state_dict(arch, "--weights imagenet", "pass --weights PATH")


def build_patch_encoder(name: str, weights: str = "imagenet", seed: int = 0) -> PatchEncoder:
    """``name`` in :data:`ENCODERS`, a pathology foundation model of
    :data:`milkit.slide.hub_encoders.HUB_ENCODERS` (``uni``, ``virchow2``, …) or ``timm:<model>``;
    ``weights`` is ``imagenet`` (the pretrained weights: torchvision's / timm's, or the foundation
    model's own from the Hugging Face hub; downloaded when not cached), ``none`` (random, seeded) or a
    file (every key must match for a foundation model)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if name == "tiny_cnn":
            if weights == "imagenet":
                weights = "none"  # no pretrained tiny CNN exists
            model: nn.Module = TinyCNN()
            input_size, mean, std = None, IMAGENET_MEAN, IMAGENET_STD
        elif name == "resnet18":
            import torchvision

            model = torchvision.models.resnet18(weights=None)
            if weights == "imagenet":
                model.load_state_dict(_torchvision_imagenet("resnet18"))
            model.fc = nn.Identity()
            input_size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
        elif name in ("resnet50", "resnet50_trunc"):
            import torchvision

            resnet = torchvision.models.resnet50(weights=None)
            if weights == "imagenet":
                resnet.load_state_dict(_torchvision_imagenet("resnet50"))
            model = ResNetTrunc(resnet)
            name = "resnet50_trunc"
            input_size, mean, std = 224, IMAGENET_MEAN, IMAGENET_STD
        elif name in _hub_names():
            from milkit.slide.hub_encoders import build_hub_model

            model, spec = build_hub_model(name, pretrained=weights == "imagenet")
            input_size, mean, std = spec.input_size, spec.mean, spec.std
        elif name.startswith("timm:"):
            try:
                import timm
            except ImportError:
                raise ValueError(f"encoder {name!r} needs timm: pip install timm") from None
            try:
                model = timm.create_model(name[5:], pretrained=weights == "imagenet", num_classes=0)
            except Exception as err:  # noqa: BLE001 - unknown model, no network: one line naming the encoder
                detail = " ".join(str(err).split())[:200]
                raise ValueError(f"encoder {name!r}: timm could not create it ({type(err).__name__}: {detail}); "
                                 "without internet pass --weights PATH or --weights none") from None
            cfg = timm.data.resolve_data_config({}, model=model)
            input_size = int(cfg["input_size"][-1])
            mean, std = tuple(cfg["mean"]), tuple(cfg["std"])
        else:
            raise ValueError(f"unknown encoder {name!r}; known: {', '.join(ENCODERS + _hub_names())}, timm:<model>")
    if weights not in ("imagenet", "none"):
        _load_weights(model, Path(weights), strict=name in _hub_names())
    model.eval()
    with torch.no_grad():
        probe = input_size if name.startswith("timm:") or name in _hub_names() else 64  # CNNs pool globally
        dim = int(model(torch.zeros(1, 3, probe or 64, probe or 64)).shape[-1])
    tag = "hub" if weights == "imagenet" and name in _hub_names() else _weights_tag(weights)
    return PatchEncoder(model, f"{name}:{tag}", dim, input_size, mean, std)  # type: ignore[arg-type]


# -- reading patches -------------------------------------------------------------------
def _same_grid(d: float, lds: float) -> bool:
    """True when a level-0 offset ``d`` is a whole number of pixels at downsample ``lds``."""
    q = d / lds
    return abs(q - round(q)) < 1e-9


class PatchDataset(Dataset):
    """Patches of one slide as uint8 (3, S, S) tensors; the slide is opened lazily in each worker.

    :meth:`read_batch` reads a batch at once: patches on one row whose level-0 offsets
    are whole pixels at the read level are cut from one region read (each region of the
    slide is read and decoded once per batch), giving exactly the pixels of one read per patch.
    """

    def __init__(self, slide_path: Path, coords: np.ndarray, size_level0: int, patch_size: int,
                 input_size: int | None, mpp: float | None = None):
        self.slide_path = Path(slide_path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
        self.size_level0 = int(size_level0)
        self.out = int(input_size or patch_size)
        self.patch_size = int(patch_size)
        self.mpp = mpp
        self._slide: Slide | None = None

    def __len__(self) -> int:
        return len(self.coords)

    def __getstate__(self) -> dict:  # an open OpenSlide handle never crosses into a worker
        return {**self.__dict__, "_slide": None}

    def _open(self) -> Slide:
        if self._slide is None:
            self._slide = Slide(self.slide_path, self.mpp)
        return self._slide

    def _finish(self, arr: np.ndarray, read: int) -> np.ndarray:
        """The read pixels → ``patch_size`` (as :meth:`Slide.read_patch`) → ``input_size``."""
        if read != self.patch_size or self.out != self.patch_size:
            from PIL import Image

            im = Image.fromarray(arr)
            if read != self.patch_size:
                im = im.resize((self.patch_size, self.patch_size), Image.BILINEAR)
            if self.out != self.patch_size:
                im = im.resize((self.out, self.out), Image.BILINEAR)
            arr = np.asarray(im)
        return arr

    def __getitem__(self, i: int) -> torch.Tensor:
        x, y = self.coords[i]
        arr = self._open().read_patch((int(x), int(y)), self.size_level0, self.patch_size)
        arr = self._finish(arr, self.patch_size)
        return torch.from_numpy(np.array(arr, dtype=np.uint8, copy=True)).permute(2, 0, 1)

    def read_batch(self, idx: np.ndarray) -> np.ndarray:
        """uint8 (b, S, S, 3) of patches ``idx``, reading each row run of patches once."""
        s = self._open()
        size0 = self.size_level0
        level = s.best_level(size0 / self.patch_size)
        lds = s.level_downsamples[level]
        read = max(1, int(round(size0 / lds)))
        c = self.coords[idx]
        out = np.empty((len(idx), self.out, self.out, 3), np.uint8)
        order = np.lexsort((c[:, 0], c[:, 1]))
        k = 0
        while k < len(order):  # a run: same y, each next x within one patch and on the read grid
            j = k + 1
            x0, y0 = c[order[k]]
            while (j < len(order) and c[order[j], 1] == y0 and c[order[j], 0] - c[order[j - 1], 0] <= size0
                   and _same_grid(c[order[j], 0] - x0, lds)):
                j += 1
            width = int(round((c[order[j - 1], 0] - x0) / lds)) + read
            region = s.read_region((int(x0), int(y0)), level, (width, read))
            for t in order[k:j]:
                off = int(round((c[t, 0] - x0) / lds))
                out[t] = self._finish(region[:, off : off + read], read)
            k = j
        return out


class _Batches(Dataset):
    """One item per batch of a :class:`PatchDataset` (decoded whole in a worker).

    Returns ``(tensor, None)`` or ``(None, reason)``: a worker never raises, so an
    unreadable slide gives a one-line reason instead of a worker traceback.
    """

    def __init__(self, ds: PatchDataset, batch_size: int):
        self.ds, self.batch_size = ds, int(batch_size)

    def __len__(self) -> int:
        return (len(self.ds) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, b: int):
        idx = np.arange(b * self.batch_size, min(len(self.ds), (b + 1) * self.batch_size))
        try:
            arr = self.ds.read_batch(idx)
        except Exception as err:  # noqa: BLE001 - reported per slide in failed.csv
            return None, _one_line(err)
        return torch.from_numpy(arr).permute(0, 3, 1, 2), None  # NCHW view of NHWC = channels_last


def _one_line(err: BaseException) -> str:
    msg = " ".join(str(err).split()) or type(err).__name__
    return msg if len(msg) <= 300 else msg[:297] + "..."


def normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 (B, 3, H, W) → float, scaled to [0, 1] and standardised per channel."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x.float() / 255.0 - m) / s


class SlideReadError(ValueError):
    """A slide's patches could not be read (the reason names the slide)."""


def prepare_model(enc: PatchEncoder, device: torch.device) -> nn.Module:
    """The encoder on ``device`` in eval mode, in channels_last memory (faster convolutions)."""
    return enc.model.to(device).eval().to(memory_format=torch.channels_last)


#: on the CPU the forward runs in chunks of this many patches per torch thread: small batches keep
#: the activations in cache (one thread, docs/benchmarks.md "Speed and scale, issue 15": ResNet-50-trunc
#: 8.4 / 7.4 / 7.0 / 7.0 patches per CPU-second at 4 / 8 / 16 / 32); a GPU takes the whole batch
CPU_CHUNK_PER_THREAD = 8


def encode_patches(enc: PatchEncoder, ds: PatchDataset, device: torch.device, batch_size: int = 64,
                   num_workers: int = 2, precision: str = "fp32", progress: bool | object = False) -> np.ndarray:
    """Features (N, D) float32 for every patch of ``ds``, in order.

    Workers decode whole batches; batches are pinned and copied non-blocking to a GPU;
    inference runs under ``inference_mode`` in channels_last, with bf16/fp16 autocast on a
    GPU only when asked (``precision``; the CPU always computes in float32, in chunks of
    :data:`CPU_CHUNK_PER_THREAD` patches per thread). ``progress``:
    False, True (a bar for this slide) or a :class:`~milkit.slide.progress.CohortProgress`.
    """
    from milkit.slide.progress import track

    if len(ds) == 0:
        return np.zeros((0, enc.dim), np.float32)
    cuda = device.type == "cuda"
    loader = DataLoader(_Batches(ds, batch_size), batch_size=None, shuffle=False, num_workers=num_workers,
                        pin_memory=cuda, persistent_workers=False, prefetch_factor=2 if num_workers else None)
    model = prepare_model(enc, device)
    amp = precision in ("bf16", "fp16") and cuda
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    out = np.empty((len(ds), enc.dim), np.float32)
    cohort = progress if hasattr(progress, "advance") else None
    items = track(loader, ds.slide_path.name, enabled=progress is True, total=len(loader))
    k = 0
    chunk = None if cuda else max(1, CPU_CHUNK_PER_THREAD * torch.get_num_threads())
    with torch.inference_mode():
        for xb, reason in items:
            if reason is not None:
                raise SlideReadError(f"{ds.slide_path}: {reason}" if str(ds.slide_path) not in reason else reason)
            xb = xb.to(device, non_blocking=True)
            step = chunk or len(xb)
            for s in range(0, len(xb), step):
                x = normalise(xb[s : s + step], enc.mean, enc.std)
                with torch.autocast(device.type, dtype=dtype, enabled=amp):
                    f = model(x.contiguous(memory_format=torch.channels_last))
                out[k : k + len(f)] = f.float().cpu().numpy()
                k += len(f)
            if cohort is not None:
                cohort.advance(len(xb))
    return out


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


#: what :func:`features_encoder` says of features whose encoder was not recorded
UNRECORDED = "unrecorded"


def features_encoder(path: Path) -> str | None:
    """The encoder of the complete features (one row per coord) ``path`` holds; None without them."""
    if not path.is_file():
        return None
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f or f["features"].shape[0] != f["coords"].shape[0]:
                return None
            enc = f["features"].attrs.get("encoder")
            # features another tool wrote (CLAM, TRIDENT) record no encoder: not ours to replace unasked
            return UNRECORDED if enc is None else str(enc.decode() if isinstance(enc, bytes) else enc)
    except OSError:
        return None


def has_features(path: Path, encoder_name: str) -> bool:
    """True when ``path`` holds complete features (one row per coord) from ``encoder_name``."""
    return features_encoder(path) == encoder_name


def _output_mode(dst: Path, src: Path) -> int:
    """The permission bits ``dst`` should get: its own when it exists (extract in place keeps
    the h5's mode), else what the user's umask gives a new file."""
    if dst.exists():
        return stat.S_IMODE(dst.stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def write_features(src: Path, dst: Path, features: np.ndarray, encoder_name: str) -> None:
    """Copy ``src`` (coords + attrs) to a temp file beside ``dst``, add ``features``, rename;
    ``dst`` keeps its file mode (or follows the umask when new)."""
    mode = _output_mode(dst, src)

    def write(tmp: Path) -> None:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "a") as f:
            if "features" in f:
                del f["features"]
            d = f.create_dataset("features", data=features.astype(np.float32))
            d.attrs["encoder"] = encoder_name
            f["coords"].attrs["encoder"] = encoder_name
            f.attrs["encoder"] = encoder_name
        os.chmod(tmp, mode)

    io.write_with(dst, write)
    if stat.S_IMODE(dst.stat().st_mode) != mode:  # whatever the atomic writer did to the mode
        os.chmod(dst, mode)


#: milkit's own temporary names (io.atomic_path: ``.<name>.<random>.tmp``)
def stale_temp_files(folder: Path, name: str) -> list[Path]:
    """Temporary files an interrupted write of ``folder/name`` left behind."""
    if not folder.is_dir():
        return []
    return sorted(q for q in folder.glob(f".{glob.escape(name)}.*.tmp")
                  if q.is_file() and re.fullmatch(rf"\.{re.escape(name)}\.[A-Za-z0-9_]+\.tmp", q.name))


def remove_stale_temp_files(folder: Path, name: str) -> int:
    """Remove them; returns how many. Only called for slides this rank owns, so a
    concurrent rank's temporary file is never touched."""
    n = 0
    for q in stale_temp_files(folder, name):
        with contextlib.suppress(FileNotFoundError):
            q.unlink()
            n += 1
    if n:
        log.info("%s: removed %d stale temporary file(s) of an interrupted run", folder / name, n)
    return n


def find_slide(pf: PatchFile, slides_dir: Path | None) -> Path:
    """The slide a patch file came from: ``slides_dir/<id>.*`` first, then the recorded path."""
    sid = pf.path.stem.removesuffix("_patches")
    if slides_dir is not None:
        for q in find_slides([slides_dir]):  # its subfolders too, when it holds no slide itself (GDC)
            if slide_id(q) == sid:
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
class ExtractionFailed(ValueError):
    """Some slides could not be extracted; the others were written. ``summary`` is what
    :func:`extract_dir` would have returned; the message is one line naming failed.csv."""

    def __init__(self, message: str, summary: dict):
        super().__init__(message)
        self.summary = summary


def failed_csv_path(out_dir: Path, rank: int, world: int) -> Path:
    """``failed.csv`` for a single process; ``failed_rank<r>.csv`` per rank under torchrun/SLURM."""
    return Path(out_dir) / ("failed.csv" if world == 1 else f"failed_rank{rank}.csv")


def write_failed_csv(path: Path, failures: list[tuple[str, str]]) -> None:
    """``slide,reason`` rows (one per slide that could not be extracted)."""
    buf = _stdio.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["slide", "reason"])
    w.writerows(failures)
    io.write_text(path, buf.getvalue())


def _read_patch_files(files: list[Path]) -> tuple[list[PatchFile | None], list[str | None]]:
    pfs: list[PatchFile | None] = []
    errors: list[str | None] = []
    for f in files:
        try:
            pfs.append(read_patch_file(f))
            errors.append(None)
        except (ValueError, OSError) as err:
            pfs.append(None)
            errors.append(_one_line(err))
    return pfs, errors


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
    strict: bool = True,
    overwrite: bool = False,
) -> dict:
    """Extract features for this rank's share of ``tiles_dir/*.h5``; returns a summary.

    Slides are sharded on the full sorted file list before finished ones are skipped,
    so ranks never disagree about who does what. A slide that cannot be read (a corrupt
    slide or patch h5, a missing slide file) is recorded in ``failed.csv`` (slide, reason)
    and the rest go on; at the end :class:`ExtractionFailed` is raised when ``strict``
    (the CLI then exits 2). Stale temporary files of an interrupted run are removed.
    Features of another encoder already in an output h5 are refused before anything is
    written, unless ``overwrite`` (hours of extraction are not replaced by a typo).
    """
    from milkit.slide.progress import CohortProgress

    tiles_dir = Path(tiles_dir)
    if not tiles_dir.is_dir():
        raise FileNotFoundError(f"{tiles_dir}: tiles folder does not exist")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be ≥ 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"--workers must be ≥ 0, got {num_workers}")
    files = sorted(p for p in tiles_dir.glob("*.h5") if not p.name.startswith("."))
    if not files:
        raise ValueError(f"{tiles_dir}: no .h5 patch files (run 'milkit tile' first)")
    patch_files, read_errors = _read_patch_files(files)
    rank, world, local_rank = dist_env(environ)
    ranks = shard_assignment([0 if pf is None else len(pf.coords) for pf in patch_files], world)
    mine = [(f, pf, e) for f, pf, e, r in zip(files, patch_files, read_errors, ranks) if r == rank]
    enc = build_patch_encoder(encoder, weights)
    device = pick_device(devices, local_rank)
    out_dir = Path(out_dir) if out_dir is not None else tiles_dir
    if not overwrite:
        # every rank checks every file, so that no rank writes while another refuses
        other = [(out_dir / f.name, e) for f in files
                 if (e := features_encoder(out_dir / f.name)) is not None and e != enc.name]
        if other:
            raise ValueError(f"{other[0][0]}: holds features of encoder {other[0][1]!r} ({len(other)} file(s)); "
                             f"extracting {enc.name!r} would replace them: pass --overwrite, or --out DIR to keep both")
    done, skipped, failures, n_patches = [], [], [], 0
    todo = []
    for f, pf, err in mine:
        dst = out_dir / f.name
        remove_stale_temp_files(out_dir, f.name)
        if err is None and has_features(dst, enc.name):
            skipped.append(dst)
        else:
            todo.append((f, pf, err, dst))
    t0 = time.perf_counter()
    total = sum(len(pf.coords) for _, pf, err, _ in todo if pf is not None)
    with CohortProgress(total, len(todo), enabled=progress) as bar:
        for f, pf, err, dst in todo:
            n = 0 if pf is None else len(pf.coords)
            bar.start_slide(f.name, n)
            try:
                if err is not None:
                    raise ValueError(err)
                slide_path = find_slide(pf, slides_dir)
                size0 = pf.size_level0
                if size0 is None:  # CLAM patching: patch_size is at patch_level
                    with Slide(slide_path, mpp) as s:
                        size0 = int(round(pf.patch_size * s.level_downsamples[pf.patch_level or 0]))
                ds = PatchDataset(slide_path, pf.coords, size0, pf.patch_size, enc.input_size, mpp)
                feats = encode_patches(enc, ds, device, batch_size, num_workers, precision, bar)
                write_features(pf.path, dst, feats, enc.name)
            except Exception as e:  # noqa: BLE001 - recorded, then the other slides go on
                reason = _one_line(e)
                log.error("%s: extraction failed (%s); going on with the other slides", f, reason)
                failures.append((f.stem.removesuffix("_patches"), reason))
                bar.end_slide(n)  # its patches leave the overall total
                continue
            bar.end_slide()
            done.append(dst)
            n_patches += n
    elapsed = time.perf_counter() - t0
    failed_csv = failed_csv_path(out_dir, rank, world)
    if failures:
        write_failed_csv(failed_csv, failures)
    elif failed_csv.is_file():  # a rerun that succeeded: the old list no longer holds
        failed_csv.unlink()
    summary = {"rank": rank, "world_size": world, "device": str(device), "encoder": enc.name, "dim": enc.dim,
               "written": [str(p) for p in done], "skipped": [str(p) for p in skipped],
               "failed": [{"slide": s, "reason": r} for s, r in failures],
               "failed_csv": str(failed_csv) if failures else None,
               "patches": n_patches, "seconds": elapsed,
               "patches_per_s": n_patches / elapsed if elapsed > 0 and n_patches else 0.0}
    if failures and strict:
        first = failures[0][1]
        raise ExtractionFailed(
            f"{failed_csv}: {len(failures)} of {len(mine)} slide(s) could not be extracted (first: {first}); "
            f"{len(done)} written, {len(skipped)} already done", summary)
    return summary

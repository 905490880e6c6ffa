"""``milkit benchmark extract``: patches/s of tiling and feature extraction on a generated slide,
each beside the plain single-process loop a script would write.

- tiling, milkit: tissue mask on a thumbnail, then the grid's tissue fractions by integral image;
- tiling, plain loop: read every grid patch at level 0 and threshold its own saturation;
- extraction, milkit: DataLoader workers decode patches, batched inference on the device;
- extraction, plain loop: one process reads, normalises and encodes one patch at a time.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer


def _plain_tiling(slide_path: Path, ps0: int, threshold: float) -> np.ndarray:
    from milkit.slide.reader import Slide
    from milkit.slide.tiling import grid_coords
    from milkit.slide.tissue import otsu_threshold, saturation

    with Slide(slide_path) as s:
        thumb, _ = s.read_level_image(1024)
        thr = max(otsu_threshold(saturation(thumb)), 8)
        keep = []
        for x, y in grid_coords(*s.dimensions, ps0, ps0):
            sat = saturation(s.read_region((x, y), 0, (ps0, ps0)))
            if (sat > thr).mean() >= threshold:
                keep.append((x, y))
    return np.array(keep, np.int64).reshape(-1, 2)


def _plain_extract(slide_path: Path, coords: np.ndarray, ps0: int, patch: int, enc, device) -> np.ndarray:
    import torch
    from PIL import Image

    from milkit.slide.extract import normalise
    from milkit.slide.reader import Slide

    model = enc.model.to(device).eval()
    out = []
    with Slide(slide_path) as s, torch.no_grad():
        for x, y in coords:
            arr = s.read_region((int(x), int(y)), 0, (ps0, ps0))
            size = enc.input_size or patch
            if arr.shape[0] != size:
                arr = np.asarray(Image.fromarray(arr).resize((size, size), Image.BILINEAR))
            t = torch.from_numpy(arr).permute(2, 0, 1)[None].to(device)
            out.append(model(normalise(t, enc.mean, enc.std)).float().cpu())
    return torch.cat(out).numpy()


def run_benchmark(size: int, patch: int, encoder: str, weights: str, workers: int, batch_size: int,
                  devices: str, max_patches: int | None, workdir: Path) -> dict:
    import torch

    from milkit.slide.extract import PatchDataset, build_patch_encoder, encode_patches, pick_device
    from milkit.slide.synthetic import make_slide
    from milkit.slide.tiling import TilingConfig, tile_slide

    slide = make_slide(workdir, "bench", True, seed=0, size=(size, size), mpp=0.5, lesion_scale=0.15)
    cfg = TilingConfig(patch_size=patch, downsample=1.0)
    t = time.perf_counter()
    h5 = tile_slide(slide.path, workdir / "tiles", cfg)
    t_tile = time.perf_counter() - t
    import h5py

    with h5py.File(h5) as f:
        coords = f["coords"][()]
    t = time.perf_counter()
    plain_coords = _plain_tiling(slide.path, patch, cfg.tissue_fraction)
    t_plain_tile = time.perf_counter() - t
    a = {tuple(c) for c in coords.tolist()}
    b = {tuple(c) for c in plain_coords.tolist()}
    n_grid = (size // patch) ** 2
    if max_patches is not None:
        coords = coords[:max_patches]
    enc = build_patch_encoder(encoder, weights)
    device = pick_device(devices, 0)
    ds = PatchDataset(slide.path, coords, patch, patch, enc.input_size)
    encode_patches(enc, PatchDataset(slide.path, coords[: min(8, len(coords))], patch, patch, enc.input_size),
                   device, batch_size, 0)  # warm-up (allocator, cuDNN autotune)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    feats = encode_patches(enc, ds, device, batch_size, workers)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_ext = time.perf_counter() - t
    t = time.perf_counter()
    plain = _plain_extract(slide.path, coords, patch, patch, enc, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_plain_ext = time.perf_counter() - t
    n = len(coords)
    return {
        "slide": f"{size}x{size} px generated tiled TIFF (jpeg), patch {patch} px at level 0",
        "encoder": enc.name, "device": str(device), "workers": workers, "batch_size": batch_size,
        "grid_patches": n_grid, "kept_patches": len(a), "extracted_patches": n,
        "tiling": {"milkit_s": t_tile, "plain_s": t_plain_tile,
                   "milkit_grid_patches_per_s": n_grid / t_tile, "plain_grid_patches_per_s": n_grid / t_plain_tile,
                   "kept_jaccard_vs_plain": len(a & b) / max(1, len(a | b))},
        "extraction": {"milkit_s": t_ext, "plain_s": t_plain_ext, "milkit_patches_per_s": n / t_ext,
                       "plain_patches_per_s": n / t_plain_ext,
                       "max_abs_feature_diff": float(np.abs(feats - plain).max()) if n else 0.0},
        "torch_threads": torch.get_num_threads(),
    }


def bench(
    size: int = typer.Option(4096, "--size", help="side of the generated slide in pixels"),
    patch: int = typer.Option(256, "--patch-size"),
    encoder: str = typer.Option("resnet18", "--encoder"),
    weights: str = typer.Option("none", "--weights", help="none (random, no download), imagenet, or a file"),
    workers: int = typer.Option(2, "--workers"),
    batch_size: int = typer.Option(64, "--batch-size"),
    devices: str = typer.Option("auto", "--devices"),
    max_patches: Optional[int] = typer.Option(None, "--max-patches", help="extract at most this many patches"),
    out: Optional[Path] = typer.Option(None, "--out", help="write the numbers as JSON here"),
) -> None:
    """Tiling and extraction throughput vs a plain single-process loop."""
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory() as tmp:
        res = run_benchmark(size, patch, encoder, weights, workers, batch_size, devices, max_patches, Path(tmp))
    t = Table(title=f"milkit benchmark extract — {res['slide']}, {res['encoder']} on {res['device']}")
    for c in ("stage", "patches", "milkit (patches/s)", "plain loop (patches/s)", "speed-up", "agreement"):
        t.add_column(c)
    tl, ex = res["tiling"], res["extraction"]
    t.add_row("tiling (grid positions)", str(res["grid_patches"]), f"{tl['milkit_grid_patches_per_s']:.0f}",
              f"{tl['plain_grid_patches_per_s']:.0f}", f"{tl['plain_s'] / tl['milkit_s']:.1f}×",
              f"kept-set Jaccard {tl['kept_jaccard_vs_plain']:.3f}")
    t.add_row(f"extraction ({res['workers']} workers, batch {res['batch_size']})", str(res["extracted_patches"]),
              f"{ex['milkit_patches_per_s']:.1f}", f"{ex['plain_patches_per_s']:.1f}",
              f"{ex['plain_s'] / ex['milkit_s']:.1f}×", f"max |Δfeature| {ex['max_abs_feature_diff']:.2e}")
    Console().print(t)
    if out is not None:
        from milkit import io

        io.write_json(out, res)
    else:
        typer.echo(json.dumps(res, indent=1))


def register(app: typer.Typer) -> None:
    """Add this benchmark's command to ``milkit benchmark``."""
    app.command("extract")(bench)

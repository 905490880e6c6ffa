"""``milkit benchmark extract``: tiling and feature-extraction throughput on a generated slide,
each beside the plain single-process loop a script would write and the machine's FLOP limit.

- tiling, milkit: tissue mask on a thumbnail, then the grid's tissue fractions by integral image;
- tiling, plain loop: read every grid patch at level 0 and threshold its own saturation;
- extraction, milkit: :func:`~milkit.slide.extract.encode_patches` end to end (read, decode,
  normalise, forward; batches decoded in workers);
- extraction, plain loop: one process reads, normalises and encodes one patch at a time
  (torchvision/timm model, ``no_grad``);
- the FLOP limit: this machine's float32 GEMM GFLOP/s (2048² matmul, same torch threads)
  divided by the encoder's FLOPs per patch (``torch.utils.flop_counter``).

Every timing is taken twice: wall time, and CPU time (this process plus its finished
children, i.e. the DataLoader workers that decode), with the GEMM probe's limit in GFLOP
per CPU-second. On a machine that other jobs share, wall time measures the other jobs;
CPU time measures the work (at one torch thread it barely moves with the load), so the
CPU-time columns are the ones to compare across runs. "decode" is reading and decoding
every patch (the workers' job) without the forward.

The machine may be shared: every encoder runs ``--rounds`` rounds, and in each round the
GEMM probe, milkit and the plain loop run back to back (alternating which goes first), so
that each ratio compares numbers taken under the same load; the table gives medians over
rounds and the load average before and after.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer

DEFAULT_ENCODERS = "resnet18,resnet50_trunc,timm:vit_small_patch16_224"


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
    """The loop a script would write: one patch at a time, read → resize → normalise → model."""
    import torch
    from PIL import Image

    from milkit.slide.extract import normalise
    from milkit.slide.reader import Slide

    model = enc.model.to(device).eval().to(memory_format=torch.contiguous_format)
    out = []
    with Slide(slide_path) as s, torch.no_grad():
        for x, y in coords:
            arr = s.read_region((int(x), int(y)), 0, (ps0, ps0))
            size = enc.input_size or patch
            if arr.shape[0] != size:
                arr = np.array(Image.fromarray(arr).resize((size, size), Image.BILINEAR))  # writable
            t = torch.from_numpy(arr).permute(2, 0, 1)[None].to(device)
            out.append(model(normalise(t, enc.mean, enc.std).contiguous()).float().cpu())
    return torch.cat(out).numpy()


def cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and of its finished, reaped children
    (DataLoader workers are joined when their loader is exhausted)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def gemm_gflops(seconds: float = 0.5, n: int = 2048, clock=time.perf_counter) -> float:
    """Float32 GEMM throughput of this process (best of repeated n×n matmuls), per second of ``clock``."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best, t_end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < t_end or best == float("inf"):
        t = clock()
        a @ b
        best = min(best, clock() - t)
    return 2 * n**3 / max(best, 1e-9) / 1e9


def decode_seconds(ds, batch_size: int) -> float:
    """CPU seconds to read and decode every patch of ``ds`` in batches (what the workers do)."""
    from milkit.slide.extract import _Batches

    batches = _Batches(ds, batch_size)
    t = time.process_time()
    for b in range(len(batches)):
        batches[b]
    return time.process_time() - t


def flops_per_patch(model, size: int) -> float:
    """Forward FLOPs of one ``size``² patch (multiply-add = 2 FLOPs)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_encoder(encoder: str, weights: str, slide_path: Path, coords: np.ndarray, patch: int, workers: int,
                  batch_size: int, device, rounds: int) -> dict:
    """Rounds of (GEMM probe, milkit, plain loop) on the same patches; medians and per-round ratios."""
    from milkit.slide.extract import PatchDataset, build_patch_encoder, encode_patches

    enc = build_patch_encoder(encoder, weights)
    size = enc.input_size or patch
    fl = flops_per_patch(enc.model, size)
    ds = PatchDataset(slide_path, coords, patch, patch, enc.input_size)
    warm = PatchDataset(slide_path, coords[: min(batch_size, 8, len(coords))], patch, patch, enc.input_size)
    encode_patches(enc, warm, device, batch_size, 0)  # allocator, oneDNN/cuDNN kernels
    _plain_extract(slide_path, coords[:2], patch, patch, enc, device)
    n = len(coords)
    rows, diff = [], 0.0
    for r in range(rounds):
        g = gemm_gflops()
        g_cpu = gemm_gflops(clock=time.process_time)
        order = ("milkit", "plain") if r % 2 == 0 else ("plain", "milkit")
        t, c = {}, {}
        for which in order:
            t0, c0 = time.perf_counter(), cpu_seconds()
            if which == "milkit":
                feats = encode_patches(enc, ds, device, batch_size, workers)
            else:
                plain = _plain_extract(slide_path, coords, patch, patch, enc, device)
            _sync(device)
            t[which], c[which] = time.perf_counter() - t0, cpu_seconds() - c0
        dec = decode_seconds(ds, batch_size)
        diff = max(diff, float(np.abs(feats - plain).max()) if n else 0.0)
        limit, limit_cpu = g * 1e9 / fl, g_cpu * 1e9 / fl
        rows.append({"gemm_gflops": g, "limit_patches_per_s": limit, "milkit_patches_per_s": n / t["milkit"],
                     "plain_patches_per_s": n / t["plain"], "milkit_vs_limit": n / t["milkit"] / limit,
                     "milkit_vs_plain": t["plain"] / t["milkit"],
                     "gemm_gflops_per_cpu_s": g_cpu, "limit_patches_per_cpu_s": limit_cpu,
                     "milkit_patches_per_cpu_s": n / c["milkit"], "plain_patches_per_cpu_s": n / c["plain"],
                     "milkit_vs_limit_cpu": n / c["milkit"] / limit_cpu, "milkit_vs_plain_cpu": c["plain"] / c["milkit"],
                     "decode_share_cpu": dec / c["milkit"]})
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"encoder": enc.name, "input_px": size, "gflop_per_patch": fl / 1e9, "patches": n, "rounds": rows,
            "median": med, "max_abs_feature_diff": diff}


def run_benchmark(size: int, patch: int, encoders: list[str], weights: str, workers: int, batch_size: int,
                  devices: str, max_patches: int | None, rounds: int, workdir: Path,
                  tiling_size: int | None = None) -> dict:
    import torch

    from milkit.slide.extract import pick_device
    from milkit.slide.synthetic import make_slide
    from milkit.slide.tiling import TilingConfig, tile_slide

    import h5py

    load0 = os.getloadavg()
    slide = make_slide(workdir, "bench", True, seed=0, size=(size, size), mpp=0.5, lesion_scale=0.15)
    cfg = TilingConfig(patch_size=patch, downsample=1.0)
    tile_size = size if tiling_size is None else tiling_size
    tile_slide_ = slide if tile_size == size else make_slide(
        workdir / "tiling", "bench_tiling", True, seed=0, size=(tile_size, tile_size), mpp=0.5, lesion_scale=0.15)
    tile_s = []
    for r in range(rounds):  # a fresh output folder each round: tile_slide never skips
        t = time.perf_counter()
        tile_h5 = tile_slide(tile_slide_.path, workdir / f"tiles{r}", cfg)
        tile_s.append(time.perf_counter() - t)
    t_tile = statistics.median(tile_s)
    with h5py.File(tile_h5) as f:
        tile_coords = f["coords"][()]
    t = time.perf_counter()
    plain_coords = _plain_tiling(tile_slide_.path, patch, cfg.tissue_fraction)
    t_plain_tile = time.perf_counter() - t
    a = {tuple(c) for c in tile_coords.tolist()}
    b = {tuple(c) for c in plain_coords.tolist()}
    n_grid = (tile_size // patch) ** 2
    if tile_size == size:
        coords = tile_coords
    else:
        with h5py.File(tile_slide(slide.path, workdir / "tiles_extract", cfg)) as f:
            coords = f["coords"][()]
    if max_patches is not None:
        coords = coords[:max_patches]
    device = pick_device(devices, 0)
    results = [bench_encoder(e, weights, slide.path, coords, patch, workers, batch_size, device, rounds)
               for e in encoders]
    return {
        "slide": f"{size}x{size} px generated tiled TIFF (jpeg), patch {patch} px at level 0",
        "device": str(device), "workers": workers, "batch_size": batch_size, "torch_threads": torch.get_num_threads(),
        "grid_patches": n_grid, "kept_patches": len(a), "extracted_patches": len(coords),
        "tiling": {"slide": f"{tile_size}x{tile_size} px", "milkit_s": t_tile, "milkit_s_rounds": tile_s,
                   "plain_s": t_plain_tile,
                   "milkit_grid_patches_per_s": n_grid / t_tile, "plain_grid_patches_per_s": n_grid / t_plain_tile,
                   "kept_jaccard_vs_plain": len(a & b) / max(1, len(a | b))},
        "extraction": results, "loadavg_before": load0, "loadavg_after": os.getloadavg(), "cpu_count": os.cpu_count(),
    }


def markdown(res: dict) -> str:
    """The result tables as markdown."""
    tl = res["tiling"]
    lines = [f"{res['slide']}; {res['device']}, {res['torch_threads']} torch threads, {res['workers']} workers, "
             f"batch {res['batch_size']}; load average {res['loadavg_before'][0]:.2f} before, "
             f"{res['loadavg_after'][0]:.2f} after ({res['cpu_count']} CPUs).", "",
             "| tiling | grid positions | milkit (positions/s) | plain loop (positions/s) | speed-up | kept-set Jaccard |",
             "|---|---:|---:|---:|---:|---:|",
             f"| {tl.get('slide', res['slide'].split(',')[0])} | {res['grid_patches']} | {tl['milkit_grid_patches_per_s']:.0f} | "
             f"{tl['plain_grid_patches_per_s']:.0f} | {tl['plain_s'] / tl['milkit_s']:.1f}× | "
             f"{tl['kept_jaccard_vs_plain']:.3f} |", "",
             "| encoder | px | GFLOP/patch | patches | GEMM GFLOP/CPU-s | limit (patches/CPU-s) | "
             "milkit (patches/CPU-s) | plain loop (patches/CPU-s) | milkit / limit | milkit / plain | decode share | "
             "wall: limit / milkit / plain (patches/s) | wall: milkit / limit | max abs Δfeature |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["extraction"]:
        m = r["median"]
        lines.append(f"| {r['encoder']} | {r['input_px']} | {r['gflop_per_patch']:.2f} | {r['patches']} | "
                     f"{m['gemm_gflops_per_cpu_s']:.0f} | {m['limit_patches_per_cpu_s']:.1f} | "
                     f"{m['milkit_patches_per_cpu_s']:.1f} | {m['plain_patches_per_cpu_s']:.1f} | "
                     f"{100 * m['milkit_vs_limit_cpu']:.0f} % | {m['milkit_vs_plain_cpu']:.2f}× | "
                     f"{100 * m['decode_share_cpu']:.0f} % | {m['limit_patches_per_s']:.1f} / "
                     f"{m['milkit_patches_per_s']:.1f} / {m['plain_patches_per_s']:.1f} | "
                     f"{100 * m['milkit_vs_limit']:.0f} % | {r['max_abs_feature_diff']:.1e} |")
    lines += ["", f"Tiling: median of {len(tl.get('milkit_s_rounds', [0]))} runs (tissue mask, grid, h5 and "
              "thumbnail written), the plain loop once.",
              "", f"Medians over {len(res['extraction'][0]['rounds']) if res['extraction'] else 0} rounds; "
              "each round runs the GEMM probe, milkit and the plain loop back to back. CPU-s: CPU seconds of the "
              "process and its decoding workers; decode share: reading + decoding as a share of milkit's CPU time."]
    return "\n".join(lines) + "\n"


def bench(
    size: int = typer.Option(4096, "--size", help="side of the generated slide in pixels"),
    patch: int = typer.Option(256, "--patch-size"),
    encoders: str = typer.Option(DEFAULT_ENCODERS, "--encoder", "--encoders", help="comma-separated encoders"),
    weights: str = typer.Option("none", "--weights", help="none (random, no download), imagenet, or a file"),
    workers: int = typer.Option(1, "--workers"),
    batch_size: int = typer.Option(32, "--batch-size"),
    devices: str = typer.Option("auto", "--devices"),
    max_patches: Optional[int] = typer.Option(64, "--max-patches", help="extract at most this many patches"),
    rounds: int = typer.Option(3, "--rounds", help="side-by-side rounds per encoder (medians reported)"),
    tiling_size: Optional[int] = typer.Option(
        None, "--tiling-size", help="side of a separate generated slide for the tiling rows (default: --size); "
        "tiling's cost is mostly the thumbnail, so grid positions/s grows with the slide"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for extract.json and extract.md"),
) -> None:
    """Tiling and extraction throughput vs a plain single-process loop and the FLOP limit."""
    from rich.console import Console

    enc_list = [e.strip() for e in encoders.split(",") if e.strip()]
    if rounds < 1:
        raise ValueError(f"--rounds must be ≥ 1, got {rounds}")
    if tiling_size is not None and tiling_size < patch:
        raise ValueError(f"--tiling-size {tiling_size} must be at least --patch-size {patch}")
    with tempfile.TemporaryDirectory() as tmp:
        res = run_benchmark(size, patch, enc_list, weights, workers, batch_size, devices, max_patches, rounds, Path(tmp),
                            tiling_size)
    md = markdown(res)
    Console().print(md)
    if out is not None:
        from milkit.benchmarks.common import write_results

        write_results(Path(out), "extract", res, f"# milkit benchmark extract\n\n{md}")
    else:
        typer.echo(json.dumps(res, indent=1))


def register(app: typer.Typer) -> None:
    """Add this benchmark's command to ``milkit benchmark``."""
    app.command("extract")(bench)

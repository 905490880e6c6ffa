"""``milkit benchmark label-outputs``: how long ``milkit label`` takes to write one slide's files
at whole-slide size, where the model's pass over pre-extracted features is not the cost.

A slide of ``--width`` × ``--height`` level-0 pixels (default: a Camelyon16-size slide at
0.243 µm/px) carries a rectangular tissue region of 256-px patches at 0.5 µm/px
(``--patch-level0`` level-0 px each), with two smooth round lesions in the calibrated
probability. Timed: every per-slide output together (:func:`milkit.slide.outputs.write_slide_outputs`:
instances CSV/h5, the pyramidal ``probability.tif``, the QuPath GeoJSONs, the heatmap PNG on a
1024-px thumbnail), and ``probability.tif`` alone; medians over ``--rounds``, wall time.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import typer


def synthetic_slide(width: int, height: int, patch_level0: int, tissue: float, seed: int):
    """A :class:`SlideScores` with a centred tissue rectangle covering ``tissue`` of the slide
    and two Gaussian lesions in the probability (a few % of the patches above 0.5)."""
    from milkit.slide.outputs import SlideScores

    rng = np.random.default_rng(seed)
    nx, ny = width // patch_level0, height // patch_level0
    side = np.sqrt(tissue)
    x0, y0 = int(nx * (1 - side) / 2), int(ny * (1 - side) / 2)
    gx, gy = np.meshgrid(np.arange(x0, nx - x0), np.arange(y0, ny - y0))
    gx, gy = gx.ravel(), gy.ravel()
    prob = np.zeros(len(gx))
    for cx, cy in rng.uniform([x0, y0], [nx - x0, ny - y0], size=(2, 2)):
        prob = np.maximum(prob, np.exp(-((gx - cx) ** 2 + (gy - cy) ** 2) / (2 * (0.1 * (nx - 2 * x0)) ** 2)))
    prob = np.clip(prob + rng.normal(0, 0.02, len(prob)), 0, 1)
    coords = np.stack([gx, gy], 1).astype(np.int64) * patch_level0
    labels = (prob >= 0.5).astype(np.int64)
    return SlideScores("bench", coords, np.log(prob + 1e-6) - np.log1p(-prob + 1e-6), labels, 0.5, "score",
                       patch_level0, patch_level0, (width, height), 0.243, float(labels.any()),
                       probability=prob, threshold_criterion="f1", calibration="benchmark")


def run(width: int, height: int, patch_level0: int, tissue: float, rounds: int) -> dict:
    from milkit.slide.heatmap import score_raster, write_probability_tiff
    from milkit.slide.outputs import write_slide_outputs

    s = synthetic_slide(width, height, patch_level0, tissue, seed=0)
    ds = max(width, height) / 1024
    thumb = np.full((int(height / ds), int(width / ds), 3), 240, np.uint8)
    raster, cell = score_raster(s.coords, s.probability, s.size_level0, s.stride_level0, s.level0_size)
    all_s, tif_s, sizes = [], [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            t = time.perf_counter()
            paths = write_slide_outputs(Path(tmp) / f"r{r}", s, thumb, ds)
            all_s.append(time.perf_counter() - t)
            t = time.perf_counter()
            write_probability_tiff(Path(tmp) / "p.tif", raster, cell, s.level0_size, s.mpp)
            tif_s.append(time.perf_counter() - t)
        sizes = {p.name: round(p.stat().st_size / 2**20, 2) for p in paths}
    return {"level0_size": [width, height], "patch_size_level0": patch_level0, "n_patches": int(len(s.coords)),
            "n_positive": int(s.labels.sum()), "rounds": rounds, "outputs_s": statistics.median(all_s),
            "probability_tif_s": statistics.median(tif_s), "sizes_mib": sizes,
            "load_average": os.getloadavg()[0]}


def bench(
    out: Path = typer.Option(Path("benchmark-results/label_outputs"), "--out"),
    width: int = typer.Option(98304, "--width", help="level-0 width (px)"),
    height: int = typer.Option(215040, "--height", help="level-0 height (px)"),
    patch_level0: int = typer.Option(512, "--patch-level0", help="patch size in level-0 px"),
    tissue: float = typer.Option(0.1, "--tissue", help="fraction of the slide that is tissue (patched)"),
    rounds: int = typer.Option(3, "--rounds"),
) -> None:
    """Time one whole slide's `milkit label` outputs (probability.tif, GeoJSONs, CSV/h5, heatmap)."""
    from milkit.benchmarks.common import markdown_table, write_results

    if not 0 < tissue <= 1:
        raise typer.BadParameter(f"--tissue must be in (0, 1], got {tissue}")
    for name, v in (("--width", width), ("--height", height), ("--patch-level0", patch_level0), ("--rounds", rounds)):
        if v < 1:
            raise typer.BadParameter(f"{name} must be ≥ 1, got {v}")
    res = run(width, height, patch_level0, tissue, rounds)
    md = markdown_table(
        ["level-0 size", "patches (positive)", "all outputs s", "probability.tif s", "probability.tif MiB", "load"],
        [[f"{width} × {height}", f"{res['n_patches']} ({res['n_positive']})", f"{res['outputs_s']:.2f}",
          f"{res['probability_tif_s']:.2f}", f"{res['sizes_mib'].get('probability.tif', 0):.1f}",
          f"{res['load_average']:.1f}"]])
    j, _ = write_results(out, "label_outputs", res, md)
    typer.echo(md + f"results: {j}")


def register(app: typer.Typer) -> None:
    """Add ``milkit benchmark label-outputs``."""
    app.command("label-outputs")(bench)

"""Slide commands: ``milkit tile`` (tissue → patch grid → h5) and ``milkit extract`` (features)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def tile(
    slides: List[Path] = typer.Argument(..., help="slide files or folders (any format OpenSlide reads)"),
    out: Path = typer.Option(..., "--out", help="folder for <slide>.h5 and thumbnails/"),
    patch_size: int = typer.Option(256, "--patch-size", help="patch side in pixels at the target resolution"),
    target_mpp: Optional[float] = typer.Option(None, "--target-mpp", help="µm/px of the patches (default 0.5 = 20×)"),
    magnification: Optional[float] = typer.Option(None, "--magnification", help="target magnification, e.g. 20"),
    downsample: Optional[float] = typer.Option(None, "--downsample", help="fixed downsample of level 0 (no MPP needed)"),
    overlap: int = typer.Option(0, "--overlap", help="overlap in target pixels"),
    tissue_fraction: float = typer.Option(0.25, "--tissue-fraction", help="keep patches with at least this tissue"),
    tissue_method: str = typer.Option("otsu", "--tissue-method", help="otsu or fixed"),
    tissue_threshold: int = typer.Option(8, "--tissue-threshold", help="saturation threshold (fixed) / floor (otsu)"),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="level-0 µm/px for every slide (overrides the file)"),
    mpp_csv: Optional[Path] = typer.Option(None, "--mpp-csv", help="CSV slide_id,mpp of per-slide overrides"),
    overwrite: bool = typer.Option(False, "--overwrite", help="re-tile slides that already have an h5"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Tissue mask, patch grid and <slide>.h5 (level-0 top-left coords) for every slide."""
    from milkit.slide.reader import find_slides, read_mpp_csv
    from milkit.slide.tiling import tile_slides

    cfg = tiling_options(
        patch_size=patch_size, target_mpp=target_mpp, target_magnification=magnification, downsample=downsample,
        overlap=overlap, tissue_fraction=tissue_fraction,
        tissue={"method": tissue_method, "threshold": tissue_threshold},
    )
    table = read_mpp_csv(mpp_csv) if mpp_csv is not None else None
    paths = find_slides(list(slides))
    if not paths:
        raise ValueError(f"no slide files in {', '.join(map(str, slides))}")
    for p in tile_slides(paths, out, cfg, mpp, table, overwrite, progress):
        typer.echo(str(p))


#: TilingConfig field → the ``milkit tile`` option that sets it
TILE_OPTIONS = {
    "patch_size": "--patch-size", "target_mpp": "--target-mpp", "target_magnification": "--magnification",
    "downsample": "--downsample", "overlap": "--overlap", "tissue_fraction": "--tissue-fraction",
    "tissue.method": "--tissue-method", "tissue.threshold": "--tissue-threshold",
}


def tiling_options(**kw):
    """TilingConfig from the command's options; a bad value is one line naming the option."""
    from pydantic import ValidationError

    from milkit.slide.tiling import TilingConfig

    try:
        return TilingConfig(**kw)
    except ValidationError as err:
        parts = []
        for e in err.errors():
            key = ".".join(str(p) for p in e["loc"])
            opt = TILE_OPTIONS.get(key)
            msg = e["msg"].removeprefix("Value error, ")
            if opt is None:  # a check across options: name the options it mentions
                parts.append(msg)
                continue
            got = e.get("input")
            parts.append(f"{opt} {got!r}: {msg}" if got is not None else f"{opt}: {msg}")
        raise ValueError("; ".join(parts)) from None


def extract(
    tiles: Path = typer.Argument(..., help="folder of <slide>.h5 written by milkit tile"),
    encoder: str = typer.Option(..., "--encoder", help="resnet18, resnet50 (truncated after layer 3), tiny_cnn, "
                                "timm:<name>, or a pathology foundation model from the Hugging Face hub: uni, uni2-h, "
                                "virchow2, h-optimus-0, gigapath (needs timm, the model's licence accepted and a login)"),
    weights: str = typer.Option("imagenet", "--weights", help="imagenet (the pretrained weights, downloaded and cached; "
                                "the hub's for a foundation model), none (random), or a file"),
    out: Optional[Path] = typer.Option(None, "--out", help="write feature h5 files here (default: in place)"),
    slides: Optional[Path] = typer.Option(None, "--slides", help="folder holding the slides (default: recorded path)"),
    batch_size: int = typer.Option(64, "--batch-size"),
    workers: int = typer.Option(2, "--workers", help="DataLoader workers decoding patches"),
    devices: str = typer.Option("auto", "--devices", help="auto, cpu, or GPU ids such as 0,1 (one per local rank)"),
    precision: str = typer.Option("fp32", "--precision", help="fp32, bf16 or fp16 (autocast on GPU)"),
    mpp: Optional[float] = typer.Option(None, "--mpp", help="level-0 µm/px override when reading slides"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace features of another encoder already in the h5 "
                                   "files (without it they are refused: use --out to keep both)"),
) -> None:
    """Add features (N, D) to each slide's h5; finished slides are skipped; sharded across ranks."""
    from milkit.slide.extract import extract_dir

    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"--precision must be fp32, bf16 or fp16, got {precision!r}")
    summary = extract_dir(tiles, encoder, weights, out, slides, batch_size, workers, devices, precision, mpp, progress,
                          overwrite=overwrite)
    typer.echo(
        f"rank {summary['rank']}/{summary['world_size']} on {summary['device']}: "
        f"{len(summary['written'])} written, {len(summary['skipped'])} already done ({summary['encoder']}, D={summary['dim']})"
    )


def register(app: typer.Typer) -> None:
    """Add the slide commands to the ``milkit`` app."""
    app.command("tile")(tile)
    app.command("extract")(extract)

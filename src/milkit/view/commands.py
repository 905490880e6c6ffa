"""``milkit view LABELS_DIR``: registered through ``registry.COMMAND_MODULES``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def view(
    labels_dir: Path = typer.Argument(..., help="folder written by 'milkit label --slides' (<slide>/instances.h5)"),
    slides: Optional[Path] = typer.Option(None, "--slides", help="folder of the slides (default: the recorded paths)"),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="folder of ASAP XML / GeoJSON annotations"),
    run: Optional[Path] = typer.Option(None, "--run", help="run directory (default: recorded in instances.h5)"),
    port: int = typer.Option(8765, "--port", help="port on 127.0.0.1"),
    browser: bool = typer.Option(True, "--browser/--no-browser", help="open the page in the default browser"),
) -> None:
    """A local whole-slide viewer: deep zoom, heatmap, patch labels at a threshold, annotations, review regions."""
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    from milkit.view.catalog import Catalog
    from milkit.view.server import serve

    serve(Catalog(labels_dir, slides, annotations, run), port, browser)


def register(app: typer.Typer) -> None:
    app.command("view")(view)

"""Benchmark `milkit benchmark ...` (placeholder until its issue lands)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this benchmark's command to ``milkit benchmark``."""

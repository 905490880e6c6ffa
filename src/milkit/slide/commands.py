"""Slide commands (``milkit tile``, ``milkit extract``); filled in by the whole-slide pipeline."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the slide commands to the ``milkit`` app."""

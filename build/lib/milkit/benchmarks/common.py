"""Shared helpers of the benchmark suites: seeds, mean ± std, markdown tables, result files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import numpy as np

from milkit import io


def mean_std(values: Iterable[float | None]) -> tuple[float, float, int]:
    v = np.array([x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=float)
    if v.size == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0, int(v.size)


def fmt(ms: tuple[float, float, int]) -> str:
    m, s, n = ms
    if n == 0:
        return "—"
    return f"{m:.3f} ± {s:.3f}" if n > 1 else f"{m:.3f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_results(out_dir: Path, name: str, results: dict, markdown: str) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    j, m = out_dir / f"{name}.json", out_dir / f"{name}.md"
    io.write_json(j, results)
    io.write_text(m, markdown)
    return j, m

"""The one colour scale of the viewer and the per-slide report: matplotlib's ``coolwarm``
on a FIXED [0, 1] range (0 blue, 0.5 grey-white, 1 red), never rescaled per slide."""

from __future__ import annotations

import numpy as np

CMAP = "coolwarm"


def lut() -> np.ndarray:
    """(256, 3) uint8 colours for values 0, 1/255, …, 1."""
    import matplotlib

    return (matplotlib.colormaps[CMAP](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


def css_gradient(stops: int = 11) -> str:
    """A CSS ``linear-gradient`` of the scale, for colour bars."""
    t = lut()
    cols = [t[int(round(i * 255 / (stops - 1)))] for i in range(stops)]
    return "linear-gradient(to right, " + ", ".join(f"rgb({c[0]},{c[1]},{c[2]})" for c in cols) + ")"


def display_values(scores: np.ndarray, score_kind: str, probability: np.ndarray | None) -> tuple[np.ndarray, str]:
    """Values on [0, 1] to colour and a sentence saying what they are: the calibrated
    ``probability`` when present, else probabilities as they are, else raw scores mapped by
    the slide's 1st–99th percentile (attention logits have no absolute scale)."""
    from milkit.slide.heatmap import normalise_scores

    if probability is not None:
        return np.clip(np.asarray(probability, np.float64), 0, 1), "calibrated probability (instances.h5 'probability')"
    v, how = normalise_scores(scores, score_kind)
    if score_kind == "probability":
        return v, "raw model probability (no calibrated 'probability' column yet)"
    return v, "raw score rescaled by this slide's 1st–99th percentile (not a probability; no 'probability' column)"

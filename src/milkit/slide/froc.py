"""FROC, Camelyon16's lesion-level metric (Bejnordi et al., JAMA 2017; the challenge's
evaluation code): detections are (x, y, confidence) points; one that falls inside an
annotated lesion is a true positive for that lesion (each lesion counted once, at its
best detection), every other one a false positive. Sensitivity is read at 1/4, 1/2, 1,
2, 4 and 8 average false positives per slide (all slides, normal ones included); the
FROC score is their mean. Deviations from the challenge code, stated in the report: the
sensitivity is read as a step function (the best at or below each rate, no interpolation),
lesions are the annotated polygons without the 75 µm dilation, and isolated tumour cells
are not set apart.

Detections come from patch scores by greedy non-maximum suppression: the highest patch
centre is kept, patches within ``radius`` of it are dropped, and so on.
"""

from __future__ import annotations

import numpy as np

FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def detections(coords: np.ndarray, scores: np.ndarray, size_level0: int, radius: float | None = None,
               max_detections: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """(centres (K, 2) level-0, confidences (K,)) by NMS; ``radius`` defaults to two patch sides."""
    c = np.asarray(coords, np.float64).reshape(-1, 2) + size_level0 / 2
    s = np.asarray(scores, np.float64).ravel()
    r2 = (2.0 * size_level0 if radius is None else radius) ** 2
    order = np.argsort(-s, kind="stable")
    alive = np.ones(len(s), bool)
    keep: list[int] = []
    for i in order:
        if not alive[i]:
            continue
        keep.append(int(i))
        if len(keep) >= max_detections:
            break
        alive &= ((c - c[i]) ** 2).sum(1) > r2
    return c[keep], s[keep]


def froc(per_slide: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_lesions: int) -> dict:
    """``per_slide``: (confidences (K,), lesion id per detection (K,) with −1 = outside every
    lesion, slide index unused) for each slide; lesion ids must be unique across slides.
    Returns the sensitivities at :data:`FP_RATES` and their mean (None without lesions)."""
    n_slides = len(per_slide)
    conf = np.concatenate([p[0] for p in per_slide]) if per_slide else np.zeros(0)
    hit = np.concatenate([p[1] for p in per_slide]).astype(np.int64) if per_slide else np.zeros(0, np.int64)
    if n_lesions == 0 or n_slides == 0:
        return {"froc": None, "n_lesions": int(n_lesions), "sensitivity_at_fp": {}}
    order = np.argsort(-conf, kind="stable")
    conf, hit = conf[order], hit[order]
    found: set[int] = set()
    fps, sens = [], []
    n_fp = 0
    for k in range(len(conf)):  # sweep the threshold down through every detection
        if hit[k] < 0:
            n_fp += 1
        else:
            found.add(int(hit[k]))
        if k + 1 == len(conf) or conf[k + 1] != conf[k]:
            fps.append(n_fp / n_slides)
            sens.append(len(found) / n_lesions)
    fps_a, sens_a = np.array([0.0] + fps), np.array([0.0] + sens)
    at = {}
    for rate in FP_RATES:
        ok = fps_a <= rate
        at[str(rate)] = float(sens_a[ok].max()) if ok.any() else 0.0
    return {"froc": float(np.mean(list(at.values()))), "n_lesions": int(n_lesions), "sensitivity_at_fp": at}


def lesion_hits(centres: np.ndarray, lesions: list, first_id: int) -> np.ndarray:
    """Lesion id (``first_id`` + index in ``lesions``, shapely polygons) holding each centre, or −1."""
    import shapely

    out = np.full(len(centres), -1, np.int64)
    if not len(centres) or not lesions:
        return out
    pts = shapely.points(np.asarray(centres, np.float64))
    for j, g in enumerate(lesions):
        inside = shapely.contains(g, pts) & (out < 0)
        out[inside] = first_id + j
    return out

"""``review.geojson``: the regions a pathologist should annotate first (issue 11 §5).

The most uncertain patches of a slide — by seed spread (the standard deviation of the
replicas' calibrated probabilities) when the run has K > 1 seeds; with one seed, where no
spread exists, by closeness of the probability to the threshold ("borderline", and the
file says so) — are grouped into 8-connected regions on the patch grid, each region's
squares merged into one outline (shapely), and written as QuPath annotations: a
FeatureCollection of ``objectType: annotation`` features classified ``Review`` with a
colour, in level-0 pixel coordinates (minus the slide's bounds offset, as QuPath expects).
Regions are ranked by their mean review score; the most uncertain come first.
"""

from __future__ import annotations

import json
import math

import numpy as np

#: fraction of a slide's patches considered for review (at least one patch); ``milkit label
#: --review-fraction`` sets it. Not from a paper: 2 % of a whole slide is a few hundred patches. On the
#: demo's small slides (~230 patches) annotating the 2 % of the validation slides lifted test patch
#: F1 0.18 → 0.28, 10 % → 0.60, the whole lesions → 0.94 with the patch graph off, 0.00 → 0.00, 10 % → 0.54,
#: whole lesions → 0.82 with it on (3 seeds each; docs/benchmarks.md "The review loop")
REVIEW_FRACTION = 0.02
#: at most this many regions per slide
MAX_REGIONS = 25
REVIEW_CLASS = ("Review", (255, 170, 0))


def review_scores(probability: np.ndarray, uncertainty: np.ndarray | None, threshold: float) -> tuple[np.ndarray, str]:
    """(score per patch, higher = review first; what it is)."""
    if uncertainty is not None:
        return np.asarray(uncertainty, np.float64), "seed spread (sd of calibrated probability over seeds)"
    p = np.asarray(probability, np.float64)
    return -np.abs(p - threshold), ("borderline: closeness of the probability to the threshold "
                                    "(one seed, so no seed spread is available)")


def _components(coords: np.ndarray, step: int) -> np.ndarray:
    """Labels of 8-connected components of patches whose top-left corners are ``step`` apart."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    from scipy.spatial import cKDTree

    n = len(coords)
    if n == 1:
        return np.zeros(1, int)
    pairs = cKDTree(coords).query_pairs(r=step * 1.0001, p=np.inf, output_type="ndarray")
    g = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(n, n)) if len(pairs) else coo_matrix((n, n))
    return connected_components(g, directed=False)[1]


def review_feature_collection(coords: np.ndarray, size_level0: int, stride_level0: int, scores: np.ndarray,
                              basis: str, offset: tuple[int, int] = (0, 0), fraction: float = REVIEW_FRACTION,
                              max_regions: int = MAX_REGIONS, slide_id: str = "") -> dict:
    """QuPath FeatureCollection of the top-``fraction`` patches by ``scores``, merged into regions (IDs:
    :func:`milkit.slide.qupath.object_id` of ``slide_id`` and the region: a later round's new regions are new
    objects in QuPath, never the old ones' IDs)."""
    from shapely.geometry import box, mapping
    from shapely.ops import unary_union

    coords = np.asarray(coords, np.int64).reshape(-1, 2)
    scores = np.asarray(scores, np.float64).ravel()
    fc: dict = {"type": "FeatureCollection", "features": [], "properties": {"basis": basis, "fraction": fraction}}
    if not len(coords):
        return fc
    k = max(1, math.ceil(fraction * len(coords)))
    top = np.argsort(-scores, kind="stable")[:k]
    step = int(min(stride_level0 or size_level0, size_level0))
    lab = _components(coords[top], step)
    regions = []
    for c in np.unique(lab):
        idx = top[lab == c]
        regions.append((float(scores[idx].mean()), idx))
    regions.sort(key=lambda t: -t[0])
    from milkit.slide.qupath import object_id

    ox, oy = offset
    for rank, (mean, idx) in enumerate(regions[:max_regions], start=1):
        shape = unary_union([box(int(x) - ox, int(y) - oy, int(x) - ox + size_level0, int(y) - oy + size_level0)
                             for x, y in coords[idx]])
        geom = mapping(shape)
        geometry = {"type": geom["type"], "coordinates": _lists(geom["coordinates"])}
        fc["features"].append({
            "type": "Feature",
            "id": object_id(slide_id, "review", json.dumps(geometry)),
            "geometry": geometry,
            "properties": {
                "objectType": "annotation",
                "name": f"review {rank}",
                "classification": {"name": REVIEW_CLASS[0], "color": list(REVIEW_CLASS[1])},
                "measurements": {"review_score_mean": mean, "review_score_max": float(scores[idx].max()),
                                 "n_patches": int(len(idx))},
                "isLocked": False,
            },
        })
    return fc


def _lists(c):
    """shapely's nested tuples → lists of int/float (JSON)."""
    if isinstance(c, (tuple, list)) and c and isinstance(c[0], (int, float)):
        return [int(v) if float(v).is_integer() else float(v) for v in c]
    return [_lists(x) for x in c]

"""review.geojson (milkit.trust.review): the most uncertain patches merged into QuPath annotations."""

import json

import numpy as np
import pytest

from milkit.trust.review import review_feature_collection, review_scores


def _grid(n: int = 10, size: int = 100):
    xs, ys = np.meshgrid(np.arange(n) * size, np.arange(n) * size)
    return np.stack([xs.ravel(), ys.ravel()], 1)


def test_two_uncertain_blobs_become_two_merged_annotations():
    coords = _grid()
    unc = np.zeros(len(coords))
    blob_a = [(1, 1), (1, 2), (2, 1), (2, 2)]  # 2×2 block, spread 0.3
    blob_b = [(7, 7), (8, 8)]  # two diagonal neighbours (8-connected), spread 0.2
    for (r, c) in blob_a:
        unc[r * 10 + c] = 0.3
    for (r, c) in blob_b:
        unc[r * 10 + c] = 0.2
    scores, basis = review_scores(np.full(len(coords), 0.5), unc, 0.5)
    fc = review_feature_collection(coords, 100, 100, scores, basis, offset=(50, 0), fraction=0.06)
    json.dumps(fc)  # serialisable
    assert fc["type"] == "FeatureCollection" and "seed spread" in fc["properties"]["basis"]
    feats = fc["features"]
    assert len(feats) == 2
    first, second = feats
    for f in feats:
        assert f["properties"]["objectType"] == "annotation"
        assert f["properties"]["classification"]["name"] == "Review" and len(f["properties"]["classification"]["color"]) == 3
    assert first["properties"]["measurements"]["n_patches"] == 4  # ranked by mean spread: blob a first
    assert first["properties"]["measurements"]["review_score_mean"] == pytest.approx(0.3)
    from shapely.geometry import shape

    a = shape(first["geometry"])
    assert a.area == pytest.approx(4 * 100 * 100) and a.geom_type == "Polygon"  # one merged outline
    assert a.bounds == (100 - 50, 100, 300 - 50, 300)  # level-0 pixels minus the bounds offset
    assert shape(second["geometry"]).area == pytest.approx(2 * 100 * 100)


def test_one_seed_reviews_borderline_patches_and_says_so():
    coords = _grid(4)
    p = np.linspace(0, 1, 16)
    scores, basis = review_scores(p, None, threshold=0.4)
    assert "one seed" in basis and "borderline" in basis
    fc = review_feature_collection(coords, 100, 100, scores, basis, fraction=1 / 16)
    (f,) = fc["features"]
    k = int(np.argmin(np.abs(p - 0.4)))
    from shapely.geometry import shape

    assert shape(f["geometry"]).bounds == (coords[k, 0], coords[k, 1], coords[k, 0] + 100, coords[k, 1] + 100)


def test_empty_slide_has_no_regions():
    fc = review_feature_collection(np.zeros((0, 2)), 100, 100, np.zeros(0), "x")
    assert fc["features"] == []


def test_region_ids_follow_the_region_not_its_rank():
    """After a review round the new file's first region is another region: it must not take the old first
    region's QuPath ID (QuPath would take the two for duplicates); the same region keeps its ID."""
    coords = _grid(4)
    basis = "x"

    def first_id(top: int, slide: str = "s1") -> str:
        scores = np.zeros(16)
        scores[top] = 1.0
        return review_feature_collection(coords, 100, 100, scores, basis, fraction=1 / 16, slide_id=slide)["features"][0]["id"]

    assert first_id(3) == first_id(3) and first_id(3) != first_id(12) and first_id(3) != first_id(3, "s2")

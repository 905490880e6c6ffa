"""Tissue detection's OpenCV / labelling steps give the values of the scipy calls they replaced
(median blur, closing by a 3 × 3 square iterated, hole filling), borders included."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from milkit.slide.reader import rgba_to_rgb
from milkit.slide.tissue import close_mask, fill_holes, median_blur

SHAPES = [(1, 9), (3, 3), (5, 5), (9, 1), (37, 53), (64, 64), (100, 7), (257, 190)]


def _blobs(shape: tuple[int, int], seed: int, level: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    m = ndimage.gaussian_filter(rng.random(shape), 1.5) > level
    return m | (rng.random(shape) > 0.97)  # isolated specks, so closing and filling have work


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", [3, 5, 7, 9])
def test_median_blur_equals_scipy_nearest(shape, size):
    img = np.random.default_rng(size).integers(0, 256, shape, dtype=np.uint8)
    want = ndimage.median_filter(img, size=size, mode="nearest")
    assert np.array_equal(median_blur(img, size), want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("iterations", [1, 2, 4])
@pytest.mark.parametrize("level", [0.45, 0.5, 0.55])
def test_close_mask_equals_scipy_binary_closing(shape, iterations, level):
    m = _blobs(shape, iterations, level)
    want = ndimage.binary_closing(m, structure=np.ones((3, 3), bool), iterations=iterations, border_value=0)
    got = close_mask(m, iterations)
    assert got.dtype == bool and np.array_equal(got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("level", [0.45, 0.5, 0.55])
def test_fill_holes_equals_scipy(shape, level):
    m = _blobs(shape, 7, level)
    assert np.array_equal(fill_holes(m), ndimage.binary_fill_holes(m))


def test_fill_holes_fills_an_enclosed_hole_and_not_the_open_background():
    m = np.zeros((9, 9), bool)
    m[2:7, 2:7] = True
    m[4, 4] = False  # a hole
    m[0:3, 0] = True
    got = fill_holes(m)
    assert got[4, 4] and not got[8, 8] and got.sum() == 25 + 3
    assert np.array_equal(fill_holes(np.ones((4, 4), bool)), np.ones((4, 4), bool))
    assert not fill_holes(np.zeros((4, 4), bool)).any()


def test_rgba_to_rgb_opaque_and_transparent():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    a[..., 3] = 255
    assert np.array_equal(rgba_to_rgb(Image.fromarray(a, "RGBA")), a[..., :3])
    a[0, 0, 3] = 0  # one transparent pixel: composited on white
    out = rgba_to_rgb(Image.fromarray(a, "RGBA"))
    assert tuple(out[0, 0]) == (255, 255, 255) and np.array_equal(out[1:], a[1:, :, :3])


def test_read_level_in_bands_equals_one_read(tmp_path):
    from milkit.slide.reader import Slide
    from milkit.slide.synthetic import make_slide

    path = make_slide(tmp_path, "s", True, seed=3, size=(1536, 1280), mpp=0.5).path
    with Slide(path) as s:
        for level in range(s.level_count):
            w, h = s.level_dimensions[level]
            one = s.read_region((0, 0), level, (w, h))
            for threads in (1, 2, 3):
                assert np.array_equal(s.read_level(level, threads), one), (level, threads)

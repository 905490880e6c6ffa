"""Reading slides (OpenSlide), tissue detection and the patch grid."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import tifffile
from PIL import Image

from milkit.slide.reader import Slide, find_slides, open_slide, read_mpp_csv, slide_id
from milkit.slide.synthetic import make_slide
from milkit.slide.tiling import TilingConfig, grid_coords, patch_fractions, tile_slide, tile_slides
from milkit.slide.tissue import TissueConfig, otsu_threshold, tissue_mask

SMALL = {"thumbnail_size": 256}


@pytest.fixture(scope="module")
def lossless(tmp_path_factory):
    """A zlib-compressed slide, so OpenSlide and tifffile must return identical pixels."""
    return make_slide(tmp_path_factory.mktemp("lossless"), "ll", True, seed=3, size=(768, 768), compression="zlib")


def test_openslide_reads_mpp_and_levels(lossless):
    with Slide(lossless.path) as s:
        assert s.dimensions == (768, 768)
        assert s.mpp == pytest.approx(0.25)
        assert s.magnification == pytest.approx(40.0)
        assert s.level_downsamples[:2] == [1.0, 2.0]
        assert s.best_level(2.0) == 1 and s.best_level(1.9) == 0
        assert s.id == "ll"


def test_patch_coordinates_round_trip_between_readers(lossless):
    """Level-0 top-left coords from the h5 address the same pixels in OpenSlide and tifffile,
    at level 0 and at level 1."""
    out = lossless.path.parent / "tiles_rt"
    h5 = tile_slide(lossless.path, out, TilingConfig(patch_size=64, downsample=1.0, tissue=SMALL))
    with h5py.File(h5) as f:
        coords = f["coords"][()]
    assert coords.dtype == np.int64 and len(coords) > 10
    pages = tifffile.TiffFile(lossless.path).pages
    lvl0, lvl1 = pages[0].asarray(), pages[1].asarray()
    with Slide(lossless.path) as s:
        for x, y in coords[[0, len(coords) // 2, -1]]:
            np.testing.assert_array_equal(s.read_patch((x, y), 64, 64), lvl0[y : y + 64, x : x + 64])
            # 128 level-0 px read as 64 px: level 1, whose (x/2, y/2) is the same place
            np.testing.assert_array_equal(
                s.read_patch((x, y), 128, 64), lvl1[y // 2 : y // 2 + 64, x // 2 : x // 2 + 64]
            )


def test_tiling_writes_trident_attrs_and_thumbnail(cohort):
    h5 = cohort.tiles_dir / "s00.h5"
    with h5py.File(h5) as f:
        d = f["coords"]
        a = dict(d.attrs)
        assert d.dtype == np.int64 and d.shape[1] == 2
        frac = f["tissue_fraction"][()]
        coords = d[()]
    for k in ("patch_size", "patch_size_level0", "level0_magnification", "target_magnification", "mpp",
              "target_mpp", "overlap", "level0_width", "level0_height", "coord_space", "coord_origin", "reader",
              "tissue_method", "milkit_version", "name"):
        assert k in a, k
    assert a["patch_size"] == 32 and a["patch_size_level0"] == 64
    assert a["mpp"] == pytest.approx(0.25) and a["target_mpp"] == pytest.approx(0.5)
    assert (a["level0_width"], a["level0_height"]) == (1024, 1024)
    assert (a["bounds_x"], a["bounds_y"]) == (0, 0)  # a TIFF has no bounds offset (MRXS would)
    assert np.all(frac >= 0.25)
    assert np.all(coords % 64 == 0)  # no overlap: grid multiples of the level-0 patch size
    # glass corners are never kept; tissue covers the centre
    assert not any((x < 64 and y < 64) for x, y in coords)
    assert any((x <= 512 < x + 64 and y <= 512 < y + 64) for x, y in coords)
    thumb = Image.open(cohort.tiles_dir / "thumbnails" / "s00.png")
    assert thumb.size[0] > 0


def test_overlap_and_magnification(lossless, tmp_path):
    h5 = tile_slide(lossless.path, tmp_path, TilingConfig(patch_size=32, target_magnification=20, overlap=8, tissue=SMALL))
    with h5py.File(h5) as f:
        a = dict(f["coords"].attrs)
        c = f["coords"][()]
    assert a["patch_size_level0"] == 64 and a["stride_level0"] == 48
    assert np.all(c % 48 == 0)


def test_missing_mpp_is_refused_and_overrides_work(tmp_path):
    s = make_slide(tmp_path, "nompp", False, seed=1, size=(512, 512), mpp=None)
    with Slide(s.path) as sl:
        assert sl.mpp is None and sl.magnification is None
    out = tmp_path / "tiles"
    with pytest.raises(ValueError, match=r"nompp\.tif.*no MPP"):
        tile_slides([s.path], out, TilingConfig(patch_size=32, tissue=SMALL), progress=False)
    assert not list(out.glob("*.h5"))
    with pytest.raises(ValueError, match="no MPP"):
        tile_slides([s.path], out, TilingConfig(patch_size=32, target_magnification=20, tissue=SMALL), progress=False)
    # explicit override, override CSV, or a fixed downsample that needs no physical size
    h5 = tile_slide(s.path, out, TilingConfig(patch_size=32, tissue=SMALL), mpp=0.25)
    with h5py.File(h5) as f:
        assert f["coords"].attrs["patch_size_level0"] == 64
    csv = tmp_path / "mpp.csv"
    csv.write_text("slide_id,mpp\nnompp.tif,0.5\nTCGA-3C-AALI-01Z-00-DX1.F6E9A5DF,0.25\n")
    table = read_mpp_csv(csv)
    assert table == {"nompp": 0.5, "TCGA-3C-AALI-01Z-00-DX1.F6E9A5DF": 0.25}  # a TCGA id keeps its dot
    h5 = tile_slide(s.path, tmp_path / "t2", TilingConfig(patch_size=32, tissue=SMALL), mpp_table=table)
    with h5py.File(h5) as f:
        assert f["coords"].attrs["patch_size_level0"] == 32
    h5 = tile_slide(s.path, tmp_path / "t3", TilingConfig(patch_size=32, downsample=2, tissue=SMALL))
    with h5py.File(h5) as f:
        assert "mpp" not in f["coords"].attrs and f["coords"].attrs["patch_size_level0"] == 64
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_id,mpp\nx,-1\n")
    with pytest.raises(ValueError, match="bad.csv.*positive"):
        read_mpp_csv(bad)


def test_finer_than_level0_is_refused(lossless, tmp_path):
    with pytest.raises(ValueError, match="finer than level 0"):
        tile_slide(lossless.path, tmp_path, TilingConfig(patch_size=32, target_mpp=0.1, tissue=SMALL))
    with pytest.raises(ValueError, match="only one of"):
        TilingConfig(target_mpp=0.5, downsample=2)


def test_truncated_tiff_named_error_and_no_partial_output(tmp_path):
    s = make_slide(tmp_path, "trunc", True, seed=2, size=(768, 768))
    data = s.path.read_bytes()
    s.path.write_bytes(data[: len(data) // 3])
    good = make_slide(tmp_path, "good", False, seed=4, size=(512, 512))
    out = tmp_path / "tiles"
    # every slide is opened before any is tiled: the truncated one is refused and nothing is written
    with pytest.raises(ValueError, match=r"1 of 2 slides cannot be opened, nothing tiled: .*trunc\.tif"):
        tile_slides([good.path, s.path], out, TilingConfig(patch_size=32, tissue=SMALL), progress=False)
    assert not out.exists() or not [p for p in out.rglob("*") if p.is_file()]
    tile_slides([good.path], out, TilingConfig(patch_size=32, tissue=SMALL), progress=False)
    # already tiled slides are not reopened; the bad one still stops the run before it writes
    with pytest.raises(ValueError, match=r"1 of 2 slides cannot be opened"):
        tile_slides([good.path, s.path], out, TilingConfig(patch_size=32, tissue=SMALL), progress=False)
    names = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert "good.h5" in names and not any("trunc" in n for n in names) and not any(n.endswith(".tmp") for n in names)


def test_not_a_slide_and_missing_file(tmp_path):
    p = tmp_path / "x.svs"
    p.write_text("hello")
    with pytest.raises(ValueError, match=r"x\.svs"):
        open_slide(p)
    with pytest.raises(FileNotFoundError, match="nope"):
        find_slides([tmp_path / "nope"])
    assert slide_id("a/b/case1.ome.tiff") == "case1" and slide_id("c.svs") == "c"


def test_otsu_and_tissue_mask_hand_values():
    v = np.array([10] * 50 + [200] * 50, np.uint8)
    t = otsu_threshold(v)
    assert 10 <= t < 200
    img = np.full((64, 64, 3), 240, np.uint8)
    img[16:48, 16:48] = (200, 80, 160)  # saturated square on white glass
    m = tissue_mask(img, TissueConfig(median=1, close=0, min_region_fraction=0.0))
    assert m[16:48, 16:48].all() and m.sum() == 32 * 32
    empty = tissue_mask(np.full((32, 32, 3), 240, np.uint8))
    assert not empty.any()


def test_patch_fractions_and_grid_hand_computed():
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    coords = np.array([[0, 0], [2, 0], [4, 4]])
    # mask downsample 2: a 4-px level-0 patch spans 2 mask pixels
    np.testing.assert_allclose(patch_fractions(mask, 2.0, coords, 4), [1.0, 0.5, 0.0])
    g = grid_coords(10, 8, 4, 3)
    assert g.tolist() == [[0, 0], [3, 0], [6, 0], [0, 3], [3, 3], [6, 3]]
    assert grid_coords(3, 3, 4, 4).shape == (0, 2)


def test_a_slide_tiled_with_other_settings_is_refused_not_silently_kept(tmp_path):
    """Re-running `milkit tile` into the same --out skips slides tiled as asked (resume), but one
    tiled with another patch size, resolution or tissue rule is an error naming the file and the
    setting, before any slide is written; --overwrite re-tiles."""
    s = make_slide(tmp_path / "slides", "a", positive=False, seed=0, size=(512, 512), mpp=0.25)
    b = make_slide(tmp_path / "slides", "b", positive=False, seed=1, size=(512, 512), mpp=0.25)
    cfg = TilingConfig(patch_size=32, target_mpp=0.5)
    out = tmp_path / "tiles"
    tile_slides([s.path], out, cfg, progress=False)
    before = (out / "a.h5").stat().st_mtime_ns
    tile_slides([s.path], out, cfg, progress=False)  # same settings: kept as it is
    assert (out / "a.h5").stat().st_mtime_ns == before
    for other, named in ((TilingConfig(patch_size=64, target_mpp=0.5), "patch_size 32 (asked: 64)"),
                         (TilingConfig(patch_size=32, target_mpp=1.0), "target_mpp 0.5 (asked: 1.0)"),
                         (TilingConfig(patch_size=32, target_mpp=0.5, tissue_fraction=0.5),
                          "tissue_fraction_threshold 0.25 (asked: 0.5)")):
        with pytest.raises(ValueError, match=r"a\.h5: already tiled with other settings \(" + re.escape(named)):
            tile_slides([b.path, s.path], out, other, progress=False)
        assert not (out / "b.h5").exists()  # checked before the first slide was tiled
    tile_slides([s.path], out, TilingConfig(patch_size=64, target_mpp=0.5), overwrite=True, progress=False)
    with h5py.File(out / "a.h5", "r") as f:
        assert int(f["coords"].attrs["patch_size"]) == 64


def test_find_slides_reads_gdc_download_folders_and_skips_macos_resource_forks(tmp_path, caplog):
    """GDC's client puts each slide in a folder named by its file UUID; a drive written by a Mac holds
    ``._<name>.svs`` resource forks beside each slide. Before, the first gave "no slide files" and the second
    was opened as a slide."""
    import logging

    gdc = tmp_path / "gdc"
    for uuid, name in (("0a1b", "TCGA-A1.svs"), ("9f8e", "TCGA-B2.svs")):
        (gdc / uuid).mkdir(parents=True)
        (gdc / uuid / name).write_bytes(b"x")
        (gdc / uuid / f"._{name}").write_bytes(b"x")
        (gdc / uuid / "annotations.txt").write_text("")
    with caplog.at_level(logging.INFO, logger="milkit.slide.reader"):
        found = find_slides([gdc])
    assert [p.name for p in found] == ["TCGA-A1.svs", "TCGA-B2.svs"]
    assert "found in its subfolders" in caplog.text
    flat = tmp_path / "flat"
    (flat / "old").mkdir(parents=True)
    (flat / "a.svs").write_bytes(b"x")
    (flat / "old" / "b.svs").write_bytes(b"x")
    assert [p.name for p in find_slides([flat])] == ["a.svs"]  # a folder with slides is not searched deeper
    (gdc / "copy").mkdir()
    (gdc / "copy" / "TCGA-A1.svs").write_bytes(b"x")
    with pytest.raises(ValueError, match="slide id 'TCGA-A1' also used by"):
        find_slides([gdc])

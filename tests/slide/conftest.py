"""A small synthetic cohort shared by the slide tests: 10 pyramidal TIFF slides (even ids
carry a lesion and its ASAP XML), tiled and with tiny-CNN features."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from milkit.slide.extract import extract_dir
from milkit.slide.synthetic import SyntheticSlide, make_slide
from milkit.slide.tiling import TilingConfig, tile_slides

SIZE = (1024, 1024)
LESION_SCALE = 0.12
MPP = 0.25
#: 32 px at 0.5 µm/px = 64 level-0 px
TILING = TilingConfig(patch_size=32, target_mpp=0.5, tissue={"thumbnail_size": 256})
SPLITS = ["train"] * 6 + ["val"] * 2 + ["test"] * 2


@dataclass
class Cohort:
    root: Path
    slides: list[SyntheticSlide]
    slides_dir: Path
    ann_dir: Path
    tiles_dir: Path
    labels_csv: Path


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Cohort:
    root = tmp_path_factory.mktemp("cohort")
    slides_dir, ann_dir = root / "slides", root / "annotations"
    ann_dir.mkdir()
    slides = []
    rows = ["slide_id,label,split"]
    for i in range(10):
        s = make_slide(slides_dir, f"s{i:02d}", positive=i % 2 == 0, seed=i, size=SIZE, mpp=MPP, lesion_scale=LESION_SCALE)
        if s.annotation is not None:
            shutil.move(s.annotation, ann_dir / s.annotation.name)
            s.annotation = ann_dir / s.annotation.name
        slides.append(s)
        rows.append(f"s{i:02d},{int(i % 2 == 0)},{SPLITS[i]}")
    labels = root / "labels.csv"
    labels.write_text("\n".join(rows) + "\n")
    tiles = root / "tiles"
    tile_slides([s.path for s in slides], tiles, TILING, progress=False)
    extract_dir(tiles, "tiny_cnn", "none", num_workers=0, batch_size=128, progress=False)
    return Cohort(root, slides, slides_dir, ann_dir, tiles, labels)

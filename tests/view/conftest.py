"""A tiny labelled cohort for the viewer tests: three slides of real IHC tissue (two with a
DAB-stained lesion; milkit.slide.synthetic.make_ihc_slide),
tiled, with patch scores that follow the lesion (a stand-in for a trained model: these
tests check what the viewer draws, not a model), written by milkit.slide.outputs. Slide
s02 is a stripped pyramid with SubIFD levels that OpenSlide cannot open (tifffile path)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import tifffile

from milkit.slide.annotations import patch_tumour_fraction, read_asap_xml
from milkit.slide.outputs import SlideScores, write_slide_outputs
from milkit.slide.synthetic import make_ihc_slide, render_ihc_slide
from milkit.slide.tiling import TilingConfig, tile_slides

SIZE = (1024, 1024)
PS0 = 64  # 32 px at 0.5 µm/px on a 0.25 µm/px slide
#: the verdict the labels carry, as milkit label records it (meta.trust)
TRUST_RULE = "fewer than 10 validation slides of a class: too few to check"


@dataclass
class ViewCohort:
    root: Path
    slides_dir: Path
    ann_dir: Path
    labels_dir: Path
    lesions: dict  # slide id → (K, 2) polygon or None


def _strip_pyramid(path: Path, img: np.ndarray) -> None:
    with tifffile.TiffWriter(path) as t:
        t.write(img, subifds=2, photometric="rgb", compression="zlib", rowsperstrip=64)
        t.write(img[::2, ::2], subfiletype=1, photometric="rgb", compression="zlib", rowsperstrip=64)
        t.write(img[::4, ::4], subfiletype=1, photometric="rgb", compression="zlib", rowsperstrip=64)


@pytest.fixture(scope="session")
def view_cohort(tmp_path_factory) -> ViewCohort:
    root = tmp_path_factory.mktemp("view")
    slides_dir, ann_dir, labels_dir = root / "slides", root / "annotations", root / "labels"
    ann_dir.mkdir()
    lesions = {}
    for i, positive in enumerate([True, False, True]):
        s = make_ihc_slide(slides_dir, f"s{i:02d}", positive=positive, seed=i, size=SIZE, mpp=0.25, lesion_scale=0.14)
        if s.annotation is not None:
            shutil.move(s.annotation, ann_dir / s.annotation.name)
        lesions[f"s{i:02d}"] = s.lesion
    tiles = root / "tiles"
    cfg = TilingConfig(patch_size=32, target_mpp=0.5, tissue={"method": "fixed", "threshold": 15, "thumbnail_size": 256})
    tile_slides(sorted(slides_dir.glob("*.tif")), tiles, cfg, progress=False)
    # s02 again, as a pyramid only tifffile reads (same pixels, same geometry)
    img = render_ihc_slide(SIZE, lesions["s02"], 2)
    (slides_dir / "s02.tif").unlink()
    _strip_pyramid(slides_dir / "s02.tif", img)
    import h5py

    rng = np.random.default_rng(0)
    for sid, lesion in lesions.items():
        with h5py.File(tiles / f"{sid}.h5", "r") as f:
            coords = f["coords"][()]
        frac = np.zeros(len(coords)) if lesion is None else patch_tumour_fraction(
            read_asap_xml(ann_dir / f"{sid}.xml"), coords, PS0)
        scores = np.clip(0.1 + 0.8 * frac + rng.normal(0, 0.05, len(coords)), 0, 1)
        s = SlideScores(sid, coords, scores, (scores >= 0.5).astype(np.int64), 0.5, "probability", PS0, PS0, SIZE,
                        0.25, float(scores.max()), meta={"slide": str(slides_dir / f"{sid}.tif"),
                                                         "threshold_source": "test", "stage": "mil",
                                                         "trust": {"verdict": "uncertain", "rule": TRUST_RULE}})
        write_slide_outputs(labels_dir, s, None, 1.0)
    # s02 as the trust issue writes it: calibrated probabilities and uncertainty per patch
    with h5py.File(labels_dir / "s02" / "instances.h5", "a") as f:
        f["probability"] = np.clip(f["score"][()] ** 2, 0, 1).astype(np.float32)
        f["uncertainty"] = np.full(len(f["score"]), 0.125, np.float32)
    # review regions for s00 (the trust issue's review.geojson): one square
    (labels_dir / "s00" / "review.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[100, 100], [300, 100], [300, 300],
                                                                           [100, 300], [100, 100]]]},
         "properties": {"reason": "uncertain"}}]}))
    return ViewCohort(root, slides_dir, ann_dir, labels_dir, lesions)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def server(view_cohort):
    """``milkit view`` in a subprocess on a free port; yields the base URL."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "milkit.cli", "view", str(view_cohort.labels_dir), "--slides",
         str(view_cohort.slides_dir), "--annotations", str(view_cohort.ann_dir), "--port", str(port), "--no-browser"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300  # startup imports torch (milkit.io); slow on a loaded machine
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"milkit view exited {proc.returncode}: {proc.stdout.read()}")
        try:
            urllib.request.urlopen(url + "/api/slides", timeout=5).read()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        raise RuntimeError("milkit view did not answer within 300 s")
    yield url
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()

"""Everything ``milkit label --slides`` writes for one slide, atomically, in ``OUT/<slide_id>/``:

- ``instances.csv``  x, y (level-0 top-left), score (raw), probability (calibrated on
  validation), uncertainty (seed spread; empty with one seed: unavailable), label, criterion
- ``instances.h5``   coords, score, probability, [uncertainty], label + attrs (threshold, its
  criterion and what it applies to, calibration source, score kind, geometry, stage)
- ``heatmap.png``    calibrated probability over the thumbnail on the fixed scale [0, 1]
  (coolwarm, alpha 0.5) with a colour bar; a negative slide looks cold
- ``probability.tif`` pyramidal tiled TIFF of the probability aligned with level 0
  (milkit.slide.heatmap; the scale is in its ImageDescription)
- ``detections.geojson`` QuPath FeatureCollection: one detection square per positive patch
- ``outlines.geojson`` QuPath annotations: the merged positive region (milkit.slide.qupath)
- ``outlines.xml`` the same region as Camelyon16/ASAP XML (holes as ``Exclusion`` polygons)
- ``review.geojson`` QuPath annotations of the most uncertain regions (milkit.trust.review)

Runs written before calibration existed (no ``calibration.json``) have no probability for
raw scores; their maps fall back to the per-slide 1st–99th percentile normalisation and the
TIFF description says so.
"""

from __future__ import annotations

import csv
import io as _io
import json
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from milkit import io
from milkit.slide.annotations import patch_feature_collection, write_asap_region
from milkit.slide.qupath import positive_region, write_outlines
from milkit.slide.heatmap import normalise_scores, overlay, score_raster, with_colorbar, write_probability_tiff
from milkit.trust.review import REVIEW_FRACTION, review_feature_collection, review_scores


#: every file :func:`write_slide_outputs` may write in a slide's folder (the module docstring)
LABEL_FILES = ("instances.csv", "instances.h5", "probability.tif", "detections.geojson", "outlines.geojson",
               "outlines.xml", "review.geojson", "heatmap.png")


@dataclass
class SlideScores:
    """One slide's patch scores and the geometry needed to draw them."""

    slide_id: str
    coords: np.ndarray  # (N, 2) level-0 top-left
    scores: np.ndarray  # (N,) raw instance scores
    labels: np.ndarray  # (N,) 0/1 at ``threshold``
    threshold: float
    score_kind: str  # "probability" or "score"
    size_level0: int
    stride_level0: int
    level0_size: tuple[int, int]
    mpp: float | None
    bag_prob: float
    bounds_offset: tuple[int, int] = (0, 0)
    meta: dict = field(default_factory=dict)
    probability: np.ndarray | None = None  # (N,) calibrated on validation
    uncertainty: np.ndarray | None = None  # (N,) seed spread; None with one seed (unavailable)
    threshold_criterion: str = ""
    calibration: str = ""

    def uncertainty_note(self) -> str:
        return ("seed spread: sd of the calibrated probability over seed replicas" if self.uncertainty is not None
                else "unavailable: one seed (train with --seeds K for a seed spread)")


def write_instances_csv(path: Path, s: SlideScores) -> None:
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["slide_id", "x", "y", "score", "probability", "uncertainty", "label", "criterion"])

    def fmt(a, k: int) -> str:
        return "" if a is None else f"{float(a[k]):.6g}"

    for k, ((x, y), sc, lab) in enumerate(zip(s.coords, s.scores, s.labels)):
        w.writerow([s.slide_id, int(x), int(y), f"{float(sc):.6g}", fmt(s.probability, k), fmt(s.uncertainty, k),
                    int(lab), s.threshold_criterion])
    io.write_text(path, buf.getvalue())


def write_instances_h5(path: Path, s: SlideScores) -> None:
    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("coords", data=np.asarray(s.coords, np.int64).reshape(-1, 2))
            f.create_dataset("score", data=np.asarray(s.scores, np.float32))
            f.create_dataset("label", data=np.asarray(s.labels, np.uint8))
            if s.probability is not None:
                f.create_dataset("probability", data=np.asarray(s.probability, np.float32))
            if s.uncertainty is not None:
                f.create_dataset("uncertainty", data=np.asarray(s.uncertainty, np.float32))
            a = f.attrs
            a["uncertainty"] = s.uncertainty_note()
            a["threshold_criterion"] = s.threshold_criterion
            a["calibration"] = s.calibration
            a["slide_id"] = s.slide_id
            a["threshold"] = float(s.threshold)
            a["score_kind"] = s.score_kind
            a["patch_size_level0"] = int(s.size_level0)
            a["stride_level0"] = int(s.stride_level0)
            a["level0_width"], a["level0_height"] = int(s.level0_size[0]), int(s.level0_size[1])
            if s.mpp is not None:  # unknown: the attribute is left out, never the string 'None'
                a["mpp"] = float(s.mpp)
            a["bag_prob"] = float(s.bag_prob)
            a["bounds_x"], a["bounds_y"] = int(s.bounds_offset[0]), int(s.bounds_offset[1])
            a["coord_space"], a["coord_origin"] = "level0", "top_left"
            a["meta"] = json.dumps(s.meta, default=str)

    io.write_with(path, write)


def read_instances_h5(path: str | Path) -> SlideScores:
    """Read back what :func:`write_instances_h5` wrote (named errors)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            for k in ("coords", "score", "label"):
                if k not in f:
                    raise ValueError(f"{path}: no {k!r} dataset (not a milkit instance-labels file)")
            a = dict(f.attrs)
            coords, scores, labels = f["coords"][()], f["score"][()], f["label"][()]
            prob = np.asarray(f["probability"][()], np.float64) if "probability" in f else None
            unc = np.asarray(f["uncertainty"][()], np.float64) if "uncertainty" in f else None
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from None
    if not (len(coords) == len(scores) == len(labels)):
        raise ValueError(f"{path}: coords, score and label lengths differ")

    def s(k):
        v = a[k]
        return v.decode() if isinstance(v, bytes) else v

    mpp = s("mpp") if "mpp" in a else None
    return SlideScores(
        slide_id=str(s("slide_id")), coords=np.asarray(coords, np.int64), scores=np.asarray(scores, np.float64),
        labels=np.asarray(labels, np.int64), threshold=float(a["threshold"]), score_kind=str(s("score_kind")),
        size_level0=int(a["patch_size_level0"]), stride_level0=int(a["stride_level0"]),
        level0_size=(int(a["level0_width"]), int(a["level0_height"])),
        mpp=None if mpp in (None, "None") else float(mpp), bag_prob=float(a["bag_prob"]),
        bounds_offset=(int(a.get("bounds_x", 0)), int(a.get("bounds_y", 0))),
        meta=json.loads(s("meta")) if "meta" in a else {},
        probability=prob, uncertainty=unc,
        threshold_criterion=str(s("threshold_criterion")) if "threshold_criterion" in a else "",
        calibration=str(s("calibration")) if "calibration" in a else "",
    )


def write_slide_outputs(out_dir: Path, s: SlideScores, thumb: np.ndarray | None, thumb_downsample: float,
                        review_fraction: float = REVIEW_FRACTION) -> list[Path]:
    """All per-slide outputs; returns their paths. ``review_fraction``: the share of the slide's
    patches ``review.geojson`` outlines."""
    d = Path(out_dir) / s.slide_id
    if s.probability is not None:
        norm = np.clip(np.asarray(s.probability, np.float64), 0, 1)
        how = {"value": "calibrated probability", "normalisation": "none (one fixed scale for every slide)",
               "calibration": s.calibration}
    else:
        norm, how = normalise_scores(s.scores, s.score_kind)
    raster, cell = score_raster(s.coords, norm, s.size_level0, s.stride_level0, s.level0_size)
    paths = [d / "instances.csv", d / "instances.h5", d / "probability.tif", d / "detections.geojson",
             d / "review.geojson"]
    write_instances_csv(paths[0], s)
    write_instances_h5(paths[1], s)
    write_probability_tiff(paths[2], raster, cell, s.level0_size, s.mpp,
                           {"slide_id": s.slide_id, "score_kind": s.score_kind, **how})
    fc = patch_feature_collection(s.coords, s.scores, s.labels, s.size_level0, s.bounds_offset,
                                  score_name="probability" if s.score_kind == "probability" else "score",
                                  slide_id=s.slide_id)
    if s.probability is not None:  # the calibrated probability beside the raw score
        for f, k in zip(fc["features"], np.flatnonzero(np.asarray(s.labels) > 0)):
            f["properties"]["measurements"]["calibrated_probability"] = float(s.probability[k])
    io.write_text(paths[3], json.dumps(fc))
    paths.append(write_outlines(d / "outlines.geojson", s.coords, s.labels, s.size_level0, s.bounds_offset,
                                s.slide_id))
    paths.append(write_asap_region(d / "outlines.xml", positive_region(s.coords, s.labels, s.size_level0)))
    rs, basis = review_scores(s.probability if s.probability is not None else s.scores, s.uncertainty, s.threshold)
    io.write_text(paths[4], json.dumps(review_feature_collection(s.coords, s.size_level0, s.stride_level0, rs,
                                                                 basis, s.bounds_offset, fraction=review_fraction,
                                                                 slide_id=s.slide_id)))
    if thumb is not None:
        img = overlay(thumb, thumb_downsample, raster, cell)
        if s.probability is not None:
            img = with_colorbar(img)
        p = d / "heatmap.png"
        io.write_with(p, lambda tmp: img.save(tmp, format="PNG", compress_level=3))
        paths.append(p)
    return paths


def no_slide_labels(labels_dir: Path) -> ValueError:
    """The error for a labels folder without ``<slide>/instances.h5``, naming what it holds instead: the
    pixel-map labels of a segmentation run (``<stage>/masks``, ``prob``, ``overlay``), or nothing."""
    labels_dir = Path(labels_dir)
    stages = sorted(p.parent.name for p in labels_dir.glob("*/masks") if p.is_dir())
    if stages:
        return ValueError(f"{labels_dir}: pixel-map labels of images (stage {stages[0]}: masks/, prob/, overlay/ PNGs), "
                          f"not patch labels of slides; open {labels_dir / stages[0] / 'overlay'} or the run's report.html")
    return ValueError(f"{labels_dir}: no <slide>/instances.h5 (run 'milkit label RUN --slides … / --features …' first)")

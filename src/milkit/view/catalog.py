"""What ``milkit view`` shows, read lazily: the slide list from ``LABELS_DIR/*/instances.h5``
(attributes and label counts only; patch AUROC/F1 against ``--annotations`` from the run's
``metrics.json`` when ``milkit evaluate`` wrote them, else computed in a background thread
while the page is already usable), and, per slide on first request, its patches, slide
tiles, heatmap tiles, annotation outlines and review regions (a small LRU of open slides)."""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import h5py
import numpy as np

from milkit.slide.cohort import is_labelling_run, metrics_file, slide_info, split_of
from milkit.slide.outputs import no_slide_labels
from milkit.view.colors import display_values

log = logging.getLogger(__name__)
OPEN_SLIDES = 8


@dataclass
class SlideData:
    """One slide's patches and layers, built on first request."""

    sid: str
    payload: dict  # JSON sent to the page
    tiles: object | None  # milkit.view.tiles.SlideTiles
    heat: object  # milkit.view.tiles.HeatTiles


def _with_true_label(row: dict) -> dict:
    """The row with NaN/inf as None (JSON has no NaN) and, without run labels, the true label
    from the annotation (a slide with tumour patches is positive)."""
    if row["true_label"] is None and row["n_tumour_patches"] is not None:
        row["true_label"] = int(row["n_tumour_patches"] > 0)
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in row.items()}


def _attr(a, k, default=None):
    v = a.get(k, default)
    return v.decode() if isinstance(v, bytes) else v


class Catalog:
    def __init__(self, labels_dir: Path, slides_dir: Path | None = None, annotations_dir: Path | None = None,
                 run_dir: Path | None = None):
        self.labels_dir = Path(labels_dir)
        if not self.labels_dir.is_dir():
            raise FileNotFoundError(f"{self.labels_dir}: labels folder does not exist")
        self.files = {p.parent.name: p for p in sorted(self.labels_dir.glob("*/instances.h5"))}
        if not self.files:
            raise no_slide_labels(self.labels_dir)
        for opt, d in (("--slides", slides_dir), ("--annotations", annotations_dir)):
            if d is not None and not Path(d).is_dir():
                raise FileNotFoundError(f"{opt} {d}: folder does not exist")
        self.slides_dir = Path(slides_dir) if slides_dir else None
        self.annotations_dir = Path(annotations_dir) if annotations_dir else None
        self.run_dir = Path(run_dir) if run_dir else None
        self._slide_paths: dict[str, Path] | None = None
        self._list: list[dict] | None = None
        self._open: OrderedDict[str, SlideData] = OrderedDict()
        self._lock = threading.Lock()
        self.pending = 0  # slides whose patch metrics the background thread has still to compute
        #: per (run, stage) the labels come from: the stage's trust verdict and rule as ``milkit label`` recorded them
        self.trust: list[dict] = []
        self._filled = threading.Event()
        self._filled.set()
        self._list_lock = threading.Lock()

    # -- the list ------------------------------------------------------------------
    def _run_of(self, meta: dict) -> Path | None:
        if self.run_dir is not None:
            return self.run_dir
        r = meta.get("run_dir")
        return Path(r) if r and is_labelling_run(Path(r)) else None  # a run or a cross-validation folder

    def slide_list(self, wait: bool = False) -> list[dict]:
        """id, split, true label, slide probability, patch counts, and patch AUROC/F1 where
        annotations exist (from the run's metrics.json when ``evaluate`` wrote them, else filled
        in by a background thread: :attr:`pending` counts what is left; ``wait`` waits for it)."""
        with self._list_lock:  # two first requests build it once
            if self._list is None:
                self._list = self._build_list()
        if wait:
            self._filled.wait()
        return self._list

    def _build_list(self) -> list[dict]:
        rows, infos, evaluated, todo, verdicts = [], {}, {}, [], {}
        for sid, f in self.files.items():
            with h5py.File(f, "r") as h:
                a = dict(h.attrs)
                n = int(h["label"].shape[0])
                npos = int(np.asarray(h["label"][()]).sum())
            meta = json.loads(_attr(a, "meta", "{}") or "{}")
            run = self._run_of(meta)
            verdicts.setdefault((str(meta.get("run_dir", "")), str(meta.get("stage", ""))), []).append(
                (sid, meta.get("trust") or {}))
            key = str(run)
            if key not in infos:
                infos[key] = slide_info(run) if run else {}
                mf = metrics_file(run) if run else None
                m = json.loads(mf.read_text()) if mf is not None and mf.is_file() else {}
                ev_all = m.get("annotations") or {}
                same = self.annotations_dir is None or (
                    ev_all.get("annotations_dir") and Path(ev_all["annotations_dir"]).resolve() == self.annotations_dir.resolve()
                    and Path(ev_all.get("labels_dir", "")).resolve() == self.labels_dir.resolve())
                evaluated[key] = ev_all.get("per_slide", {}) if same else {}
            info = infos[key]
            row = {"id": sid, "split": split_of(info, sid), "true_label": info[sid].label if sid in info else None,
                   "bag_prob": float(a.get("bag_prob", np.nan)), "n_patches": n, "n_positive": npos,
                   "patch_auroc": None, "patch_f1": None, "n_tumour_patches": None}
            ev = evaluated[key].get(sid)
            if ev:  # what 'milkit evaluate --annotations' wrote for these labels and annotations
                row.update(patch_auroc=ev.get("instance_auroc"), patch_f1=ev.get("instance_f1"),
                           n_tumour_patches=ev.get("n_tumour_patches"))
            elif self.annotations_dir is not None:
                todo.append((len(rows), sid, f))
            rows.append(_with_true_label(row))
        self.trust = [{"run_dir": r, "stage": st, "verdict": (v[0][1] or {}).get("verdict"),
                       "rule": (v[0][1] or {}).get("rule"), "n_slides": len(v)} for (r, st), v in verdicts.items()]
        if todo:
            self.pending = len(todo)
            self._filled.clear()
            threading.Thread(target=self._fill, args=(rows, todo), daemon=True, name="milkit-view-metrics").start()
        return rows

    def _fill(self, rows: list[dict], todo: list[tuple[int, str, Path]]) -> None:
        """Patch AUROC/F1 of each slide against its annotation, one slide at a time."""
        try:
            for i, sid, f in todo:
                try:
                    m = self._patch_metrics(sid, f, rows[i].get("true_label"))
                except (OSError, ValueError, KeyError) as err:
                    log.warning("%s: patch metrics not computed (%s)", f, err)
                    m = {}
                rows[i] = _with_true_label(dict(rows[i], **m))
                self.pending -= 1
        finally:
            self.pending = 0
            self._filled.set()

    def _regions(self, sid: str, offset: tuple[int, int]):
        from milkit.slide.annotations import find_annotation, read_annotations

        if self.annotations_dir is None:
            return None, []
        ann = find_annotation(self.annotations_dir, sid)
        return ann, (read_annotations(ann, offset=offset) if ann is not None else [])

    def _patch_metrics(self, sid: str, f: Path, true_label: int | None = None) -> dict:
        """Patch AUROC/F1 against the annotation; none for a positive slide without one (unknown)."""
        from milkit.metrics.classification import auroc, binary_metrics
        from milkit.slide.annotations import slide_patch_labels
        from milkit.slide.outputs import read_instances_h5

        s = read_instances_h5(f)
        ann, regions = self._regions(sid, s.bounds_offset)
        y = slide_patch_labels(ann, true_label, s.coords, s.size_level0, 0.5, regions, s.level0_size)
        known = y >= 0  # unknown: a positive slide without annotation, or outside its reviewed regions
        if not known.any():
            return {}
        y, score, lab = y[known], np.asarray(s.scores)[known], np.asarray(s.labels)[known]
        f1 = binary_metrics(y, lab, 0.5)["f1"] if (y.any() or lab.any()) else None  # 0/0: no tumour, none called
        return {"patch_auroc": auroc(y, score), "patch_f1": f1,
                "n_tumour_patches": int(y.sum())}

    # -- one slide -----------------------------------------------------------------
    def slide_path(self, sid: str, meta: dict) -> Path | None:
        if self.slides_dir is not None:
            if self._slide_paths is None:
                from milkit.slide.reader import find_slides, slide_id

                self._slide_paths = {slide_id(p): p for p in find_slides([self.slides_dir])}
            return self._slide_paths.get(sid)
        p = meta.get("slide")
        return Path(p) if p and Path(p).is_file() else None

    def get(self, sid: str) -> SlideData:
        if sid not in self.files:
            raise KeyError(sid)
        with self._lock:
            if sid in self._open:
                self._open.move_to_end(sid)
                return self._open[sid]
            data = self._load(sid)
            self._open[sid] = data
            while len(self._open) > OPEN_SLIDES:
                _, old = self._open.popitem(last=False)
                if old.tiles is not None:
                    old.tiles.close()
            return data

    def _load(self, sid: str) -> SlideData:
        from milkit.slide.outputs import read_instances_h5
        from milkit.view.tiles import HeatTiles, SlideTiles

        f = self.files[sid]
        s = read_instances_h5(f)
        extra = {}
        with h5py.File(f, "r") as h:
            for k in ("probability", "uncertainty"):
                if k in h:
                    extra[k] = np.asarray(h[k][()], np.float64)
        values, what = display_values(s.scores, s.score_kind, extra.get("probability"))
        thr = float(s.threshold)
        if "probability" in extra:
            thr_v = 0.5
        elif s.score_kind == "probability":
            thr_v = float(np.clip(thr, 0, 1))
        else:  # the validation threshold on the raw score, mapped like the values
            from milkit.slide.heatmap import normalise_scores

            _, how = normalise_scores(s.scores, s.score_kind)
            lo, hi = how.get("low", 0.0), how.get("high", 1.0)
            thr_v = float(np.clip((thr - lo) / (hi - lo), 0, 1)) if hi > lo else 0.5
        path = self.slide_path(sid, s.meta)
        tiles, tile_error = None, None
        if path is not None:
            try:
                tiles = SlideTiles(path)
            except ValueError as err:
                tile_error = str(err)
                log.warning("%s", err)
        ann, regions = self._regions(sid, s.bounds_offset)
        ox, oy = s.bounds_offset
        annotations = [{"positive": r.positive, "reviewed": r.reviewed, "name": r.name,
                        "rings": [(r.exterior).round(1).tolist()] + [h.round(1).tolist() for h in r.holes]}
                       for r in regions]
        payload = {
            "id": sid, "width": s.level0_size[0], "height": s.level0_size[1], "mpp": s.mpp,
            "patch_size": s.size_level0, "score_kind": s.score_kind, "value_source": what,
            "threshold": thr_v, "threshold_raw": thr, "threshold_source": s.meta.get("threshold_source"),
            "coords": s.coords.tolist(), "values": np.round(values, 5).tolist(),
            "scores": np.round(s.scores, 6).tolist(),
            "probability": None if "probability" not in extra else np.round(extra["probability"], 5).tolist(),
            "uncertainty": None if "uncertainty" not in extra else np.round(extra["uncertainty"], 5).tolist(),
            "bag_prob": s.bag_prob, "annotation_file": str(ann) if ann else None, "annotations": annotations,
            "review": self._review(f.parent / "review.geojson", (ox, oy)),
            "slide_tiles": f"/slide/{quote(sid, safe='')}.dzi" if tiles is not None else None,  # ids may hold # or %
            "slide_backend": tiles.backend if tiles is not None else None,
            "slide_error": tile_error if tiles is None and path is not None else (
                None if path is not None else "slide file not found (pass --slides DIR)"),
            "heat_tiles": f"/heat/{quote(sid, safe='')}.dzi",
        }
        heat = HeatTiles(s.coords, values, s.size_level0, s.stride_level0, s.level0_size)
        return SlideData(sid, payload, tiles, heat)

    @staticmethod
    def _review(path: Path, offset: tuple[int, int]) -> list[dict]:
        """Review regions (the trust issue's ``review.geojson``) as rings in level-0 pixels."""
        if not path.is_file():
            return []
        try:
            from shapely.geometry import shape

            fc = json.loads(path.read_text())
            out = []
            for feat in fc.get("features", []) if isinstance(fc, dict) else []:
                g = shape(feat["geometry"])
                props = feat.get("properties") or {}
                for p in getattr(g, "geoms", [g]):
                    if p.geom_type != "Polygon":
                        continue
                    rings = [np.asarray(p.exterior.coords) + offset] + [np.asarray(i.coords) + offset for i in p.interiors]
                    out.append({"rings": [r.round(1).tolist() for r in rings],
                                "note": str(props.get("reason") or props.get("name") or "")})
            return out
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("%s: review regions not readable (%s)", path, err)
            return []

"""``milkit label RUN_DIR --slides ...`` and ``milkit evaluate RUN_DIR --annotations DIR``.

Labelling: a trained run's labeler (the seed ensemble when the run has K > 1 seeds; for a ``--folds`` folder
the fold that tested the slide or the folds' ensemble, :mod:`milkit.slide.label_source`) scores
every patch of each slide's feature h5: raw score, validation-calibrated probability and,
for ensembles, the seed spread; the instance threshold (on the probability) is the one
chosen on validation at training time (threshold.json, with its criterion).
Evaluation: the patch labels written by ``label`` are scored against ASAP XML / GeoJSON
annotations (a patch is positive iff its tumour fraction ≥ 0.5, Camelyon16 convention,
Sm App. B; a slide without an annotation file is all negative, as Camelyon16's normal
slides are). Instance AUROC on raw scores, F1/accuracy at the written labels.
"""

from __future__ import annotations

import csv
import io as _io
import json
import logging
from pathlib import Path

import numpy as np
import torch

from milkit import io
from milkit.data.bag import Bag, collate_bags
from milkit.data.features import (check_h5_features, check_h5_values, coordinate_step, h5_attrs, index_feature_files,
                                  level0_patch_size, read_h5_features)
from milkit.metrics.classification import auroc, binary_metrics, nan_to_none
from milkit.report import ScoreSet, write_report
from milkit.run_dir import RunDir
from milkit.slide.annotations import find_annotation, read_annotations, slide_patch_labels
from milkit.slide.outputs import LABEL_FILES, SlideScores, no_slide_labels, read_instances_h5, write_slide_outputs
from milkit.slide.progress import track
from milkit.slide.reader import find_slides, open_slide

log = logging.getLogger(__name__)

#: Camelyon16 patch label: tumour fraction ≥ 0.5 (Sm App. B; issue #3)
TUMOUR_FRACTION = 0.5


def _stride(coords: np.ndarray, attrs: dict, ps0: int) -> int:
    v = attrs.get("stride_level0")
    if v not in (None, "None"):
        return int(v)
    step = coordinate_step(coords)
    return step if step is not None else ps0


def _threshold(labeler, scores: np.ndarray, record: dict | None = None,
               where: str = "threshold.json") -> tuple[float, str]:
    """(threshold, where it came from); ``scores`` are the values it applies to; ``record`` is the
    stage's threshold.json (its ``source`` says whether validation patch labels chose it); ``where``
    names the threshold's origin (a cross-validation ensemble's is the median of its folds')."""
    if labeler.threshold is not None:
        source = (record or {}).get("source")
        return float(labeler.threshold), f"{where} ({source})" if source else f"validation ({where})"
    if labeler.threshold_on == "probability":
        return 0.5, "default 0.5 (no validation threshold)"
    return float(np.median(scores)) if scores.size else 0.0, "slide median (no validation threshold)"


def _attr_value(attrs: dict, key: str) -> object | None:
    v = attrs.get(key)
    return None if v is None or (isinstance(v, str) and v in ("", "None")) else v


def feature_files(features_dir: Path) -> list[Path]:
    """Every ``<slide>.h5`` of a features folder (or of its CLAM ``h5_files/``), sorted."""
    files = sorted(p for p in index_feature_files(features_dir, "h5").values() if p.is_file())
    if not files:
        from milkit.data.features import feature_subfolder_hint

        raise FileNotFoundError(f"{features_dir}: no <slide>.h5 feature files to label"
                                + feature_subfolder_hint(features_dir).replace("data.features_dir", "--features"))
    return files


def _h5_slide_id(h5: Path) -> str:
    return h5.stem.removesuffix("_patches")  # as data.features.index_feature_files names them


def _check_same_encoder(h5: Path, trained_on: dict, run_dir: Path, other_scale: list[str]) -> None:
    """Features of another encoder than the run's training features are refused (the same D can be a
    different model: UNI and CLAM's ResNet-50 are both 1024-d); another ``target_mpp`` / ``patch_size`` is
    noted in ``other_scale``. Files or runs that do not record it are not checked."""
    from milkit.data.features import file_provenance

    own = file_provenance(h5)
    encoders = trained_on.get("encoder") or []
    if own["encoder"] is not None and len(encoders) == 1 and own["encoder"] != encoders[0]:
        raise ValueError(f"{h5}: features of encoder {own['encoder']!r}, but {run_dir} was trained on "
                         f"{encoders[0]!r} features; extract with that encoder (milkit extract --encoder)")
    for k in ("target_mpp", "patch_size"):
        known = trained_on.get(k) or []
        if own[k] is not None and known and own[k] not in known:
            other_scale.append(f"{h5.name}: {k} {own[k]}, trained on {', '.join(map(str, known))}")
            return


def _check_slide_matches(slide, h5: Path, attrs: dict) -> None:
    """The h5 was made for this slide: its recorded level-0 size (when it has one) is the slide's."""
    w0, h0 = slide.dimensions
    lw, lh = _attr_value(attrs, "level0_width"), _attr_value(attrs, "level0_height")
    if lw is not None and lh is not None and (int(lw), int(lh)) != (w0, h0):
        raise ValueError(f"{h5}: made for a {lw}×{lh} slide but {slide.path} is {w0}×{h0} (wrong features folder?)")


def _geometry_from_slide(slide_path: Path, h5: Path, attrs: dict, thumbnail_size: int):
    """(slide id, level-0 size, thumbnail, its downsample, mpp, bounds offset) read from the slide."""
    with open_slide(slide_path, mpp=None) as slide:
        w0, h0 = slide.dimensions
        _check_slide_matches(slide, h5, attrs)
        thumb, thumb_ds = slide.read_level_image(thumbnail_size)
        mpp_h5 = _attr_value(attrs, "mpp")
        mpp = slide.mpp if slide.mpp is not None else (None if mpp_h5 is None else float(mpp_h5))
        return slide.id, (w0, h0), thumb, thumb_ds, mpp, slide.bounds_offset


def _geometry_from_h5(h5: Path, attrs: dict, coords: np.ndarray, ps0: int, thumbnail_size: int):
    """The same without the slide: size from the h5's ``level0_width/height`` attributes (milkit tile,
    TRIDENT) or the patches' extent, a white canvas for the heatmap, and the bounds offset that
    ``milkit tile`` records (``bounds_x/y``; 0 without them)."""
    from milkit.view.figures import extent, thumb_size

    lw, lh = _attr_value(attrs, "level0_width"), _attr_value(attrs, "level0_height")
    size = (int(lw), int(lh)) if lw is not None and lh is not None else extent(coords, ps0)
    tw, th = thumb_size(size, thumbnail_size)
    thumb = np.full((th, tw, 3), 255, np.uint8)
    mpp = _attr_value(attrs, "mpp")
    bounds = tuple(int(_attr_value(attrs, k) or 0) for k in ("bounds_x", "bounds_y"))
    return _h5_slide_id(h5), size, thumb, size[0] / tw, None if mpp is None else float(mpp), bounds


def label_slides(run_dir: str | Path, slides: list[Path] | None, features_dir: Path | None, out: Path | None,
                 stage: str | None, thumbnail_size: int = 1024, progress: bool = False,
                 overwrite: bool = False, review_fraction: float | None = None) -> list[Path]:
    """Score every patch of every slide; write per-slide outputs (milkit.slide.outputs) and
    ``OUT/slides.csv`` (slide id, bag probability, patches, positive patches). ``progress``: a bar
    over the slides on stderr. ``review_fraction``: the share of each slide's patches that
    ``review.geojson`` outlines (default :data:`milkit.trust.review.REVIEW_FRACTION`).

    OUT may already hold labels of this run and stage (labelling in batches): they are kept, and
    ``slides.csv`` lists them with the new ones. Labels of another run or stage are refused unless
    ``overwrite``, which then removes them (:func:`previous_labels`).

    Without ``slides`` every ``<slide>.h5`` of ``features_dir`` is labelled from its coords alone
    (features extracted elsewhere, e.g. on a cluster): the slide's size and bounds offset come from
    the h5, and the heatmap is drawn on a white canvas."""
    from milkit.slide.label_source import calibrations, load_source
    from milkit.trust.review import REVIEW_FRACTION
    from milkit.trust.verdict import do_not_use_warning

    review_fraction = REVIEW_FRACTION if review_fraction is None else float(review_fraction)
    if not 0 < review_fraction <= 1:
        raise ValueError(f"--review-fraction must be in (0, 1], got {review_fraction:g}")
    run_dir = Path(run_dir)
    source = load_source(run_dir, stage)  # one run, or a cross-validation folder's folds
    stage, exp, trust = source.stage, source.exp, source.trust  # the verdict travels with the labels (milkit view)
    warning = do_not_use_warning({stage: {"trust": trust}}, stage)
    if warning:
        log.warning("%s", warning)
    if features_dir is None:
        features_dir = getattr(exp.data, "features_dir", None)
        if features_dir is None:
            raise ValueError(f"{run_dir}: the run's data has no features_dir; pass --features DIR")
    features_dir = Path(features_dir)
    if not features_dir.is_dir():
        raise FileNotFoundError(f"{features_dir}: features folder (--features) does not exist")
    out = Path(out) if out is not None else run_dir / "labels"
    # every input is found before anything is written
    if slides:
        items = [(p, _feature_file(features_dir, p)) for p in find_slides(list(slides))]
    else:
        items = [(None, h5) for h5 in feature_files(features_dir)]
    from milkit.workflow import trained_feature_dim

    trained_on = (source.metrics.get("_run") or {}).get("features") or {}
    want_d = trained_feature_dim(exp)
    other_scale: list[str] = []
    for slide_path, h5 in items:
        check_h5_features(h5, whole_slide=True)
        check_h5_values(h5, want_d, str(run_dir))
        _check_same_encoder(h5, trained_on, run_dir, other_scale)
        if slide_path is not None:
            with open_slide(slide_path, mpp=None) as slide:
                _check_slide_matches(slide, h5, h5_attrs(h5))
    if other_scale:
        log.info("%d feature file(s) were made at another resolution or patch size than the training features "
                 "(%s); the model scores them all the same", len(other_scale), "; ".join(other_scale[:3]))
    previous = previous_labels(out)
    mine = (str(run_dir.resolve()), stage)
    foreign = {sid: v for sid, v in previous.items() if v[:2] != mine}
    if foreign and not overwrite:
        sid, (r, st, path) = next(iter(sorted(foreign.items())))
        raise ValueError(f"{path}: --out {out} holds labels of another run or stage ({len(foreign)} slide(s); this one "
                         f"from {r}, stage {st}); pass --overwrite to replace them, or choose another --out")
    for _, _, path in foreign.values():  # --overwrite: only what milkit wrote there
        for name in LABEL_FILES:
            (path.parent / name).unlink(missing_ok=True)
    paths: list[Path] = []
    summary = []
    oof = 0  # slides of a cross-validation cohort, labelled by the fold that tested them
    empty: dict[str, tuple[str, bool]] = {}  # slides called positive, no positive patch → (their threshold, label-free)
    inferred: list[str] = []
    for slide_path, h5 in track(items, f"label {len(items)} slide(s)", enabled=progress):
        ff = read_h5_features(h5)
        ps0, was_inferred = level0_patch_size(ff) if len(ff.features) else (ff.patch_size_level0 or 1, False)
        if was_inferred:
            inferred.append(h5.name)
        ff.patch_size_level0 = ps0
        attrs = h5_attrs(h5)
        if slide_path is not None:
            sid, (w0, h0), thumb, thumb_ds, mpp, bounds = _geometry_from_slide(slide_path, h5, attrs, thumbnail_size)
        else:
            sid, (w0, h0), thumb, thumb_ds, mpp, bounds = _geometry_from_h5(h5, attrs, ff.coords,
                                                                            ff.patch_size_level0, thumbnail_size)
        bag = Bag(torch.from_numpy(ff.features), 0, sid, coords=torch.from_numpy(ff.coords))
        if getattr(exp.data, "graph", False) and len(bag):  # Sm models: the same bag graph as in training
            from milkit.data.graph import grid_adjacency

            bag.adj = grid_adjacency(ff.coords, ff.patch_size_level0)
        n = len(bag)
        choice = source.choose(sid)
        labeler = choice.labeler
        probability = uncertainty = None
        if n:
            batch = collate_bags([bag])
            try:
                o = labeler.outputs(batch)
            except RuntimeError as err:
                raise ValueError(f"{h5}: the model cannot score these features ({err})") from None
            scores = o.raw[0, :n].double().cpu().numpy()
            if o.probability is not None:
                probability = o.probability[0, :n].double().cpu().numpy()
            if o.uncertainty is not None:
                uncertainty = o.uncertainty[0, :n].double().cpu().numpy()
            bag_prob = float(o.bag_prob[0])
        else:
            scores, bag_prob = np.zeros(0), float("nan")
            probability = np.zeros(0) if labeler.threshold_on == "probability" else None
        values = probability if labeler.threshold_on == "probability" and probability is not None else scores
        thr, thr_src = _threshold(labeler, values, choice.record, choice.threshold_from)
        oof += choice is not source.default
        s = SlideScores(
            slide_id=sid, coords=ff.coords, scores=scores, labels=(values >= thr).astype(np.int64), threshold=thr,
            score_kind=labeler.score_kind, size_level0=ff.patch_size_level0,
            stride_level0=_stride(ff.coords, attrs, ff.patch_size_level0) if len(ff.coords) else ff.patch_size_level0,
            level0_size=(w0, h0), mpp=mpp, bag_prob=bag_prob, bounds_offset=bounds,
            meta={"run_dir": str(run_dir.resolve()), "stage": stage, "threshold_source": thr_src,
                  "threshold_applies_to": labeler.threshold_on, "n_seeds": choice.n_seeds,
                  "features": str(h5), "slide": "" if slide_path is None else str(slide_path), "trust": trust,
                  "labelled_by": choice.labelled_by, **({"n_folds": source.n_folds} if source.n_folds else {})},
            probability=probability, uncertainty=uncertainty,
            threshold_criterion=str(getattr(labeler, "criterion", None) or thr_src),
            calibration=calibrations(labeler),
        )
        paths += write_slide_outputs(out, s, thumb, thumb_ds, review_fraction)
        summary.append((sid, bag_prob, len(scores), int(s.labels.sum())))
        if len(scores) and not s.labels.any() and bag_prob >= 0.5:
            empty[sid] = (f"{thr_src} = {thr:.3g}",  # and whether no validation patch label chose it
                          not str(choice.record.get("source", "")).startswith("validation"))
    kept = _kept_rows(out / "slides.csv", {sid for sid, v in previous.items() if v[:2] == mine} - {r[0] for r in summary})
    buf = _io.StringIO()
    w = csv.writer(buf)
    w.writerow(["slide_id", "bag_prob", "n_patches", "n_positive"])
    for sid, p, n, k in summary:
        kept[sid] = [sid, f"{p:.6g}", n, k]
    for sid in sorted(kept):
        w.writerow(kept[sid])
    io.write_text(out / "slides.csv", buf.getvalue())
    if empty:
        label_free = any(free for _, free in empty.values())
        log.warning("%d slide(s) called positive (slide probability ≥ 0.5) have no positive patch at the patch threshold: "
                    "%s; it came from %s.%s", len(empty), ", ".join(list(empty)[:5]) + (" …" if len(empty) > 5 else ""),
                    "; ".join(sorted({where for where, _ in empty.values()})),
                    " Patch annotations of a few validation slides (data.annotations_dir) choose it by F1; see "
                    "docs/benchmarks.md 'Patch labels without patch annotations'" if label_free else "")
    if source.n_folds:
        log.info("%d slide(s) of the cross-validation cohort labelled out of fold (each by the fold that tested it), "
                 "%d other slide(s) by the ensemble of the %d folds", oof, len(items) - oof, source.n_folds)
    if inferred:
        log.info("%d feature file(s) have no patch_size_level0 attribute (CLAM h5_files: %s%s); their patch size "
                 "is the coordinate step, i.e. non-overlapping patches", len(inferred), ", ".join(inferred[:3]),
                 " …" if len(inferred) > 3 else "")
    return paths + [out / "slides.csv"]


def previous_labels(out: Path) -> dict[str, tuple[str, str, Path]]:
    """Slide id → (run directory, stage, instances.h5) of the labels already in ``out``."""
    found = {}
    for p in sorted(Path(out).glob("*/instances.h5")) if Path(out).is_dir() else []:
        try:
            meta = json.loads(h5_attrs(p).get("meta", "{}"))
        except (OSError, ValueError):
            raise ValueError(f"{p}: not a readable milkit instances.h5; remove it or choose another --out") from None
        found[p.parent.name] = (str(meta.get("run_dir", "")), str(meta.get("stage", "")), p)
    return found


def _kept_rows(table: Path, keep: set[str]) -> dict[str, list]:
    """Rows of an earlier ``slides.csv`` for the slides in ``keep``."""
    if not keep or not table.is_file():
        return {}
    with table.open(newline="") as f:
        return {r[0]: r for r in list(csv.reader(f))[1:] if r and r[0] in keep}


def _feature_file(features_dir: Path, slide_path: Path) -> Path:
    from milkit.slide.reader import slide_id

    sid = slide_id(slide_path)
    for name in (f"{sid}.h5", f"{sid}_patches.h5", f"h5_files/{sid}.h5"):
        if (features_dir / name).is_file():
            return features_dir / name
    raise FileNotFoundError(f"{features_dir}: no feature file {sid}.h5 for slide {slide_path}")


def evaluate_annotations(run_dir: str | Path, annotations_dir: Path, labels_dir: Path | None = None,
                         tumour_fraction: float = TUMOUR_FRACTION) -> dict:
    """Score ``labels_dir/<slide>/instances.h5`` against ``annotations_dir/<slide>.xml|.geojson``
    per split (the run's own train/val/test, milkit.slide.cohort; never pooled across splits);
    writes the result into RUN_DIR/metrics.json under ``annotations`` and the per-slide page
    ``report_annotations.html`` (milkit.view.slide_report), and returns it."""
    from milkit.slide.annotations import check_regions, note_unmatched_annotations, tumour_geometry
    from milkit.slide.cohort import SPLIT_ORDER, is_labelling_run, metrics_file, slide_info, split_of
    from milkit.slide.froc import detections, froc, lesion_hits
    from milkit.view.slide_report import SlideResult, write_slide_report

    run = RunDir(run_dir)
    annotations_dir = Path(annotations_dir)
    if not annotations_dir.is_dir():
        raise FileNotFoundError(f"{annotations_dir}: annotations folder does not exist")
    labels_dir = Path(labels_dir) if labels_dir is not None else run.path / "labels"
    files = sorted(labels_dir.glob("*/instances.h5"))
    if not files:
        raise no_slide_labels(labels_dir)
    info = slide_info(run.path)
    results: list[SlideResult] = []
    for f in files:
        s = read_instances_h5(f)
        sid = s.slide_id
        ann = find_annotation(annotations_dir, sid)
        regions = read_annotations(ann, offset=s.bounds_offset) if ann is not None else []
        if ann is not None:
            check_regions(regions, ann, s.level0_size)
        geom = tumour_geometry(regions)
        lesions = [] if geom.is_empty else list(getattr(geom, "geoms", [geom]))
        true = info[sid].label if sid in info else int(bool(lesions))
        # −1 (unknown: out of every patch metric and the FROC) on a positive slide without annotation
        # and outside the reviewed regions of a partly annotated one
        y = slide_patch_labels(ann, true, s.coords, s.size_level0, tumour_fraction, regions, s.level0_size)
        if sid in info and true == 0 and (y == 1).any():
            log.warning("%s: slide %r is labelled negative in the run's labels, but this annotation makes %d of "
                        "its patches tumour; check the labels CSV or the annotation", ann, sid, int((y == 1).sum()))
        results.append(SlideResult(sid, split_of(info, sid), true, s, y, _probability(f), ann, lesions))
    note_unmatched_annotations(annotations_dir, [r.slide_id for r in results])
    unannotated = [r.slide_id for r in results if not r.annotated]
    if unannotated:
        log.info("%d positive slide(s) have no annotation in %s (%s): slide metrics only, left out of the patch "
                 "metrics and the FROC", len(unannotated), annotations_dir,
                 ", ".join(unannotated[:5]) + (" …" if len(unannotated) > 5 else ""))
    splits: dict[str, dict] = {}
    n_lesion = 0
    froc_in: dict[str, list] = {}
    for r in results:
        if not r.annotated:
            continue
        known = r.patch_true >= 0  # detections only where the annotation is complete
        conf = (r.prob if r.prob is not None else r.scores.scores)[known]
        c, k = detections(r.scores.coords[known], conf, r.scores.size_level0)
        froc_in.setdefault(r.split, []).append((k, lesion_hits(c, r.lesions, n_lesion), None))
        n_lesion += len(r.lesions)
    for split in SPLIT_ORDER:
        rs = [r for r in results if r.split == split]
        if rs:
            splits[split] = _split_metrics(rs, froc(froc_in.get(split, []), sum(len(r.lesions) for r in rs)))
    per_slide = {r.slide_id: r.metrics() for r in results}
    result = nan_to_none({
        "tumour_fraction_threshold": tumour_fraction,
        "patch_positive_rule": "exact tumour area fraction (shapely) >= threshold",
        "not_annotated": unannotated,  # positive slides without an annotation: slide metrics only
        "split_source": "the run's config (labels CSV / seed)" if info else "none (no feature-bag run): 'unlisted'",
        "labels_dir": str(labels_dir),
        "annotations_dir": str(annotations_dir),
        "splits": splits,
        "per_slide": per_slide,
    })
    where = run.path if is_labelling_run(run.path) else labels_dir
    if run.config_path.is_file():
        run.update_metrics("annotations", result)
    elif where == run.path:  # a cross-validation folder: beside its pooled out-of-fold test
        summary = metrics_file(run.path)
        io.write_json(summary, {**(json.loads(summary.read_text()) if summary.is_file() else {}), "annotations": result})
    write_slide_report(where, result, results, labels_dir)
    return result


def _probability(path: Path) -> np.ndarray | None:
    """The calibrated ``probability`` dataset of an instances.h5 when it has one."""
    import h5py

    with h5py.File(path, "r") as f:
        return np.asarray(f["probability"][()], np.float64) if "probability" in f else None


def _split_metrics(rs: list, froc_result: dict) -> dict:
    """Patch and slide metrics of the slides of one split (pooled patches within the split only)."""
    keep = [r.patch_true >= 0 for r in rs]  # patches of not-annotated positive slides are unknown (−1)
    y = np.concatenate([r.patch_true[k] for r, k in zip(rs, keep)])
    s = np.concatenate([np.asarray(r.scores.scores)[k] for r, k in zip(rs, keep)])
    lab = np.concatenate([np.asarray(r.scores.labels)[k] for r, k in zip(rs, keep)])
    pooled = binary_metrics(y, lab, 0.5) if len(y) else {}
    per_auc = [m for m in (r.metrics()["instance_auroc"] for r in rs) if m is not None and np.isfinite(m)]
    sy = np.array([r.true_label for r in rs])
    sp = np.array([r.scores.bag_prob for r in rs], dtype=float)
    return {
        "n_slides": len(rs),
        "n_positive_slides": int(sy.sum()),
        "n_instances": int(len(y)),
        "n_tumour_instances": int(y.sum()),
        "instance_auroc": auroc(y, s) if len(y) else float("nan"),
        "instance_f1": pooled.get("f1"),
        "instance_accuracy": pooled.get("accuracy"),
        "mean_slide_instance_auroc": float(np.mean(per_auc)) if per_auc else float("nan"),
        "slide_auroc": auroc(sy, sp),
        "froc": froc_result["froc"],
        "froc_sensitivity_at_fp": froc_result["sensitivity_at_fp"],
        "n_lesions": froc_result["n_lesions"],
    }

"""Which split and which slide label each slide of a run has (for per-split evaluation,
the per-slide report and the viewer's slide list).

The splits are recomputed from the run's own ``config.yaml`` exactly as training made
them (``FeatureTable.split_indices`` with the run's seed), so train, val and test slides
are never mixed. Slides that the run's labels CSV does not list get split ``unlisted``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from milkit.run_dir import RunDir

log = logging.getLogger(__name__)
SPLIT_ORDER = ("train", "val", "test", "unlisted")


@dataclass
class SlideInfo:
    split: str
    label: int | None  # slide label from the run's labels CSV (None when unknown)


def slide_info(run_dir: str | Path | None) -> dict[str, SlideInfo]:
    """``{slide_id: SlideInfo}`` for every slide of the run's feature-bag data; ``{}`` when
    ``run_dir`` is None, not a run, or its data are not slides (then every slide is ``unlisted``).
    A cross-validation folder (``train --folds``) lists every slide of its cohort as ``test``: each is
    in one fold's test split, and out-of-fold labels come from that fold."""
    from milkit.cross_validation import fold_runs, tested_by

    if run_dir is not None and fold_runs(Path(run_dir)):
        return {sid: SlideInfo("test", label) for sid, (_, label) in tested_by(Path(run_dir)).items()}
    return run_slide_info(run_dir)


def run_slide_info(run_dir: str | Path | None) -> dict[str, SlideInfo]:
    """:func:`slide_info` of one run (not a cross-validation folder)."""
    if run_dir is None or not RunDir(run_dir).config_path.is_file():
        return {}
    exp = RunDir(run_dir).read_config()
    if getattr(exp.data, "kind", None) != "feature_bags":
        return {}
    from milkit.data.features import FeatureTable

    try:
        table = FeatureTable.from_config(exp.data)
        parts = table.split_indices(exp.data, exp.seed)
    except (OSError, ValueError) as err:
        log.warning("%s: cannot recompute the run's splits (%s); slides reported as 'unlisted'", run_dir, err)
        return {}
    out: dict[str, SlideInfo] = {}
    for name, idx in zip(("train", "val", "test"), parts):
        for i in idx:
            r = table.rows[int(i)]
            out[r.slide_id] = SlideInfo(name, int(r.label))
    return out


def is_labelling_run(path: Path) -> bool:
    """A run directory or a cross-validation folder: what ``milkit label`` takes as RUN."""
    from milkit.cross_validation import fold_runs

    return RunDir(path).config_path.is_file() or bool(fold_runs(path))


def metrics_file(path: Path) -> Path:
    """Where a run's results are recorded: its metrics.json, or a cross-validation folder's cv_summary.json."""
    from milkit.cross_validation import SUMMARY_JSON, fold_runs

    return Path(path) / SUMMARY_JSON if fold_runs(path) else RunDir(path).metrics_path


def split_of(info: dict[str, SlideInfo], sid: str) -> str:
    return info[sid].split if sid in info else "unlisted"

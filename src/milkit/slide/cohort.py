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
    ``run_dir`` is None, not a run, or its data are not slides (then every slide is ``unlisted``)."""
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


def split_of(info: dict[str, SlideInfo], sid: str) -> str:
    return info[sid].split if sid in info else "unlisted"

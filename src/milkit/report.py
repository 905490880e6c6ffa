"""``report.html``: one self-contained page per run directory (DESIGN.md, ``milkit evaluate``).

What it shows, per stage: the trust verdict with the rule that decided it and the checks
behind it (validation slide / max-patch / patch AUROC with 95 % intervals, seed agreement,
a reliability diagram, the calibration source; :mod:`milkit.trust`); the metrics table of
every split; for seed ensembles every seed, the ensemble and their spread; ROC curves of bag (image)
scores and of instance scores against the instance labels, with the AUROC in the legend;
histograms of instance scores split by their true label, with the validation threshold;
the stage's training curves (``stages/<stage>/logs/metrics.csv``, seed 0's for an ensemble); and any figure the
method wrote under ``figures/`` (segmentation examples). For slide runs (bags of patch features
with coordinates) a per-slide section follows for the primary stage
(:mod:`milkit.view.run_slides`: metrics per split, a sortable per-slide table with
``milkit view`` links, heatmap thumbnails of the worst false negatives and positives).
Plots are PNGs embedded as base64, so the file can be mailed or opened from a cluster's
scratch space.

Scores arrive as :class:`ScoreSet` objects that ``Method.evaluate`` fills while it scores
each split, so building the report never runs a model again.
"""

from __future__ import annotations

import base64
import csv
import html
import io as _bytes_io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from milkit import io
from milkit.metrics.classification import auroc
from milkit.run_dir import RunDir, stage_metrics

#: instance scores plotted per histogram at most (a 100k-patch slide set stays fast)
MAX_HISTOGRAM_POINTS = 200_000


@dataclass
class ScoreSet:
    """Scores of one (stage, split): bag (image) level, and instance level when labelled."""

    bag_true: np.ndarray
    bag_prob: np.ndarray
    instance_true: np.ndarray | None = None
    instance_score: np.ndarray | None = None
    threshold: float | None = None
    instance_name: str = "instance"
    #: calibrated instance probabilities (what ``threshold`` applies to), when the labeler has them
    instance_prob: np.ndarray | None = None
    #: per slide (milkit.view.run_slides.SlideBag) when the bags are slides with patch coordinates
    slides: list | None = None


# ----------------------------------------------------------------------------- plots
def _png(fig) -> str:
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _roc(ax, y: np.ndarray, s: np.ndarray, label: str) -> None:
    from sklearn.metrics import roc_curve

    if len(np.unique(y)) < 2:
        ax.text(0.5, 0.5, f"{label}: one class only", ha="center", fontsize=8)
        return
    fpr, tpr, _ = roc_curve(y, s)
    ax.plot(fpr, tpr, label=f"{label} (AUROC {auroc(y, s):.3f})")


def roc_figure(scores: dict[str, ScoreSet]) -> str:
    """ROC curves of bag and instance scores of every split; base64 PNG."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6))
    axes = fig.subplots(1, 2)
    for split, sc in scores.items():
        _roc(axes[0], sc.bag_true, sc.bag_prob, split)
        if sc.instance_true is not None and sc.instance_score is not None:
            _roc(axes[1], sc.instance_true, sc.instance_score, split)
    name = next(iter(scores.values())).instance_name if scores else "instance"
    for ax, title in zip(axes, ("bag / image", name)):
        ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
        ax.set(title=f"ROC — {title}", xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def histogram_figure(sc: ScoreSet, split: str, seed: int = 0) -> str | None:
    """Instance scores by true label (negative / positive) with the threshold; base64 PNG."""
    if sc.instance_true is None or sc.instance_score is None or len(sc.instance_true) == 0:
        return None
    from matplotlib.figure import Figure

    prob = sc.instance_prob is not None and len(sc.instance_prob) == len(sc.instance_true)
    y = np.asarray(sc.instance_true)
    s = np.asarray(sc.instance_prob if prob else sc.instance_score, dtype=float)
    if len(s) > MAX_HISTOGRAM_POINTS:  # subsample, reproducibly
        keep = np.random.default_rng(seed).choice(len(s), MAX_HISTOGRAM_POINTS, replace=False)
        y, s = y[keep], s[keep]
    finite = np.isfinite(s)
    y, s = y[finite], s[finite]
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    if prob:
        bins = np.linspace(0, 1, 41)
    else:
        bins = np.linspace(s.min(), s.max(), 41) if len(s) and s.max() > s.min() else 10
    for cls, color, name in ((0, "tab:blue", "negative"), (1, "tab:red", "positive")):
        part = s[y == cls]
        if len(part):
            ax.hist(part, bins=bins, alpha=0.55, color=color, label=f"{name} ({len(part)})", density=True)
    if sc.threshold is not None and math.isfinite(sc.threshold):
        ax.axvline(sc.threshold, color="k", lw=1, ls="--", label=f"threshold {sc.threshold:.3g}")
    what = "calibrated probability" if prob else "score"
    ax.set(title=f"{sc.instance_name} {what} — {split}", xlabel=what, ylabel="density")
    ax.legend(fontsize=8)
    return _png(fig)


def read_training_log(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Per-epoch series of a Lightning CSV log: column → [(epoch, value)], empty cells skipped."""
    if not path.is_file():
        return {}
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                epoch = int(float(row.get("epoch") or "nan"))
            except ValueError:
                continue
            for k, v in row.items():
                if k in ("epoch", "step") or not v:
                    continue
                try:
                    series.setdefault(k, []).append((epoch, float(v)))
                except ValueError:
                    continue
    return series


def training_figure(series: dict[str, list[tuple[int, float]]]) -> str | None:
    """Training losses (left) and validation metrics (right) per epoch; base64 PNG."""
    if not series:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.2))
    axes = fig.subplots(1, 2)
    for k, pts in sorted(series.items()):
        ax = axes[0] if k.startswith("train/") else axes[1]
        e, v = zip(*pts)
        ax.plot(e, v, marker=".", ms=3, lw=1, label=k)
    for ax, title in zip(axes, ("training", "validation")):
        ax.set(title=title, xlabel="epoch")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _png(fig)


def reliability_figure(rel: dict) -> str | None:
    """Reliability diagram (observed positive fraction against mean calibrated probability per
    bin, point size ∝ count) with the diagonal; base64 PNG."""
    pred, obs, cnt = rel.get("predicted") or [], rel.get("observed") or [], rel.get("count") or []
    pts = [(p, o, c) for p, o, c in zip(pred, obs, cnt) if p is not None and o is not None and c]
    if not pts:
        return None
    from matplotlib.figure import Figure

    fig = Figure(figsize=(3.6, 3.4))
    ax = fig.subplots()
    p, o, c = (np.array(v, float) for v in zip(*pts))
    ax.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax.plot(p, o, color="tab:red", lw=1)
    ax.scatter(p, o, s=10 + 90 * c / c.max(), color="tab:red", zorder=3)
    ece = rel.get("ece")
    ax.set(title=f"reliability (validation patches), ECE {ece:.3f}" if isinstance(ece, float) else "reliability",
           xlabel="calibrated probability", ylabel="observed positive fraction", xlim=(0, 1), ylim=(0, 1))
    ax.title.set_fontsize(9)
    return _png(fig)


# ----------------------------------------------------------------------------- html
def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "—" if not math.isfinite(v) else f"{v:.4g}"
    if v is None:
        return "—"
    return html.escape(str(v))


def _metrics_table(stage_metrics: dict) -> str:
    splits = [s for s in ("val", "test") if isinstance(stage_metrics.get(s), dict)]
    keys: list[str] = []
    for s in splits:
        keys += [k for k, v in stage_metrics[s].items() if k not in keys and not isinstance(v, (dict, list))]
    if not keys:
        return ""
    head = "<tr><th>metric</th>" + "".join(f"<th>{s}</th>" for s in splits) + "</tr>"
    rows = "".join(
        f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{_fmt(stage_metrics[s].get(k))}</td>" for s in splits) + "</tr>"
        for k in keys
    )
    return f"<table>{head}{rows}</table>"


def _img(b64: str | None, alt: str) -> str:
    return "" if b64 is None else f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _ci_cell(d: object) -> tuple[str, str]:
    if not isinstance(d, dict):
        return (_fmt(d), "")
    ci = d.get("ci95") or [None, None]
    return (_fmt(d.get("value")), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]")


def ensemble_choice_section(choice: object) -> str:
    """Which labels a seed ensemble's stage uses (the ensemble or one replica), the rule, and the
    validation numbers behind the choice (``trust.ensemble.choose_labels``); empty for one seed."""
    if not isinstance(choice, dict) or not isinstance(choice.get("val"), dict):
        return ""
    keys = [str(k) for k in choice.get("metrics") or []]
    val = choice["val"]
    used = str(choice.get("used", "?"))
    head = "<tr><th>candidate (validation)</th>" + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>"

    def row(name: str, d: object, bold: bool) -> str:
        d = d if isinstance(d, dict) else {}
        cells = "".join(f"<td>{_fmt(d.get(k))}</td>" for k in keys)
        return f"<tr><td>{'<b>' if bold else ''}{html.escape(name)}{'</b>' if bold else ''}</td>{cells}</tr>"

    body = row("ensemble", val.get("ensemble"), used == "ensemble")
    body += row("median replica", val.get("median_replica"), False)
    for r in val.get("replicas") or []:
        name = f"seed-{r.get('replica')}" + (f" (seed {r['seed']})" if r.get("seed") is not None else "")
        body += row(name, r, used == f"seed-{r.get('replica')}")
    below = ", ".join(str(k) for k in choice.get("below_median_on") or [])
    why = (f"the ensemble is below the median replica on validation ({html.escape(below)})" if below
           else "the ensemble is at least as good as the median replica on validation")
    return (f"<p><b>labels from: {html.escape(used)}</b> — {why}</p>"
            f"<table>{head}{body}</table>"
            f"<p class='note'>rule: {html.escape(str(choice.get('rule', '')))}</p>")


def trust_section(trust: dict, calibration: list | None = None, ensemble: object = None) -> str:
    """The verdict line with its rule, the checks behind it, the calibration source and, for a
    seed ensemble, which labels the stage uses (:func:`ensemble_choice_section`)."""
    v = str(trust.get("verdict", "?"))
    parts = [f"<p class='verdict {html.escape(v.replace(' ', '-'))}'><b>verdict: {html.escape(v.upper())}</b>"
             f" — rule: {html.escape(str(trust.get('rule', '')))}</p>"]
    rows = [("validation slide AUROC", trust.get("slide_auroc")),
            ("max-patch slide AUROC (patch scores vs slide labels)", trust.get("max_patch_slide_auroc")),
            ("validation patch AUROC", trust.get("patch_auroc"))]
    agree = trust.get("seed_agreement") or {}
    body = "".join(f"<tr><td>{html.escape(n)}</td><td>{a}</td><td>{b}</td></tr>" for n, (a, b) in
                   ((n, _ci_cell(d)) for n, d in rows))
    rho = agree.get("rho")
    body += (f"<tr><td>seed agreement (mean pairwise Spearman ρ, {agree.get('n_seeds', 1)} seeds)</td>"
             f"<td>{_fmt(rho) if rho is not None else html.escape(str(agree.get('note', 'undefined')))}</td><td></td></tr>")
    rel = trust.get("reliability")
    if isinstance(rel, dict):
        body += f"<tr><td>expected calibration error (validation patches)</td><td>{_fmt(rel.get('ece'))}</td><td></td></tr>"
    parts.append(f"<table><tr><th>check (validation)</th><th>value</th><th>95% CI</th></tr>{body}</table>")
    srcs = sorted({str(c.get("source")) for c in (calibration or []) if isinstance(c, dict)})
    if srcs:
        parts.append("<p class='note'>probabilities calibrated (Platt, slope ≥ 0) on: "
                     + html.escape("; ".join(srcs)) + "</p>")
    rules = trust.get("rules") or []
    if rules:
        parts.append("<details><summary>verdict rules (first that fires decides)</summary><ol>"
                     + "".join(f"<li>{html.escape(str(r))}</li>" for r in rules) + "</ol></details>")
    if isinstance(rel, dict):
        parts.append(_img(reliability_figure(rel), "reliability diagram"))
    parts.append(ensemble_choice_section(ensemble))
    return "\n".join(p for p in parts if p)


def seeds_table(stage_metrics: dict) -> str:
    """Every seed's metrics (each at its own validation threshold), the ensemble's, and their spread."""
    seeds = stage_metrics.get("seeds")
    if not isinstance(seeds, list) or not seeds:
        return ""
    cols = (("val", "bag_auroc"), ("test", "bag_auroc"), ("test", "instance_auroc"), ("test", "instance_f1"))
    head = "<tr><th>seed</th>" + "".join(f"<th>{s} {html.escape(k)}</th>" for s, k in cols) + "</tr>"
    rows = "".join(f"<tr><td>{_fmt(sd.get('seed'))}</td>"
                   + "".join(f"<td>{_fmt((sd.get(s) or {}).get(k))}</td>" for s, k in cols) + "</tr>" for sd in seeds)
    choice = stage_metrics.get("ensemble")
    used = str(choice.get("used", "ensemble")) if isinstance(choice, dict) else "ensemble"
    label = "ensemble" if used == "ensemble" else f"stage ({used})"  # what the stage labels with
    rows += (f"<tr><td><b>{html.escape(label)}</b></td>"
             + "".join(f"<td><b>{_fmt((stage_metrics.get(s) or {}).get(k))}</b></td>" for s, k in cols) + "</tr>")
    spread = stage_metrics.get("seed_spread") or {}

    def ms(s: str, k: str) -> str:
        d = (spread.get(s) or {}).get(k)
        return f"{_fmt(d['mean'])} ± {_fmt(d['sd'])}" if isinstance(d, dict) else "—"

    def get(s: str, k: str, what: str) -> object:
        d = (spread.get(s) or {}).get(k)
        return d.get(what) if isinstance(d, dict) else None

    rows += "<tr><td>mean ± sd over seeds</td>" + "".join(f"<td>{ms(s, k)}</td>" for s, k in cols) + "</tr>"
    rows += ("<tr><td>min / median / max</td>" + "".join(
        f"<td>{_fmt(get(s, k, 'min'))} / {_fmt(get(s, k, 'median'))} / {_fmt(get(s, k, 'max'))}</td>" for s, k in cols)
        + "</tr>")
    rows += (f"<tr><td>{html.escape(label)} − median seed</td>"
             + "".join(f"<td>{_signed(get(s, k, 'ensemble_minus_median'))}</td>" for s, k in cols) + "</tr>")
    src = "their ensemble" if used == "ensemble" else f"{used}, chosen on validation"
    return (f"<h3>seeds ({len(seeds)} replicas; labels from {html.escape(src)})</h3><table>{head}{rows}</table>"
            "<p class='note'>each seed at its own validation threshold; the ensemble averages the seeds' "
            "calibrated probabilities (a negative last row: the stage's labels are below its median seed).</p>")


def _signed(v: object) -> str:
    return f"{v:+.4g}" if isinstance(v, float) and math.isfinite(v) else _fmt(v)


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}
td:first-child,th:first-child{text-align:left}img{max-width:100%;margin:.3em 0}h2{border-top:1px solid #ddd;padding-top:.6em}
.note{color:#555}.verdict{font-size:1.15em;padding:.3em .6em;border-left:.4em solid #999}
.verdict.trustworthy{border-color:#2a2;background:#efe}.verdict.uncertain{border-color:#d90;background:#ffe}
.verdict.do-not-use{border-color:#c22;background:#fee}"""


def _slide_stage(metrics: dict, scores: dict[str, dict[str, ScoreSet]]) -> str | None:
    """The stage whose per-slide section is shown: the primary stage (what ``milkit label``
    uses) when it has slides, else the last stage that has them."""
    have = [st for st, per in scores.items() if any(sc.slides for sc in per.values())]
    info = metrics.get("_run") if isinstance(metrics.get("_run"), dict) else {}
    primary = info.get("primary_stage")
    return primary if primary in have else (have[-1] if have else None)


def render_report(run_path: Path, metrics: dict, scores: dict[str, dict[str, ScoreSet]],
                  view_port: int | None = None) -> str:
    """The HTML page (a string) for a run's ``metrics`` and per-stage, per-split ``scores``;
    per-slide links point at ``milkit view`` on ``view_port`` (default its ``--port`` default)."""
    from milkit.view import figures

    info = metrics.get("_run", {}) if isinstance(metrics.get("_run"), dict) else {}
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>milkit report — {html.escape(run_path.name)}</title>"
             f"<style>{_STYLE}{figures.STYLE}</style></head><body>",
             f"<h1>milkit report — {html.escape(run_path.name)}</h1>",
             f"<p class='note'>run directory: <code>{html.escape(str(run_path))}</code>"
             + (f"; method <b>{html.escape(str(info.get('method')))}</b>" if info.get("method") else "")
             + (f"; trained in {_fmt(info.get('train_seconds'))} s" if info.get("train_seconds") is not None else "")
             + "</p>"]
    for stage, m in stage_metrics(metrics).items():
        parts.append(f"<h2>stage: {html.escape(stage)}</h2>")
        if isinstance(m.get("trust"), dict):
            parts.append(trust_section(m["trust"], m.get("calibration"), m.get("ensemble")))
        thr = (m.get("threshold") or {}) if isinstance(m.get("threshold"), dict) else {}
        if thr.get("threshold") is not None:
            extra = [str(thr[k]) for k in ("source",) if thr.get(k)]
            if thr.get("applies_to"):
                extra.append(f"on the {thr['applies_to']}")
            if thr.get("criterion"):
                extra.append(f"criterion {thr['criterion']}")
            if thr.get("ensemble_threshold") == "median_of_seeds":
                extra.append("the median over the seeds of their own validation thresholds")
            parts.append(f"<p>instance threshold {_fmt(thr.get('threshold'))}"
                         f"{' (' + html.escape('; '.join(extra)) + ')' if extra else ''}</p>")
        parts.append(_metrics_table(m))
        parts.append(seeds_table(m))
        stage_scores = scores.get(stage, {})
        if stage_scores:
            parts.append(_img(roc_figure(stage_scores), f"{stage} ROC"))
            for split, sc in stage_scores.items():
                parts.append(_img(histogram_figure(sc, split), f"{stage} {split} histogram"))
        log = RunDir(run_path).stage_dir(stage) / "logs" / "metrics.csv"
        if not log.is_file():  # a seed ensemble: replica 0's curves
            log = RunDir(run_path).seed_stage_dir(stage, 0) / "logs" / "metrics.csv"
        parts.append(_img(training_figure(read_training_log(log)), f"{stage} training curves"))
        fig = m.get("figure")
        if isinstance(fig, str) and (run_path / fig).is_file():
            parts.append(_img(base64.b64encode((run_path / fig).read_bytes()).decode("ascii"), fig))
    stage = _slide_stage(metrics, scores)
    if stage is not None:
        from milkit.view.run_slides import slide_section

        parts.append(slide_section(run_path, stage, {sp: sc.slides for sp, sc in scores[stage].items() if sc.slides},
                                   figures.DEFAULT_PORT if view_port is None else view_port))
        parts.append(f"<script>{figures.SORT_JS}</script>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


def write_report(run_path: str | Path, metrics: dict, scores: dict[str, dict[str, ScoreSet]],
                 name: str = "report.html", view_port: int | None = None) -> Path:
    """Write ``RUN_DIR/<name>`` atomically; returns its path."""
    run_path = Path(run_path)
    out = run_path / name
    io.write_text(out, render_report(run_path, metrics, scores, view_port))
    return out

"""train → label → evaluate on a run directory (what the CLI commands call)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from milkit import registry
from milkit.config import Experiment, load_yaml, validate_section
from milkit.data.base import DataSplits
from milkit.methods.base import Labeler, Method
from milkit.report import write_report
from milkit.run_dir import RunDir, stage_metrics

log = logging.getLogger(__name__)


def make_method(exp: Experiment) -> Method:
    cls = registry.lookup(registry.METHODS, "method", exp.method.name)
    return cls(exp)


def train_run(exp: Experiment, out_dir: str | Path, overwrite: bool = False, resume: bool = False,
              source: str = "config") -> dict:
    """Fit every stage of the experiment's method; write config, checkpoints, thresholds, metrics.

    Everything that can be checked (config, data files, splits, dimensions) is checked before
    anything is written. ``out_dir`` must be new, empty, or (with ``overwrite``) a milkit run to
    replace, or (with ``resume``) an interrupted run to continue: finished stages are kept,
    an unfinished one continues from its ``last.ckpt`` (engine.fit_stage).

    Several processes (DDP, :mod:`milkit.distributed`): every rank trains; rank 0 alone checks
    and writes the run directory, and the others return ``{}`` once it has finished.
    """
    from milkit import distributed

    run = RunDir(out_dir)
    if overwrite and resume:
        raise ValueError("--overwrite and --resume exclude each other: replace the run, or continue it")
    writer = distributed.is_rank_zero()
    state = run.state() if writer else "other-rank"  # rank 0 may already be writing there
    if state == "file":
        raise FileExistsError(f"{run.path}: is a file; --out must be a folder (new, empty, or a milkit run)")
    if state == "foreign":
        raise FileExistsError(f"{run.path}: not empty and not a milkit run (no config.yaml); "
                              "choose a new or empty --out (nothing there was changed)")
    if state in ("unfinished", "finished") and not (overwrite or resume):
        hint = "--overwrite to replace it" if state == "finished" else "--resume to continue it or --overwrite to replace it"
        raise FileExistsError(f"{run.path}: already holds {'a finished' if state == 'finished' else 'an unfinished'} "
                              f"run (config.yaml); pass {hint}, or choose another --out")
    t0 = time.perf_counter()
    from milkit.nn.pretrained import check_pretrained_spec

    check_pretrained_spec(getattr(exp.method, "pretrained_path", None))  # a missing weights file, before any write
    distributed.check_devices(exp.trainer)  # GPUs this machine does not have
    splits = prepare(exp, source)  # bad data fails here, before anything is written
    from milkit.trust import ensemble  # K seed replicas, calibration, thresholds, verdict

    ensemble.check_supported(make_method(exp), exp)
    distributed.check_supported(exp)
    from milkit.trust import parallel_seeds

    parallel_seeds.check_supported(exp)  # replicas in worker processes, but not beside DDP
    # another rank resumes when told to: rank 0 decides on the same files before any stage starts
    resuming_run = resume and state in ("unfinished", "finished", "other-rank")
    absolute_paths(exp)  # config.yaml then names the data wherever `milkit label/evaluate RUN` is run from
    if writer:
        _prepare_run_dir(run, exp, state, resuming_run)
    from milkit.engine import resuming

    with resuming(resuming_run):  # fit_members seeds the RNGs per replica
        method, members = ensemble.fit_members(make_method, exp, splits, run)
    done = distributed.finish_group()  # DDP: the others wait there while rank 0 evaluates and writes
    if not writer:
        distributed.finish_barrier(done)
        return {}
    try:
        return _finish(exp, run, method, members, splits, t0)
    finally:
        distributed.finish_barrier(done)


def absolute_paths(obj: object, base: Path | None = None) -> None:
    """Every relative path-typed field of a config (data folders, CSVs), in place, made absolute against
    ``base`` (the current folder), where the command that read the config found it; a run directory's
    config.yaml is then valid from any folder (a run written before, with relative paths, still resumes
    from the folder it was trained in: :func:`_check_same_config`)."""
    base = Path.cwd() if base is None else base
    parts = (("data", obj.data), ("method", obj.method)) if isinstance(obj, Experiment) else (("", obj),)
    for prefix, part in parts:
        for _, sec in config_sections(part, prefix):
            for name in type(sec).model_fields:
                value = getattr(sec, name)
                if isinstance(value, Path) and not value.is_absolute():
                    setattr(sec, name, base / value)


def _prepare_run_dir(run: RunDir, exp: Experiment, state: str, resuming_run: bool) -> None:
    """Resume (stale temporary files removed), replace (--overwrite) or create the run directory."""
    if resuming_run:
        _check_same_config(run, exp)
        from milkit import io

        for p in io.remove_stale_temps(run.path, recursive=True):  # half-written by the killed process
            log.info("removed %s (left by the interrupted run)", p)
    elif state in ("unfinished", "finished"):  # --overwrite, after every check passed
        log.info("%s: replacing the run there (--overwrite)", run.path)
        run.clear()
    try:
        run.path.mkdir(parents=True, exist_ok=True)
        if not resuming_run:
            run.write_config(exp)
    except BaseException:
        if state == "absent":  # leave no half-made run behind
            import shutil

            shutil.rmtree(run.path, ignore_errors=True)
        raise


def _finish(exp: Experiment, run: RunDir, method: Method, members: dict, splits: DataSplits, t0: float) -> dict:
    """Calibrate, choose thresholds, evaluate and write metrics.json and report.html (rank 0)."""
    from milkit.trust import assess, ensemble

    labelers = ensemble.finalise(method, members, splits, run, ensemble.n_seeds(exp))
    scores: dict = {}
    metrics = method.evaluate(labelers, splits, run, scores)
    assess.add_trust(metrics, labelers, splits, exp, scores)
    metrics["_run"] = {"train_seconds": round(time.perf_counter() - t0, 2), "method": exp.method.name,
                       "stages": list(labelers)}
    # the stage `milkit label` uses by default (issue 11 §2)
    metrics["_run"]["primary_stage"] = method.primary_stage if method.primary_stage in labelers else list(labelers)[-1]
    features = _training_features(splits)
    if features:  # what made the training features: `milkit label` refuses features of another encoder
        metrics["_run"]["features"] = features
    from milkit import io

    io.write_json(run.metrics_path, metrics)
    write_report(run.path, metrics, scores)
    return metrics


def _training_features(splits: DataSplits) -> dict | None:
    """:func:`milkit.data.features.provenance` of the training and validation feature files (feature bags only)."""
    from milkit.data.features import provenance

    files = []
    for ds in (splits.train, splits.val):
        table = getattr(ds, "table", None)
        if table is not None and hasattr(ds, "indices"):
            files += [table.files[i] for i in ds.indices]
    return provenance(files) if files else None


def prepare(exp: Experiment, source: str = "config") -> DataSplits:
    """Build and check the data, and fill what the config may leave to the data (a feature
    encoder's ``in_dim``); errors name the file, the split or the key."""
    _fit_graph(exp, source)
    splits = exp.data.build(exp.seed)
    splits.check(source)
    _fit_feature_dims(exp, splits, source)
    return splits


#: models that smooth over the bag graph (Sm, Eq. 8 of the Sm paper): SmAP / SmTAP need it, and pseudo_label's
#: instance model is the identity without it
GRAPH_MODELS = ("smap", "smtap", "smoothed_instance")
GRAPH_METHODS = ("pseudo_label",)


def config_sections(obj: object, prefix: str) -> list[tuple[str, object]]:
    """(dotted key, section) of a config object and of every config section nested in it, depth first."""
    from pydantic import BaseModel

    if not isinstance(obj, BaseModel):
        return []
    out: list[tuple[str, object]] = [(prefix, obj)]
    for name in type(obj).model_fields:
        out += config_sections(getattr(obj, name), f"{prefix}.{name}")
    return out


def _graph_users(obj: object, prefix: str) -> list[tuple[str, str]]:
    """(dotted key, name) of the config sections (the method, any model inside it) that smooth over the bag graph."""
    return [(key, sec.name) for key, sec in config_sections(obj, prefix)
            if getattr(sec, "name", None) in GRAPH_MODELS + GRAPH_METHODS]


def _fit_graph(exp: Experiment, source: str) -> None:
    """``data.graph`` (the 8-neighbour patch graph from the coords) for a method or model that smooths over it,
    when the data can build one: turned on when the config leaves it out (with a notice, recorded in
    config.yaml); ``false`` given is an error for SmAP / SmTAP (they need it) and a warning for pseudo_label
    (its smoothing is then the identity). Checked before anything is written."""
    from milkit.config import ConfigError

    users = _graph_users(exp.method, "method")
    if not users or "graph" not in type(exp.data).model_fields or exp.data.graph:
        return
    need = [(k, n) for k, n in users if n in ("smap", "smtap")]
    key, name = (need or users)[0]
    if "graph" not in exp.data.model_fields_set:
        log.info("data.graph = true: %s.name %r smooths over the patch graph (8 neighbours, from the coords)", key, name)
        exp.data.graph = True
    elif need:
        raise ConfigError(f"{source}: config key 'data.graph' is false, but {key}.name {name!r} needs the patch graph; "
                          "set data.graph: true (or leave it out)")
    else:
        log.warning("data.graph is false: %s.name %r then smooths over nothing (Sm is the identity, no spatial "
                    "prior); leave data.graph out or set it true for the recipe as measured", key, name)


def _encoder_sections(obj: object, prefix: str) -> list[tuple[str, object]]:
    """(dotted key, EncoderConfig) of every encoder section inside a config object."""
    from milkit.nn.encoders import EncoderConfig

    return [(key, sec) for key, sec in config_sections(obj, prefix) if isinstance(sec, EncoderConfig)]


def trained_feature_dim(exp: Experiment) -> int | None:
    """The feature size D a run's model takes: its config's feature-encoder ``in_dim`` (or the method's own,
    ``pseudo_label``), as training resolved it; None where the config does not record a single one."""
    from milkit.config import FEATURE_ENCODERS

    dims = {e.in_dim for _, e in _encoder_sections(exp.method, "method")
            if e.name in FEATURE_ENCODERS and e.in_dim is not None}
    own = getattr(exp.method, "in_dim", None)
    if isinstance(own, int):
        dims.add(own)
    return dims.pop() if len(dims) == 1 else None


def _fit_feature_dims(exp: Experiment, splits: DataSplits, source: str) -> None:
    """A feature encoder's ``in_dim`` is read from the first training bag when the config leaves
    it out; when it is given and differs from the features' D, both numbers are named."""
    from milkit.config import FEATURE_ENCODERS, ConfigError

    sections = _encoder_sections(exp.method, "method")
    if not sections or len(splits.train) == 0:
        return
    bag = splits.train[0]
    where = bag.meta.get("path") or f"bag {bag.bag_id!r}"
    features = bag.instances.ndim == 2
    for key, enc in sections:
        if features == (enc.name in FEATURE_ENCODERS):
            continue
        if features and "name" not in enc.model_fields_set:  # left out: the features as they are
            log.info("%s.name = identity: the instances in %s are feature vectors (D = %d), not images for the "
                     "default %r", key, where, int(bag.instances.shape[1]), enc.name)
            enc.name = "identity"
            continue
        kind = (f"feature vectors (D = {int(bag.instances.shape[1])})" if features
                else f"images ({' × '.join(str(x) for x in bag.instances.shape[1:])})")
        want = ", ".join(FEATURE_ENCODERS) if features else "an image encoder (lenet5, small_cnn, resnet18, …)"
        raise ConfigError(f"{source}: config key '{key}.name' is {enc.name!r}, an encoder of "
                          f"{'images' if features else 'feature vectors'}, but the instances in {where} are {kind}; "
                          f"use {want}")
    if not features:
        return
    d = int(bag.instances.shape[1])
    for key, enc in [(k, e) for k, e in sections if e.name in FEATURE_ENCODERS]:
        if enc.in_dim is None:
            enc.in_dim = d
            log.info("%s.in_dim = %d, read from %s", key, d, where)
        elif enc.in_dim != d:
            raise ConfigError(f"{source}: config key '{key}.in_dim' is {enc.in_dim} but the features in {where} "
                              f"have D = {d}; set it to {d} or leave it out")


def _check_same_config(run: RunDir, exp: Experiment) -> None:
    """--resume continues the run's own experiment: a different config is an error naming the key."""
    old = run.read_raw_config()
    new = exp.to_dict()
    for cfg in (old, new):  # how many processes train the replicas changes no result: any P may resume
        if isinstance(cfg.get("trainer"), dict):
            cfg["trainer"].pop("parallel_seeds", None)
        if isinstance(cfg.get("data"), dict):  # bags kept in memory change no batch (tests/data/test_bag_cache.py)
            cfg["data"].pop("cache_gb", None)
            cfg["data"].pop("preload", None)

    def diff(a: object, b: object, key: str) -> str | None:
        if isinstance(a, dict) and isinstance(b, dict):
            for k in sorted(set(a) | set(b), key=str):
                d = diff(a.get(k), b.get(k), f"{key}.{k}" if key else str(k))
                if d:
                    return d
            return None
        if isinstance(a, str) and isinstance(b, str) and not Path(a).is_absolute() and str(Path.cwd() / a) == b:
            return None  # a run written with relative paths (before absolute_paths), resumed from its folder
        return None if a == b else key

    bad = diff(old, new, "")
    if bad:
        raise ValueError(f"{run.config_path}: --resume needs the run's own config, but '{bad}' differs; "
                         "use --overwrite to start again with the new one")


def load_labelers(run_dir: str | Path) -> tuple[Method, dict[str, Labeler], Experiment]:
    """Rebuild a run's method and every stage's labeler from the run directory alone."""
    run = RunDir(run_dir)
    exp = run.read_config()
    from milkit.trust import ensemble

    method, labelers = ensemble.load(make_method, exp, run)  # the seed ensemble when trainer.seeds > 1
    return method, labelers, exp


def stage_labeler(run_dir: str | Path, stage: str | None) -> tuple[Method, str, Labeler, Experiment]:
    """(method, stage, its labeler, experiment) of a run; ``stage`` None: the method's primary stage (the last
    stage where the method has none of that name); a stage the run lacks is an error naming them."""
    method, labelers, exp = load_labelers(run_dir)
    stage = stage or (method.primary_stage if method.primary_stage in labelers else list(labelers)[-1])
    if stage not in labelers:
        raise ValueError(f"{run_dir}: no stage {stage!r}; stages: {', '.join(labelers)}")
    return method, stage, labelers[stage], exp


def _splits_for(exp: Experiment, data_yaml: Path | None, run_dir: str | Path | None = None) -> DataSplits:
    """The run's data (its ``config.yaml``), or the ``data`` section of ``data_yaml`` (``--data``)."""
    if data_yaml is None:
        try:
            return exp.data.build(exp.seed)
        except FileNotFoundError as err:
            if run_dir is None:
                raise
            raise FileNotFoundError(f"{err}; {Path(run_dir) / 'config.yaml'} names it: if the data moved (a run "
                                    "copied from another machine), pass --data DATA.yaml, a YAML with the run's "
                                    "'data' section and the new paths") from None
    raw = load_yaml(data_yaml)
    section = raw.get("data", raw)
    if not isinstance(section, dict) or "kind" not in section:
        raise ValueError(f"{data_yaml}: needs a 'data' section with 'kind'")
    cls = registry.lookup(registry.DATASETS, "dataset", section["kind"])
    data = validate_section(cls, section, "data", str(data_yaml))
    if getattr(exp.data, "graph", False) and "graph" in type(data).model_fields and "graph" not in data.model_fields_set:
        data.graph = True  # the run's model smooths over the patch graph: these bags get it too
    return data.build(exp.seed)


def evaluate_run(run_dir: str | Path, data_yaml: Path | None = None) -> dict:
    """Re-score every stage on validation and test (of the run's data, or of ``data_yaml``); rewrites
    RUN_DIR/metrics.json (keeps other keys; ``_run.evaluated_data`` names ``data_yaml``) and RUN_DIR/report.html
    (ROC curves, score histograms, training curves)."""
    run = RunDir(run_dir)
    method, labelers, exp = load_labelers(run_dir)
    splits = _splits_for(exp, data_yaml, run_dir)
    scores: dict = {}
    metrics = method.evaluate(labelers, splits, run, scores)
    from milkit.trust import assess

    assess.add_trust(metrics, labelers, splits, exp, scores)
    old = run.read_metrics()
    old.update(metrics)
    if data_yaml is not None:
        old.setdefault("_run", {})["evaluated_data"] = str(Path(data_yaml).resolve())
    from milkit import io

    io.write_json(run.metrics_path, old)
    write_report(run.path, old, scores)
    return old


def label_run(run_dir: str | Path, out: Path | None, data_yaml: Path | None, split: str, stage: str | None) -> list[Path]:
    """Write labels of ``split`` (of the run's data, or of ``data_yaml``) with one stage."""
    method, stage, labeler, exp = stage_labeler(run_dir, stage)
    from milkit.trust.verdict import do_not_use_warning

    ds = _splits_for(exp, data_yaml, run_dir).get(split)
    out = Path(out) if out is not None else Path(run_dir) / "labels"
    warning = do_not_use_warning(RunDir(run_dir).read_metrics(), stage)
    if warning:
        log.warning("%s", warning)
    return method.label(labeler, ds, out, stage)


def print_cv_table(summary: dict, split: str = "test", console: Console | None = None) -> None:
    """Rich table of a cross-validation summary (milkit.cross_validation): mean ± sd over the folds."""
    from milkit.cross_validation import table_rows

    t = Table(title=f"milkit — {split} split, {summary['folds']} folds (mean ± sd)")
    for col in ("stage", "bag AUROC", "inst AUROC", "inst F1"):
        t.add_column(col)
    for row in table_rows(summary, split):
        t.add_row(*row)
    (console or Console()).print(t)


def print_table(metrics: dict, split: str = "test", console: Console | None = None) -> None:
    """Rich table, one row per stage: bag AUROC and instance AUROC / F1 / accuracy, or, for
    pixel-map methods, classification error, F1+, F1−, IoU and HD on positive images."""
    console = console or Console()
    rows = [(stage, m) for stage, m in stage_metrics(metrics).items() if split in m]
    pixel = any("f1_pos" in m[split] for _, m in rows)
    cols = (("image AUROC", "bag_auroc"), ("cls err", "classification_error"), ("F1+", "f1_pos"),
            ("F1−", "f1_neg"), ("IoU", "iou"), ("HD pos", "hd_pos")) if pixel else (
        ("bag AUROC", "bag_auroc"), ("inst AUROC", "instance_auroc"), ("inst F1", "instance_f1"),
        ("inst acc", "instance_accuracy"))
    t = Table(title=f"milkit — {split} split")
    for col in ("stage", *(c for c, _ in cols), "threshold"):
        t.add_column(col)

    def f(v: object) -> str:
        return f"{v:.3f}" if isinstance(v, (int, float)) else "—"

    for stage, m in rows:
        s = m[split]
        thr = (m.get("threshold") or {}).get("threshold")
        t.add_row(stage, *(f(s.get(k)) for _, k in cols), f(thr))
    console.print(t)

"""The ``milkit`` command line: train, label, evaluate, demo, benchmark (+ slide commands).

Errors a user can fix (bad config, missing file, malformed data) print one line
naming the file and the problem and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from milkit import registry

app = typer.Typer(add_completion=False, no_args_is_help=True, help="milkit: weak labels in, dense labels out.")
bench_app = typer.Typer(no_args_is_help=True, help="Reproduction and speed benchmarks (not tests).")
app.add_typer(bench_app, name="benchmark")


class UserError(Exception):
    """Raised for problems the user can fix; the CLI prints it and exits 2."""


def fail(msg: str) -> None:
    raise UserError(msg)


@app.command()
def train(
    config: Path = typer.Argument(..., help="experiment YAML, or a shipped config's name (see 'milkit configs')"),
    out: Path = typer.Option(..., "--out", help="run directory to create (new or empty)"),
    set_: Optional[List[str]] = typer.Option(
        None, "--set", help="override, key.sub=value (repeatable); key=null removes the key (its default applies)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace the milkit run already in --out"),
    resume: bool = typer.Option(
        False, "--resume", help="continue an interrupted run in --out (finished stages kept, the unfinished one from last.ckpt)"
    ),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="seed replicas per stage (trainer.seeds)"),
    folds: Optional[int] = typer.Option(
        None, "--folds", min=2, help="K-fold cross-validation: OUT/fold-<k>/ runs and OUT/cv_summary.{json,md} (mean ± sd)"
    ),
    parallel_seeds: Optional[str] = typer.Option(
        None, "--parallel-seeds", help="train the seed replicas in up to P processes at once, or 'auto' (trainer.parallel_seeds)"
    ),
) -> None:
    """Train a method on bag labels only; writes a self-describing run directory."""
    from milkit.config import load_experiment
    from milkit.shipped_configs import resolve_config
    from milkit.workflow import train_run

    if config.is_dir():
        fail(f"{config}: is a folder, not an experiment YAML")
    if parallel_seeds is not None and parallel_seeds != "auto" and not (parallel_seeds.isdigit() and int(parallel_seeds) >= 1):
        fail(f"--parallel-seeds: {parallel_seeds!r} is not a process count: use a whole number >= 1 or 'auto'")
    path = resolve_config(config)
    extra = ([f"trainer.seeds={seeds}"] if seeds else []) + (
        [f"trainer.parallel_seeds={parallel_seeds}"] if parallel_seeds is not None else [])
    overrides = list(set_ or []) + extra
    exp = load_experiment(path, overrides)
    from milkit.trust.verdict import few_slides_notice, label_free_threshold_notice, print_verdicts

    if folds is not None:
        from milkit import cross_validation as cv
        from milkit.workflow import print_cv_table

        exps = [load_experiment(path, overrides + cv.fold_overrides(exp, folds, k)) for k in range(folds)]
        mode = getattr(exp.data, "split_mode", None)
        if mode not in (None, "kfold"):
            typer.echo(f"milkit: --folds {folds}: k-fold splits of every labelled slide replace data.split_mode "
                       f"{mode!r} (a split column of the labels CSV is not used)", err=True)
        summary, per_fold = cv.run_folds(exps, out, train_run, overwrite=overwrite, resume=resume, source=str(path))
        if not summary:
            return
        print_cv_table(summary)
        for line in cv.pooled_lines(summary):
            typer.echo(line)
        typer.echo(f"summary: {out / cv.SUMMARY_MD}")
        notice = label_free_threshold_notice(per_fold[0])
        if notice:
            typer.echo(notice, err=True)
        for k, m in enumerate(per_fold):  # last, so they are what the user sees
            print_verdicts(m, lambda line, k=k: typer.echo(f"fold-{k} {line}"))
        for line in cv.pooled_verdict_lines(summary):  # the verdict of `milkit label` on this folder
            typer.echo(line)
        return
    metrics = train_run(exp, out, overwrite=overwrite, resume=resume, source=str(path))
    if not metrics:  # a DDP rank other than 0: rank 0 wrote and prints the results
        return
    from milkit.workflow import print_table

    print_table(metrics)
    fields = type(exp.data).model_fields
    few = few_slides_notice(metrics, f"`milkit train {config} --out {out}-cv --folds 5`"
                            + (" (with the same --set options)" if set_ else "")) if (
        "folds" in fields or "n_folds" in fields) else None  # what cross_validation.fold_overrides accepts
    for notice in (label_free_threshold_notice(metrics), few):
        if notice:
            typer.echo(notice, err=True)
    print_verdicts(metrics, typer.echo)  # last, so it is what the user sees


@app.command()
def label(
    run_dir: Path = typer.Argument(..., help="a run directory written by milkit train, or a --folds "
                                   "cross-validation folder (with --slides / --features: cohort slides out of fold, "
                                   "new slides by the ensemble of the folds)"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default RUN_DIR/labels)"),
    data: Optional[Path] = typer.Option(None, "--data", help="YAML with a 'data' section to label instead"),
    split: str = typer.Option("test", "--split", help="train, val or test"),
    stage: Optional[str] = typer.Option(None, "--stage", help="stage to use (default: the method's final stage)"),
    slides: Optional[List[Path]] = typer.Option(
        None, "--slides", help="slide files (or folders) to label (whole-slide outputs; features from --features, "
        "else the run's features folder)"
    ),
    features: Optional[Path] = typer.Option(
        None, "--features", help="folder of <slide>.h5 feature files; alone, every h5 in it is labelled without "
        "its slide (size from the h5, heatmap on a white canvas)"
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace labels of another run or stage already in "
                                   "--out (labels of this run and stage are kept and added to)"),
    review_fraction: Optional[float] = typer.Option(
        None, "--review-fraction", help="share of each slide's patches that review.geojson outlines for annotation "
        "(default 0.02; docs/benchmarks.md 'The review loop')"),
) -> None:
    """Write instance labels (CSV) for a split, or whole-slide outputs with --slides / --features."""
    if (slides or features is not None) and data is not None:
        fail(f"--data {data}: labels a split of a dataset; it cannot be combined with --slides / --features")
    if overwrite and not (slides or features is not None):
        fail("--overwrite: applies to whole-slide labels (--slides / --features); split labels are rewritten as they are")
    if review_fraction is not None and not (slides or features is not None):
        fail("--review-fraction: applies to whole-slide labels (--slides / --features), which write review.geojson")
    if slides or features is not None:
        from milkit.slide.labeling import label_slides

        paths = label_slides(run_dir, slides, features, out, stage, progress=sys.stderr.isatty(), overwrite=overwrite,
                             review_fraction=review_fraction)
        typer.echo(slide_outputs_summary(paths))
        return
    from milkit.cross_validation import fold_runs
    from milkit.workflow import label_run

    folds = fold_runs(run_dir)
    if folds:
        fail(f"{run_dir}: a cross-validation folder; --split labels one run's split: give a fold's run (e.g. "
             f"{folds[0]}), or label slides with every fold (--features / --slides)")
    for p in label_run(run_dir, out, data, split, stage):
        typer.echo(str(p))


def slide_outputs_summary(paths: list[Path]) -> str:
    """What ``label --slides/--features`` wrote, in two lines (not seven paths a slide)."""
    table = next(p for p in paths if p.name == "slides.csv")
    dirs = sorted({p.parent for p in paths if p.parent != table.parent})
    names = sorted({p.name for p in paths if p.parent != table.parent})
    return (f"labelled {len(dirs)} slide(s) → {table.parent}/<slide>/: {', '.join(names)}\n"
            f"slide table: {table}")


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="a run directory written by milkit train"),
    annotations: Optional[Path] = typer.Option(
        None, "--annotations", help="folder of ASAP XML / GeoJSON annotations to score slide labels against"
    ),
    labels: Optional[Path] = typer.Option(None, "--labels", help="folder written by 'milkit label --slides'"),
    data: Optional[Path] = typer.Option(
        None, "--data", help="YAML with a 'data' section to score on instead of the run's (data that moved)"),
) -> None:
    """Score every stage on validation and test (metrics.json, report.html), or slide labels against annotations."""
    from milkit.workflow import evaluate_run, print_table

    if labels is not None and annotations is None:
        fail(f"--labels {labels}: needs --annotations DIR (labels are scored against annotations)")
    if data is not None and annotations is not None:
        fail(f"--data {data}: scores the run's splits; --annotations scores the slide labels of --labels instead")
    if annotations is not None:
        from milkit.slide.labeling import evaluate_annotations

        metrics = evaluate_annotations(run_dir, annotations, labels)
        keys = ("n_slides", "slide_auroc", "instance_auroc", "instance_f1", "froc")
        for split, m in metrics["splits"].items():  # per split, never pooled
            typer.echo(f"{split}: " + "  ".join(f"{k} {m[k]:.4g}" if isinstance(m[k], float) else f"{k} {m[k]}"
                                                  for k in keys if k in m))
        from milkit.slide.cohort import is_labelling_run

        where = Path(run_dir) if is_labelling_run(Path(run_dir)) else Path(metrics["labels_dir"])
        typer.echo(f"report: {where / 'report_annotations.html'}")
    else:
        metrics = evaluate_run(run_dir, data)
        print_table(metrics)
        from milkit.trust.verdict import print_verdicts

        print_verdicts(metrics, typer.echo)
        typer.echo(f"report: {Path(run_dir) / 'report.html'}")


@app.command()
def configs(
    copy: Optional[str] = typer.Option(None, "--copy", help="shipped config to copy (e.g. sm/camelyon16_smap.yaml)"),
    to: Path = typer.Option(Path("."), "--to", help="folder (or file) to copy it to"),
) -> None:
    """List the experiment YAMLs milkit ships (one per paper setting), or copy one to edit."""
    from milkit import io
    from milkit.shipped_configs import describe, list_configs, resolve_config

    if copy is None:
        shipped = list_configs()
        if not shipped:
            fail("no shipped configs found (neither a source checkout nor <prefix>/share/milkit/configs)")
        for name, path in shipped.items():
            typer.echo(f"{name:48s} {describe(path)}")
        return
    src = resolve_config(copy)
    dest = to / src.name if to.is_dir() or not to.suffix else to  # a folder, existing or not, or a .yaml path
    if dest.exists():
        fail(f"{dest}: already exists; not overwritten")
    io.write_text(dest, src.read_text())
    typer.echo(str(dest))


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="run directory"),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """ABMIL vs Distill-to-Label teacher vs student on bundled digit-bags (a few minutes on a CPU)."""
    from milkit.demo import run_demo

    run_demo(out, seed)


_registered: list[bool] = []


def _register_plugins(argv: list[str] | None = None) -> None:
    """Add the plugin commands. Benchmark modules import torch, so they are imported only when
    the command line asks for ``milkit benchmark`` (``--help`` and the other commands stay fast)."""
    if not _registered:
        for mod in registry.COMMAND_MODULES:
            registry.resolve(f"{mod}:register")(app)
        _registered.append(True)
    args = sys.argv[1:] if argv is None else argv
    if not bench_app.registered_commands and next((a for a in args if not a.startswith("-")), None) == "benchmark":
        for mod in registry.BENCHMARK_MODULES:
            registry.resolve(f"{mod}:register")(bench_app)


#: set to 1 to see the traceback of an unexpected error instead of the one-line message
DEBUG_ENV = "MILKIT_DEBUG"


def _click_exception() -> type[Exception]:
    """The ClickException class typer uses (typer ≥ 0.20 vendors click as ``typer._click``)."""
    return next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _one_line(msg: str) -> str:
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    return "; ".join(lines) if lines else "(no message)"


def _print_error(msg: str) -> None:
    sys.stderr.write(f"error: {_one_line(msg)}\n")
    sys.stderr.flush()


def user_message(err: BaseException) -> str | None:
    """The one-line message of an error the user can fix, or None for an unexpected one."""
    from pydantic import ValidationError

    from milkit.config import ConfigError

    if isinstance(err, ValidationError):  # a config object built outside config.py
        parts = [f"{'.'.join(map(str, e['loc'])) or e.get('title', '')}: {e['msg']}" for e in err.errors()]
        return f"{err.title}: " + "; ".join(parts)
    from milkit.io import DiskFullError

    if isinstance(err, DiskFullError):
        return str(err)
    if isinstance(err, OSError) and not isinstance(err, FileNotFoundError) and err.strerror and err.filename:
        return f"{err.filename}: {err.strerror}"
    if isinstance(err, KeyError):
        return str(err.args[0]) if err.args else "missing key"
    if isinstance(err, (UserError, ConfigError, FileNotFoundError, FileExistsError, ValueError, OSError)):
        return str(err)
    return None


def _log_notices() -> None:
    """milkit's own warnings and notices (e.g. a validation split carved from train) go to
    stderr as ``milkit: ...`` lines."""
    import logging

    class StderrHandler(logging.StreamHandler):
        """Writes to whatever ``sys.stderr`` is at the time (it may be replaced after main starts)."""

        @property  # type: ignore[override]
        def stream(self):
            return sys.stderr

        @stream.setter
        def stream(self, value) -> None:
            pass

    logger = logging.getLogger("milkit")
    if not any(getattr(h, "_milkit", False) for h in logger.handlers):
        h = StderrHandler()
        h.setFormatter(logging.Formatter("milkit: %(message)s"))
        h._milkit = True  # type: ignore[attr-defined]
        logger.addHandler(h)
        logger.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status.

    2: a problem the user can fix (usage, config, data, files), one line on stderr naming it;
    1: an unexpected error, one line, the traceback with ``MILKIT_DEBUG=1``; 130: Ctrl-C.
    """
    import os

    click_exc = _click_exception()
    _log_notices()
    try:
        _register_plugins(argv)
        app(args=argv, standalone_mode=False, prog_name="milkit")
    except typer.Exit as e:
        return int(e.exit_code)
    except typer.Abort:
        _print_error("aborted")
        return 1
    except KeyboardInterrupt:
        _print_error("interrupted")
        return 130
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except click_exc as err:  # usage errors: missing option, bad value, unknown command
        msg = err.format_message()  # type: ignore[attr-defined]
        if msg:  # empty: 'milkit' alone, whose help is already printed
            ctx = getattr(err, "ctx", None)
            _print_error(f"{msg} (see '{ctx.command_path} --help')" if ctx is not None else msg)
        return 2
    except Exception as err:  # noqa: BLE001 - every error ends in one line
        msg = user_message(err)
        if msg is not None:
            if os.environ.get(DEBUG_ENV):
                raise
            _print_error(msg)
            return 2
        if os.environ.get(DEBUG_ENV):
            raise
        _print_error(f"unexpected {type(err).__name__}: {err} (rerun with {DEBUG_ENV}=1 for the traceback)")
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

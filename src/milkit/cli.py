"""The ``milkit`` command line: train, label, evaluate, demo, benchmark (+ slide commands).

Errors a user can fix (bad config, missing file, malformed data) print one line
naming the file and the problem and exit with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from milkit import registry

app = typer.Typer(add_completion=False, no_args_is_help=True, help="milkit: weak labels in, dense labels out.")
bench_app = typer.Typer(no_args_is_help=True, help="Reproduction and speed benchmarks (not tests).")
app.add_typer(bench_app, name="benchmark")
err_console = Console(stderr=True)


class UserError(Exception):
    """Raised for problems the user can fix; the CLI prints it and exits 2."""


def fail(msg: str) -> None:
    raise UserError(msg)


@app.command()
def train(
    config: Path = typer.Argument(..., help="experiment YAML, or a shipped config's name (see 'milkit configs')"),
    out: Path = typer.Option(..., "--out", help="run directory to create"),
    set_: Optional[List[str]] = typer.Option(None, "--set", help="override, key.sub=value (repeatable)"),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help="seed replicas per stage (trainer.seeds)"),
) -> None:
    """Train a method on bag labels only; writes a self-describing run directory."""
    from milkit.config import load_experiment
    from milkit.shipped_configs import resolve_config
    from milkit.workflow import train_run

    exp = load_experiment(resolve_config(config), list(set_ or []) + ([f"trainer.seeds={seeds}"] if seeds else []))
    metrics = train_run(exp, out)
    from milkit.workflow import print_table

    print_table(metrics)
    from milkit.trust.verdict import print_verdicts

    print_verdicts(metrics, typer.echo)  # last, so it is what the user sees


@app.command()
def label(
    run_dir: Path = typer.Argument(..., help="a run directory written by milkit train"),
    out: Optional[Path] = typer.Option(None, "--out", help="output folder (default RUN_DIR/labels)"),
    data: Optional[Path] = typer.Option(None, "--data", help="YAML with a 'data' section to label instead"),
    split: str = typer.Option("test", "--split", help="train, val or test"),
    stage: Optional[str] = typer.Option(None, "--stage", help="stage to use (default: the method's final stage)"),
    slides: Optional[List[Path]] = typer.Option(
        None, "--slides", help="slide files (or folders) to label; needs --features (whole-slide outputs)"
    ),
    features: Optional[Path] = typer.Option(None, "--features", help="folder of <slide>.h5 feature files"),
) -> None:
    """Write instance labels (CSV) for a split, or whole-slide outputs with --slides."""
    if slides:
        from milkit.slide.labeling import label_slides

        paths = label_slides(run_dir, slides, features, out, stage)
    else:
        from milkit.workflow import label_run

        paths = label_run(run_dir, out, data, split, stage)
    for p in paths:
        typer.echo(str(p))


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="a run directory written by milkit train"),
    annotations: Optional[Path] = typer.Option(
        None, "--annotations", help="folder of ASAP XML / GeoJSON annotations to score slide labels against"
    ),
    labels: Optional[Path] = typer.Option(None, "--labels", help="folder written by 'milkit label --slides'"),
) -> None:
    """Score every stage on validation and test (metrics.json, report.html), or slide labels against annotations."""
    from milkit.workflow import evaluate_run, print_table

    if annotations is not None:
        from milkit.slide.labeling import evaluate_annotations

        metrics = evaluate_annotations(run_dir, annotations, labels)
        keys = ("n_slides", "instance_auroc", "instance_f1", "instance_accuracy", "slide_auroc")
        for k in keys:
            if k in metrics:
                typer.echo(f"{k}: {metrics[k]}")
        where = Path(run_dir) if (Path(run_dir) / "config.yaml").is_file() else Path(metrics["labels_dir"])
        typer.echo(f"report: {where / 'report_annotations.html'}")
    else:
        metrics = evaluate_run(run_dir)
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


def _register_plugins() -> None:
    for mod in registry.COMMAND_MODULES:
        registry.resolve(f"{mod}:register")(app)
    for mod in registry.BENCHMARK_MODULES:
        registry.resolve(f"{mod}:register")(bench_app)


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    from milkit.config import ConfigError

    _register_plugins()
    try:
        app(args=argv, standalone_mode=False)
    except (UserError, ConfigError, FileNotFoundError, ValueError, KeyError, OSError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        err_console.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
        return 2
    except typer.Exit as e:  # pragma: no cover
        return e.exit_code
    except typer.Abort:  # pragma: no cover
        return 1
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as err:  # click usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            return err.exit_code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

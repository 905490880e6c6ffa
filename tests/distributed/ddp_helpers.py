"""Shared pieces of the multi-process tests: a small generated feature-bag set, the command
runner (every rank a real process: Lightning's ``ddp`` re-runs the command line) and the write
trace of ``trace_site/sitecustomize.py``."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
#: hard feature bags (issue 11 §1), small: 16 training bags (a multiple of 2 ranks × batch 1,
#: so the two-process run has no padded step), 12 validation, 12 test, 16–49 patches of 32-d
DATA = {"kind": "hard_bags", "level": "easy", "n_train": 16, "n_val": 12, "n_test": 12, "min_side": 4,
        "max_side": 7, "feature_dim": 32, "missing_rate": 0.1, "signal": 12.0, "witness_rate": [0.2, 0.4]}
#: one process at batch 2 = two processes at batch 1 each (module doc of milkit.distributed)
ONE = {"accelerator": "cpu", "devices": 1, "batch_size": 2, "progress_bar": False, "log_every_n_steps": 1}
TWO = ["--set", "trainer.devices=2", "--set", "trainer.strategy=ddp", "--set", "trainer.batch_size=1"]


def write_config(path: Path, method: dict, trainer: dict) -> Path:
    """An experiment YAML on DATA."""
    exp = {"seed": 0, "data": DATA, "method": method, "trainer": {**ONE, **trainer}}
    path.write_text(yaml.safe_dump(exp, sort_keys=False))
    return path


def env_for(trace_root: Path, trace_dir: Path) -> dict:
    """The environment of a multi-process command: milkit's sources, the write trace, one thread
    per process, and no launcher variables of the calling process."""
    trace_dir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "PL_GLOBAL_SEED") and not k.startswith(("SLURM_", "TORCHELASTIC"))}
    env.update({"PYTHONPATH": os.pathsep.join([str(SRC), str(HERE / "trace_site")]), "OMP_NUM_THREADS": "1",
                "MILKIT_TRACE_ROOT": str(trace_root), "MILKIT_TRACE_DIR": str(trace_dir)})
    return env


def run(cmd: list[str], env: dict, timeout: int = 400) -> subprocess.CompletedProcess:
    """Run a command; a failure shows the end of its output."""
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd[:4]} exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"
    return p


def milkit(*args: str) -> list[str]:
    return [sys.executable, "-m", "milkit.cli", *args]


def read_trace(trace_dir: Path) -> dict[str, dict]:
    """Per process (pid): the rank it started as, its command, and its (rank, event, path) records."""
    out = {}
    for f in trace_dir.glob("*.tsv"):
        lines = [ln.split("\t") for ln in f.read_text().splitlines() if ln]
        out[f.stem] = {"start_rank": lines[0][0], "argv": lines[0][2], "events": [tuple(x) for x in lines[1:]]}
    return out


def val_epochs(run_dir: Path, stage: str) -> list[dict[str, float]]:
    """The validation rows of a stage's CSV log, one per epoch."""
    rows = csv.DictReader((run_dir / "stages" / stage / "logs" / "metrics.csv").open())
    return [{k: float(v) for k, v in r.items() if v} for r in rows if r.get("val/bag_auroc")]


def files(run_dir: Path) -> set[str]:
    """Every file of a run directory, relative."""
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}

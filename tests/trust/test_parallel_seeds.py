"""Seed replicas in worker processes (``trainer.parallel_seeds``, milkit.trust.parallel_seeds):
K = 2 replicas in P = 2 workers give the files, weights and metrics of the one-process loop;
``--resume`` keeps a finished replica and runs the unfinished one; a worker's failure is one
line naming the replica (exit 2) with no half-written file; what cannot work is refused before
anything is written. The workers are real processes (one forkserver import for the module)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from milkit.cli import main
from milkit.config import build_experiment
from milkit.trust import parallel_seeds as ps

TINY = {
    "seed": 0,
    "data": {"kind": "spatial_bags", "n_train": 24, "n_val": 16, "n_test": 12, "min_side": 5, "max_side": 6,
             "feature_dim": 8, "signal": 3.0},
    "method": {"name": "mil", "encoder": {"name": "linear", "in_dim": 8, "out_dim": 8}},
    "trainer": {"max_epochs": 2, "lr": 0.005, "progress_bar": False, "accelerator": "cpu", "devices": 1, "seeds": 2},
}


def _files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def _metrics(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    m["_run"].pop("train_seconds")
    return m


def _close(a, b, tol: float = 1e-6) -> None:
    """Nested metrics equal within float tolerance (numbers), exactly otherwise."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _close(a[k], b[k], tol)
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _close(x, y, tol)
    elif isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, abs=tol)
    else:
        assert a == b


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("par")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--out", str(root / "p1")]) == 0
    assert main(["train", str(cfg), "--out", str(root / "p2"), "--parallel-seeds", "2"]) == 0
    return root, cfg


def test_two_workers_give_the_one_process_run(runs):
    root, _ = runs
    p1, p2 = root / "p1", root / "p2"
    assert _files(p2) == _files(p1)
    assert {"stages/mil/seed-0/model.pt", "stages/mil/seed-1/model.pt", "stages/mil/threshold.json"} <= _files(p2)
    for k in (0, 1):
        wa = torch.load(p1 / f"stages/mil/seed-{k}/model.pt", weights_only=True)
        wb = torch.load(p2 / f"stages/mil/seed-{k}/model.pt", weights_only=True)
        assert wa.keys() == wb.keys()
        for key in wa:
            torch.testing.assert_close(wb[key], wa[key], atol=1e-6, rtol=1e-6, msg=key)
    w0 = torch.load(p2 / "stages/mil/seed-0/model.pt", weights_only=True)
    w1 = torch.load(p2 / "stages/mil/seed-1/model.pt", weights_only=True)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # each worker trained its own replica
    _close(_metrics(p1), _metrics(p2))
    assert len(_metrics(p2)["mil"]["seeds"]) == 2  # every replica's metrics, then the ensemble's
    assert yaml.safe_load((p2 / "config.yaml").read_text())["trainer"]["parallel_seeds"] == 2


def _cut_replica(run: Path, k: int) -> None:
    """As if the run had been interrupted inside replica k: its stage unfinished, nothing after it."""
    for name in ("model.pt", "rng_state.pt", "calibration.json"):
        (run / f"stages/mil/seed-{k}" / name).unlink()
    for name in ("metrics.json", "report.html", "stages/mil/threshold.json"):
        (run / name).unlink()


def test_resume_keeps_the_finished_replica_and_trains_the_other(runs, capfd):
    root, cfg = runs
    cut = root / "cut"
    shutil.copytree(root / "p2", cut)
    _cut_replica(cut, 1)
    kept = (cut / "stages/mil/seed-0/model.pt").stat().st_mtime_ns
    capfd.readouterr()
    # resumed with another process count: P changes no result, so the config still matches
    assert main(["train", str(cfg), "--out", str(cut), "--resume", "--parallel-seeds", "2"]) == 0
    err = capfd.readouterr().err
    assert "[seed-0]" in err and "not retrained" in err  # the worker's lines carry its replica
    assert (cut / "stages/mil/seed-0/model.pt").stat().st_mtime_ns == kept
    assert _files(cut) == _files(root / "p2")
    _close(_metrics(root / "p1"), _metrics(cut))


def test_a_worker_failure_is_one_line_naming_the_replica(runs, capfd):
    root, cfg = runs
    bad = root / "bad"
    shutil.copytree(root / "p2", bad)
    _cut_replica(bad, 1)
    ckpt = bad / "stages/mil/seed-1/checkpoints/last.ckpt"
    ckpt.write_bytes(b"not a checkpoint")  # interrupted mid-stage, its checkpoint unreadable
    capfd.readouterr()
    assert main(["train", str(cfg), "--out", str(bad), "--resume", "--parallel-seeds", "2"]) == 2
    err = capfd.readouterr().err
    line = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(line) == 1 and "Traceback" not in err, err
    assert "seed replica 1" in line[0] and str(ckpt) in line[0] and "cannot resume" in line[0]
    assert not (bad / "metrics.json").exists()
    assert not [f for f in _files(bad) if f.endswith(".tmp")]


class _Conn:
    def __init__(self, msg):
        self.msg, self.sent = msg, []

    def recv(self):
        return self.msg

    def send(self, x):
        self.sent.append(x)


def test_a_worker_that_fails_or_dies_is_named():
    err = ps._died(1, 7, -9)
    assert isinstance(err, ps.ReplicaCrashed) and "seed replica 1 (seed 7" in str(err) and "-9" in str(err)
    slot = ps._Slot(None, _Conn(("user", 2, "x.h5: unreadable", "")), replica=2)
    err = ps._read(slot, 10, lambda s: None)
    assert isinstance(err, ps.ReplicaFailed) and str(err).startswith("seed replica 2 (seed 12")  # exit 2
    assert isinstance(ps._read(ps._Slot(None, _Conn(("unexpected", 0, "RuntimeError: boom", ""))), 0, None),
                      ps.ReplicaCrashed)
    given = []
    assert ps._read(ps._Slot(None, _Conn(("ok", 0, 1.0, 2.0)), replica=0), 0, given.append) is None
    assert len(given) == 1  # a finished worker is given the next replica


def _exp(**trainer) -> object:
    return build_experiment({**TINY, "trainer": {**TINY["trainer"], **trainer}})


def test_workers_threads_and_devices(monkeypatch):
    monkeypatch.setattr(ps, "cpu_count", lambda: 8)
    assert ps.n_workers(_exp(parallel_seeds=4, seeds=3)) == 3  # never more workers than replicas
    assert ps.n_workers(_exp(parallel_seeds=4, seeds=1)) == 1  # K = 1: the one-process loop
    assert ps.n_workers(_exp(parallel_seeds="auto", seeds=5)) == 5  # auto on a CPU: one per core, ≤ K
    for v in ps.THREAD_ENV:
        monkeypatch.delenv(v, raising=False)
    assert ps.threads_per_worker(3) == 2 and ps.threads_per_worker(16) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert ps.threads_per_worker(3) is None  # the user's count is kept
    monkeypatch.setattr(ps, "_gpus", lambda exp: 2)
    assert [ps._device_for(_exp(parallel_seeds=3, seeds=3), k) for k in range(3)] == ["0,", "1,", "0,"]


@pytest.mark.parametrize("args,key", [
    (["--parallel-seeds", "0"], "--parallel-seeds"),
    (["--parallel-seeds", "two"], "--parallel-seeds"),
    (["--set", "trainer.parallel_seeds=0"], "trainer.parallel_seeds"),
    (["--parallel-seeds", "2", "--set", "trainer.devices=2", "--set", "trainer.strategy=ddp"], "trainer.parallel_seeds: 2"),
])
def test_bad_combinations_are_refused_before_anything_is_written(tmp_path, capsys, args, key):
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(TINY))
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and key in err, err
    assert not (tmp_path / "run").exists()


def test_a_run_resumes_with_another_process_count(runs):
    from milkit.config import ConfigError
    from milkit.run_dir import RunDir
    from milkit.workflow import _check_same_config

    run = RunDir(runs[0] / "p2")  # written with parallel_seeds: 2
    _check_same_config(run, _exp(parallel_seeds=1))  # P changes no result: accepted
    with pytest.raises((ValueError, ConfigError), match="trainer.lr"):
        _check_same_config(run, _exp(lr=0.02))  # anything else still names the key

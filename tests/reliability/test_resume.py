"""Run directories: a real SIGKILL mid-training then ``--resume``; finished stages are not
retrained and a resumed run ends with the files (and, from a stage boundary, the numbers) of
an uninterrupted one; ``--overwrite``; a failed run does not block its rerun."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from cohort import make_cohort  # noqa: E402

from milkit.cli import main  # noqa: E402


def files(run: Path) -> set[str]:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}


def metrics_without_time(run: Path) -> dict:
    m = json.loads((run / "metrics.json").read_text())
    m["_run"].pop("train_seconds")
    return m


def test_sigkill_mid_training_then_resume(tmp_path, capsys):
    c = make_cohort(tmp_path, max_epochs=12)
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "milkit.cli", "train", str(c["config"]), "--out", str(run)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    last = run / "stages" / "mil" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not last.is_file():
        assert proc.poll() is None, f"training ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline, "no last.ckpt appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    epoch_at_kill = torch.load(last, map_location="cpu", weights_only=True)["epoch"]
    assert epoch_at_kill < 11 and not (run / "metrics.json").exists()

    # a plain rerun is refused, naming --resume; nothing is changed
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    assert main(cmd[3:]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and err.count("\n") == 1, err
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before

    (last.parent / ".last.ckpt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # as if killed mid-write
    r = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming from" in r.stderr and "last.ckpt" in r.stderr
    log = (run / "stages/mil/logs/metrics.csv").read_text().splitlines()
    epochs = {int(ln.split(",")[0]) for ln in log[1:] if ln}
    assert max(epochs) == 11 and set(range(epoch_at_kill + 1, 12)) <= epochs  # continued, up to max_epochs

    ref = tmp_path / "ref"
    assert main(["train", str(c["config"]), "--out", str(ref)]) == 0
    assert files(run) == files(ref)
    assert "stages/mil/checkpoints/last.ckpt" not in files(run)
    m = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= m["mil"]["test"]["bag_auroc"] <= 1.0


def _d2l_config(c: dict) -> Path:
    raw = yaml.safe_load(c["config"].read_text())
    raw["method"] = {"name": "distill_to_label", "baseline": False, "encoder": {"name": "linear", "out_dim": 8}}
    raw["trainer"]["max_epochs"] = 1
    p = c["root"] / "d2l.yaml"
    p.write_text(yaml.safe_dump(raw, sort_keys=False))
    return p


def test_resume_keeps_finished_stages_and_matches_uninterrupted(tmp_path):
    c = make_cohort(tmp_path)
    cfg = _d2l_config(c)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["train", str(cfg), "--out", str(full)]) == 0
    shutil.copytree(full, cut)
    # interrupted in the student stage: teacher done, student begun (no model.pt yet)
    for name in ("model.pt", "rng_state.pt", "threshold.json"):
        (cut / "stages/student" / name).unlink()
    for name in ("metrics.json", "report.html", "stages/teacher/threshold.json"):
        (cut / name).unlink()
    teacher = (cut / "stages/teacher/model.pt").stat().st_mtime_ns
    assert main(["train", str(cfg), "--out", str(cut), "--resume"]) == 0
    assert (cut / "stages/teacher/model.pt").stat().st_mtime_ns == teacher  # not retrained
    assert files(cut) == files(full)
    assert metrics_without_time(cut) == metrics_without_time(full)


def test_overwrite_replaces_a_run_and_a_failed_run_does_not_block(tmp_path, capsys):
    c = make_cohort(tmp_path)
    run = tmp_path / "run"
    bad = c["root"] / "bad.yaml"
    raw = yaml.safe_load(c["config"].read_text())
    raw["data"]["labels_csv"] = str(tmp_path / "missing.csv")
    bad.write_text(yaml.safe_dump(raw))
    assert main(["train", str(bad), "--out", str(run)]) == 2
    assert not run.exists()  # data checked before anything was written
    assert main(["train", str(c["config"]), "--out", str(run)]) == 0
    (run / "stale.txt").write_text("from the old run")
    assert main(["train", str(c["config"]), "--out", str(run), "--set", "trainer.lr=0.02"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["train", str(c["config"]), "--out", str(run), "--set", "trainer.lr=0.02", "--overwrite"]) == 0
    assert not (run / "stale.txt").exists()
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["lr"] == 0.02

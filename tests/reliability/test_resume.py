"""Run directories: a real SIGKILL mid-training then ``--resume``; finished stages are not
retrained and a resumed run ends with the files and the numbers of an uninterrupted one, also
when it stopped inside a stage (the same metrics.csv, best checkpoint and weights: the RNG,
the shuffle generator and the log rows travel in ``last.ckpt``); ``--overwrite``; a failed run
does not block its rerun."""

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

import lightning as L  # noqa: E402

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
    # killed inside the stage, at any moment: the log, the weights and the numbers of the uninterrupted run
    assert (run / "stages/mil/logs/metrics.csv").read_text() == (ref / "stages/mil/logs/metrics.csv").read_text()
    assert_same_weights(run / "stages/mil/model.pt", ref / "stages/mil/model.pt")
    assert metrics_without_time(run) == metrics_without_time(ref)
    assert "stages/mil/checkpoints/last.ckpt" not in files(run)
    m = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= m["mil"]["test"]["bag_auroc"] <= 1.0


def assert_same_weights(a: Path, b: Path, key: str | None = None) -> None:
    wa, wb = (torch.load(p, map_location="cpu", weights_only=True) for p in (a, b))
    if key is not None:
        wa, wb = wa[key], wb[key]
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=f"{a}: {k}")


class Stop(RuntimeError):
    """Raised once at the start of an epoch, as a process killed there would stop."""


class StopAt(L.Callback):
    """After the engine's own callbacks (``last.ckpt`` written) at the start of ``epoch`` of ``stage``."""

    def __init__(self, stage: str, epoch: int):
        self.stage, self.epoch, self.armed = stage, epoch, True

    def on_train_epoch_start(self, trainer, pl_module):
        if self.armed and trainer.current_epoch == self.epoch and Path(trainer.default_root_dir).name == self.stage:
            self.armed = False
            raise Stop(f"stopped at the start of epoch {self.epoch}")


class FinalWeights(L.Callback):
    """Each stage's weights after its last epoch (model.pt holds the best epoch's)."""

    def __init__(self):
        self.weights: dict[str, dict] = {}

    def on_train_end(self, trainer, pl_module):
        name = Path(trainer.default_root_dir).name
        self.weights[name] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _with_callbacks(monkeypatch, *cbs: L.Callback) -> None:
    monkeypatch.setattr(L, "Trainer", _TRAINER)

    class Trainer(_TRAINER):  # type: ignore[misc, valid-type]
        def __init__(self, *a, callbacks=None, **k):
            super().__init__(*a, callbacks=[*(callbacks or []), *cbs], **k)

    monkeypatch.setattr(L, "Trainer", Trainer)


_TRAINER = L.Trainer


#: methods whose steps draw random numbers besides the bag order: dropout (ABMIL head, WENO's teacher),
#: VAT noise bags and perturbations (Distill-to-Label's teacher); lean loop, manual optimisation, two stages
INSIDE = {
    "mil_dropout": ({"name": "mil", "encoder": {"name": "linear", "out_dim": 8},
                     "model": {"name": "abmil", "attention_hidden": 8, "dropout": 0.5}}, "mil"),
    "weno": ({"name": "weno", "encoder": {"name": "linear", "out_dim": 8},
              "teacher": {"name": "abmil", "attention_hidden": 8, "dropout": 0.5},
              "hpm_warmup_epochs": 1, "student_batch_size": 8}, "student"),  # one Lightning stage
    "d2l_teacher_vat": ({"name": "distill_to_label", "baseline": False, "encoder": {"name": "linear", "out_dim": 8},
                         "teacher": {"perturbation": "random", "radius": "ball"}}, "teacher"),
}


@pytest.mark.parametrize("name", list(INSIDE))
def test_resume_inside_a_stage_is_the_uninterrupted_run(tmp_path, monkeypatch, name):
    method, stage = INSIDE[name]
    c = make_cohort(tmp_path, max_epochs=4)
    raw = yaml.safe_load(c["config"].read_text())
    raw["method"] = method
    cfg = c["root"] / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    full, cut = tmp_path / "full", tmp_path / "cut"
    w_full, w_cut = FinalWeights(), FinalWeights()
    _with_callbacks(monkeypatch, w_full)
    assert main(["train", str(cfg), "--out", str(full)]) == 0
    _with_callbacks(monkeypatch, StopAt(stage, 2), w_cut)
    assert main(["train", str(cfg), "--out", str(cut)]) == 1  # stopped inside the stage, after epoch 1
    sd = cut / "stages" / stage
    assert torch.load(sd / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 2
    assert not (sd / "model.pt").exists()
    (sd / "logs/metrics.csv").write_text("epoch,step\n0,")  # what a kill mid-write would leave
    assert main(["train", str(cfg), "--out", str(cut), "--resume"]) == 0
    assert files(cut) == files(full)
    trained = sorted(p.parents[1] for p in (full / "stages").glob("*/logs/metrics.csv"))
    assert stage in [d.name for d in trained]
    for d in trained:
        log_full = (d / "logs/metrics.csv").read_text()
        assert (cut / "stages" / d.name / "logs/metrics.csv").read_text() == log_full, d.name
        assert_same_weights(cut / "stages" / d.name / "model.pt", d / "model.pt")
        assert_same_weights(cut / "stages" / d.name / "checkpoints/best.ckpt", d / "checkpoints/best.ckpt",
                            "state_dict")
        for k, v in w_full.weights[d.name].items():  # after the last epoch
            torch.testing.assert_close(w_cut.weights[d.name][k], v, atol=1e-6, rtol=0, msg=f"{d.name}: {k}")
        if d.name == stage:  # every epoch in the resumed log, each once (as in the uninterrupted one)
            rows = [ln.split(",")[0] for ln in log_full.splitlines()[1:]]
            assert sorted(set(rows)) == ["0", "1", "2", "3"] and len(rows) == 4 * rows.count("0")
    assert metrics_without_time(cut) == metrics_without_time(full)


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

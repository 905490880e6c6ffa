"""``milkit train --resume`` under DDP (two processes, Lightning ``ddp``, gloo): a two-rank
Distill-to-Label run interrupted after its teacher stage, and one interrupted after training
(before metrics.json), resume on two ranks to the files and metrics of the uninterrupted
two-rank run; the finished teacher is not retrained and rank 1 writes nothing.

Both ranks decide from the same files: rank 0 checks the run directory, and rank 1 (started by
Lightning when the first stage that still trains begins, or by torchrun) takes the resume path
for every stage (``workflow.train_run``: "other-rank" resumes when told to), loading the teacher's
``model.pt`` and ``rng_state.pt`` as rank 0 does, so both start the student from the same state.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ddp_helpers import TWO, env_for, files, read_trace, run  # noqa: E402


def _metrics(run_dir: Path) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    m["_run"].pop("train_seconds")
    return m


def _close(a, b, path: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert b == pytest.approx(a, abs=1e-6), path
    else:
        assert a == b, path


@pytest.fixture(scope="module")
def resumed(ddp_job) -> dict:
    full = ddp_job["two"]["d2l"]
    root = ddp_job["root"] / "resume"
    root.mkdir()
    # a run stopped after training, before its evaluation: every model.pt, no threshold or metrics
    shutil.copy(ddp_job["root"] / "d2l.yaml", root / "after_training.yaml")
    shutil.copytree(full, root / "out" / "after_training")
    # a run stopped inside the student stage (the teacher finished): the student begun, not done
    shutil.copy(ddp_job["root"] / "d2l.yaml", root / "in_student.yaml")
    cut = root / "out" / "in_student"
    shutil.copytree(full, cut)
    for name in ("model.pt", "rng_state.pt", "threshold.json", "calibration.json"):
        (cut / "stages/student" / name).unlink()
    for d in (root / "out" / "after_training", cut):
        for name in ("metrics.json", "report.html", "stages/teacher/threshold.json", "stages/student/threshold.json"):
            (d / name).unlink(missing_ok=True)
    teacher = {p: p.stat().st_mtime_ns for p in (cut / "stages/teacher").rglob("*")
               if p.is_file() and p.name not in ("threshold.json", "calibration.json")}
    job = [sys.executable, str(Path(__file__).parent / "ddp_job.py"), str(root / "out"),
           str(root / "after_training.yaml"), str(root / "in_student.yaml"), "--", *TWO, "--resume"]
    proc = run(job, env_for(root / "out", root / "trace"))
    return {"full": full, "after": root / "out" / "after_training", "cut": cut, "teacher": teacher,
            "stdout": proc.stdout, "stderr": proc.stderr, "trace": read_trace(root / "trace")}


def test_resumed_two_rank_runs_end_as_the_uninterrupted_one(resumed) -> None:
    full = resumed["full"]
    for d in (resumed["after"], resumed["cut"]):
        assert files(d) == files(full), d.name
        _close(_metrics(full), _metrics(d), d.name)
        for stage in ("teacher", "student"):
            a, b = (json.loads((x / "stages" / stage / "threshold.json").read_text()) for x in (full, d))
            _close(a, b, stage)
    import torch

    wa = torch.load(full / "stages/student/model.pt", weights_only=True)
    wb = torch.load(resumed["cut"] / "stages/student/model.pt", weights_only=True)
    for k in wa:  # the student was retrained on two ranks from the same state: the same weights
        torch.testing.assert_close(wb[k], wa[k], atol=1e-6, rtol=1e-6, msg=k)
    assert resumed["stdout"].count("milkit — test split") == 2  # rank 0 alone prints, once per run


def test_finished_stages_are_not_retrained_and_rank_one_writes_nothing(resumed) -> None:
    cut = resumed["cut"]
    now = {p: p.stat().st_mtime_ns for p in (cut / "stages/teacher").rglob("*") if p.is_file()}
    rewritten = ("threshold.json", "calibration.json")  # by the evaluation, after training
    assert {p: t for p, t in now.items() if p.name not in rewritten} == resumed["teacher"]
    assert resumed["stderr"].count("stage finished, not retrained (--resume)") >= 3  # rank 0: 2 + 1 stages
    procs = list(resumed["trace"].values())
    assert sorted(p["start_rank"] for p in procs) == ["0", "1"]  # the student trained on two real processes
    assert next(p for p in procs if p["start_rank"] == "1")["events"] == []

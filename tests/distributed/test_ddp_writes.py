"""Under DDP only rank 0 writes the run directory, the other rank trains and waits; WENO
(manual optimisation, its student pass) and Distill-to-Label (frozen teacher) complete."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from ddp_helpers import files, val_epochs  # noqa: E402


def test_only_rank_zero_writes(ddp_job) -> None:
    procs = list(ddp_job["trace"].values())
    assert sorted(p["start_rank"] for p in procs) == ["0", "1"]  # rank 1: a real process, Lightning re-ran the job
    rank1 = next(p for p in procs if p["start_rank"] == "1")
    rank0 = next(p for p in procs if p["start_rank"] == "0")
    assert "ddp_job.py" in rank1["argv"]
    assert rank1["events"] == []  # created, wrote, renamed, removed nothing under the run directories
    assert {e[0] for e in rank0["events"]} == {"0"}
    for name in ("abmil", "weno", "d2l"):
        run = ddp_job["two"][name]
        renamed = {Path(e[2]).relative_to(run).as_posix() for e in rank0["events"]
                   if e[1] == "os.rename" and Path(e[2]).is_relative_to(run)}
        assert {"metrics.json", "report.html", "config.yaml"} <= renamed, name  # written once, atomically
        assert not [f for f in files(run) if f.endswith(".tmp")], name


def test_same_run_directory_as_one_process(ddp_job) -> None:
    for name in ("abmil", "weno"):
        assert files(ddp_job["two"][name]) == files(ddp_job["one"][name]), name  # no second log, no extra file
    assert ddp_job["stdout"].count("milkit — test split") == 3  # once per run: rank 0 alone prints


def test_distill_to_label_completes_with_a_frozen_teacher(ddp_job) -> None:
    run = ddp_job["two"]["d2l"]
    m = json.loads((run / "metrics.json").read_text())
    assert m["_run"]["stages"] == ["teacher", "student"]
    for stage in ("teacher", "student"):
        rows = val_epochs(run, stage)
        assert len(rows) == 2 and all(0.0 <= r["val/bag_auroc"] <= 1.0 for r in rows), stage
        assert m[stage]["test"]["n_bags"] == 12 and m[stage]["test"]["bag_auroc"] is not None
        assert (run / "stages" / stage / "threshold.json").is_file()
    # the teacher the student distilled from is the teacher stage's best weights, unchanged (frozen)
    import torch

    teacher = {k.removeprefix("model."): v for k, v in torch.load(run / "stages/teacher/model.pt", weights_only=True).items()}
    student = torch.load(run / "stages/student/model.pt", weights_only=True)
    frozen = {k.removeprefix("teacher."): v for k, v in student.items() if k.startswith("teacher.")}
    assert frozen and all(torch.equal(frozen[k], teacher[k]) for k in frozen)

"""One two-process job for the DDP tests (ABMIL, WENO, Distill-to-Label through ``milkit train``,
``ddp_job.py``) and the one-process references (in this process), shared by the test files."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_helpers import TWO, env_for, read_trace, run, write_config  # noqa: E402

ABMIL = {"name": "mil", "encoder": {"name": "identity"}, "model": {"name": "abmil"}}
ABMIL_TRAINER = {"max_epochs": 3, "optimizer": "adam", "lr": 0.02}
#: SGD: WENO records each bag's teacher signal at the step it is seen, so a parameter whose
#: gradient is 0 in exact arithmetic (the attention-logit bias) but not in float32 shifts the
#: recorded signals between bags once Adam scales that rounding noise to lr-sized steps; SGD
#: keeps rounding at rounding size (docs/scale.md "DDP agreement")
WENO = {"name": "weno", "encoder": {"name": "linear", "out_dim": 16}, "hpm_warmup_epochs": 1,
        "hpm_threshold": 0.3,  # low, so that HPM hides instances in this short run (test_weno_ddp_losses)
        "student_batch_size": 32}
WENO_TRAINER = {"max_epochs": 3, "optimizer": "sgd", "lr": 0.05}
D2L = {"name": "distill_to_label", "encoder": {"name": "identity"}, "baseline": False}
D2L_TRAINER = {"max_epochs": 2, "optimizer": "adam", "lr": 0.005}


@pytest.fixture(scope="session")
def ddp_job(tmp_path_factory) -> dict:
    from milkit.config import load_experiment
    from milkit.workflow import train_run

    root = tmp_path_factory.mktemp("ddp")
    cfgs = {"abmil": write_config(root / "abmil.yaml", ABMIL, ABMIL_TRAINER),
            "weno": write_config(root / "weno.yaml", WENO, WENO_TRAINER),
            "d2l": write_config(root / "d2l.yaml", D2L, D2L_TRAINER)}
    two = root / "two"
    job = [sys.executable, str(Path(__file__).parent / "ddp_job.py"), str(two), *map(str, cfgs.values()), "--", *TWO]
    proc = run(job, env_for(two, root / "trace"))
    one = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank runs (OMP_NUM_THREADS=1): the same rounding
    try:
        for name in ("abmil", "weno"):  # the references: one process, batch 2
            one[name] = root / "one" / name
            train_run(load_experiment(cfgs[name]), one[name])
    finally:
        torch.set_num_threads(threads)
    return {"root": root, "one": one, "two": {n: two / n for n in cfgs}, "stdout": proc.stdout,
            "trace": read_trace(root / "trace")}

"""``trainer.accelerator`` / ``trainer.devices``: what milkit hands Lightning, and GPUs asked for that the
machine lacks refused before anything is written (Lightning raised its own exception after the run
directory existed, exit 1). CUDA's presence is monkeypatched, so the tests read the same on a GPU machine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from milkit.cli import main
from milkit.config import TrainerConfig
from milkit.distributed import accelerator_for, check_devices

sys.path.insert(0, str(Path(__file__).parents[1] / "reliability"))
from cohort import make_cohort  # noqa: E402


def _cuda(monkeypatch, n: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("n_gpus, asked, expected", [
    (0, "auto", "cpu"),  # a laptop, a Mac included: never MPS, which Lightning's own auto picks there
    (2, "auto", "cuda"),
    (2, "gpu", "cuda"),  # Lightning's "gpu" is MPS on a Mac
    (2, "cpu", "cpu"),
])
def test_auto_is_cuda_or_the_cpu(monkeypatch, n_gpus: int, asked: str, expected: str) -> None:
    _cuda(monkeypatch, n_gpus)
    assert accelerator_for(TrainerConfig(accelerator=asked)) == expected


@pytest.mark.parametrize("n_gpus, cfg, names", [
    (0, {"accelerator": "gpu"}, ("trainer.accelerator", "'gpu'", "no", "cpu")),
    (0, {"accelerator": "cuda", "devices": 1}, ("trainer.accelerator", "'cuda'")),
    (0, {"devices": "0,1"}, ("trainer.devices", "'0,1'", "CPU")),
    (1, {"devices": "0,1"}, ("trainer.devices", "GPU 1", "1 GPU is visible")),
    (2, {"accelerator": "gpu", "devices": 4}, ("trainer.devices", "GPU 2", "2 GPUs are visible")),
])
def test_gpus_the_machine_lacks_are_refused(monkeypatch, n_gpus: int, cfg: dict, names: tuple) -> None:
    _cuda(monkeypatch, n_gpus)
    with pytest.raises(ValueError) as err:
        check_devices(TrainerConfig(**cfg))
    for name in names:
        assert name in str(err.value)


@pytest.mark.parametrize("n_gpus, cfg", [(0, {}), (0, {"devices": 2}), (2, {"devices": "0,1"}), (2, {"devices": 2}),
                                         (2, {"accelerator": "cpu", "devices": 4})])
def test_what_the_machine_has_is_accepted(monkeypatch, n_gpus: int, cfg: dict) -> None:
    _cuda(monkeypatch, n_gpus)
    check_devices(TrainerConfig(**cfg))


def test_train_asking_for_a_missing_gpu_writes_nothing(tmp_path, monkeypatch, capsys) -> None:
    _cuda(monkeypatch, 0)
    c = make_cohort(tmp_path / "c")
    out = tmp_path / "run"
    rc = main(["train", str(c["config"]), "--out", str(out), "--set", "trainer.accelerator=gpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert [ln for ln in err if ln.startswith("error:")] == err[-1:] and "trainer.accelerator" in err[-1]
    assert not out.exists()


def test_lightning_is_handed_the_resolved_accelerator(tmp_path, monkeypatch, capsys) -> None:
    """Without a CUDA GPU, Lightning gets ``cpu``, not ``auto`` (which it would resolve to MPS on a Mac)."""
    import lightning.pytorch as L

    _cuda(monkeypatch, 0)
    seen: list = []
    orig = L.Trainer.__init__

    def spy(self, *a, **kw):
        seen.append(kw.get("accelerator"))
        orig(self, *a, **{**kw, "accelerator": "cpu"})  # this machine has no MPS to pick

    monkeypatch.setattr(L.Trainer, "__init__", spy)
    c = make_cohort(tmp_path / "c", max_epochs=1)
    assert main(["train", str(c["config"]), "--out", str(tmp_path / "run"), "--set", "trainer.accelerator=auto"]) == 0
    assert seen and set(seen) == {"cpu"}

"""The per-epoch learning-rate schedule of the trainer config (engine.lr_factor)."""

import pytest
import torch

from milkit.config import TrainerConfig
from milkit.engine import build_scheduler, lr_factor


def _lrs(cfg: TrainerConfig, epochs: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = build_scheduler(opt, cfg)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_matches_torch_linear_lr():
    cfg = TrainerConfig(lr=1e-4, warmup_epochs=5)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    ref = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)
    expected = []
    for _ in range(8):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert _lrs(cfg, 8) == pytest.approx(expected)
    assert _lrs(cfg, 8)[:2] == pytest.approx([1e-5, 2.8e-5])  # 0.1×, then 0.1 + 0.9/5 = 0.28×


def test_maxmin_camelyon_halfway_division_and_step_decay_with_floor():
    # Max-Min §3.3(a) Camelyon16-P512: lr 1e-3 for 20 epochs, divided by 10 after half of them
    cam = TrainerConfig(lr=1e-3, max_epochs=20, lr_milestones=[10])
    assert _lrs(cam, 20) == pytest.approx([1e-3] * 10 + [1e-4] * 10)
    # PN/ERASE: 1e-3 decayed ×0.1 every 40 epochs down to 1e-7
    pn = TrainerConfig(lr=1e-3, lr_step_every=40, lr_gamma=0.1, min_lr=1e-7)
    assert [lr_factor(e, pn) * pn.lr for e in (0, 39, 40, 80, 159, 160, 400)] == pytest.approx(
        [1e-3, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-7])


def test_no_schedule_means_no_scheduler():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert build_scheduler(opt, TrainerConfig()) is None

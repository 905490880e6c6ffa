"""The lean training loop (issue 15): manual optimisation in LossModule, multi-tensor optimiser
updates and the copy-free batch of one bag give the run Lightning's automatic loop gives —
the same metrics.csv, weights, learning rate per epoch and resumed run; and glibc keeps freed memory
for the next step instead of faulting in fresh pages."""

import copy
import os
import platform
import subprocess
import sys

import lightning as L
import pytest
import torch

from milkit import engine
from milkit.config import TrainerConfig
from milkit.data.bag import Bag, BagDataset, collate_bags
from milkit.engine import build_optimizer, fit_stage, resuming
from milkit.io import load_state_dict
from milkit.methods.base import BagModule, bag_loader
from milkit.methods.mil import mil_loss
from milkit.models.factory import build_mil_model, model_config
from milkit.nn.encoders import EncoderConfig


def _bags(n, seed, sizes=(3, 9)):
    g = torch.Generator().manual_seed(seed)
    bags = []
    for i in range(n):
        k = int(torch.randint(sizes[0], sizes[1], (1,), generator=g))
        x = torch.randn(k, 4, generator=g)
        if i % 2:
            x[0, 0] += 2.0  # a positive instance
        bags.append(Bag(x, i % 2, f"b{i}", instance_labels=(torch.arange(k) == 0).long() * (i % 2),
                        coords=torch.arange(2 * k).view(k, 2)))
    return BagDataset(bags)


def _model():
    torch.manual_seed(7)
    return build_mil_model(model_config({"name": "abmil"}), EncoderConfig(name="linear", in_dim=4, out_dim=8))


class AutoModule(BagModule):
    """Lightning's automatic optimisation: the loop before issue 15's change."""

    lean_loop = False


class LRLog(L.Callback):
    """The learning rate each epoch's steps ran with (read after the epoch's first step)."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


#: warm-up over 2 epochs, ×0.5 every 2 epochs, ÷10 at epoch 4 (engine.lr_factor)
SCHEDULE = dict(warmup_epochs=2, lr_step_every=2, lr_gamma=0.5, lr_milestones=[4])


def _fit(cls, tmp, monkeypatch, epochs=5, batch_size=1, **cfg_kw):
    cfg = TrainerConfig(max_epochs=epochs, lr=1e-2, progress_bar=False, accelerator="cpu", devices=1,
                        batch_size=batch_size, **{**SCHEDULE, **cfg_kw})
    lr_log = LRLog()
    orig = L.Trainer

    class WithLR(orig):  # type: ignore[misc, valid-type]
        def __init__(self, *a, callbacks=None, **k):
            super().__init__(*a, callbacks=[*(callbacks or []), lr_log], **k)

    monkeypatch.setattr(L, "Trainer", WithLR)
    module = cls(_model(), mil_loss, cfg)
    path = fit_stage(module, bag_loader(_bags(12, 0), cfg, True, 3), bag_loader(_bags(8, 1), cfg, False), tmp, cfg, 3)
    monkeypatch.setattr(L, "Trainer", orig)
    return module, load_state_dict(path), (tmp / "logs" / "metrics.csv").read_text(), lr_log.lrs, cfg


@pytest.mark.parametrize("batch_size", [1, 3])
def test_lean_loop_is_the_automatic_run(tmp_path, monkeypatch, batch_size):
    lean, w_lean, csv_lean, lr_lean, cfg = _fit(BagModule, tmp_path / "lean", monkeypatch, batch_size=batch_size)
    auto, w_auto, csv_auto, lr_auto, _ = _fit(AutoModule, tmp_path / "auto", monkeypatch, batch_size=batch_size)
    assert not lean.automatic_optimization and auto.automatic_optimization
    assert csv_lean == csv_auto  # every epoch's train/* and val/* values, and the step column
    assert "val/bag_auroc" in csv_lean.splitlines()[0]
    assert w_lean.keys() == w_auto.keys() and all(torch.equal(w_lean[k], w_auto[k]) for k in w_lean)
    expected = [1e-2 * engine.lr_factor(e, cfg) for e in range(5)]  # 1e-3, 5.5e-3, 5e-3, 5e-3, 2.5e-4
    assert lr_lean == pytest.approx(expected, rel=1e-12) and lr_auto == pytest.approx(expected, rel=1e-12)


def test_lean_loop_falls_back_where_lightning_is_needed(tmp_path, monkeypatch):
    clipped, *_ = _fit(BagModule, tmp_path / "clip", monkeypatch, epochs=1, gradient_clip_val=0.5)
    assert clipped.automatic_optimization and "gradient_clip_val" in clipped.lean_reason()
    accum, *_ = _fit(BagModule, tmp_path / "acc", monkeypatch, epochs=1, accumulate_grad_batches=2)
    assert accum.automatic_optimization and "accumulate" in accum.lean_reason()

    class OwnStep(BagModule):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx)

    own, *_ = _fit(OwnStep, tmp_path / "own", monkeypatch, epochs=1)
    assert own.automatic_optimization and own.lean_reason() == "OwnStep overrides training_step"


class Interrupt(RuntimeError):
    pass


class StopsAtEpoch2(BagModule):
    """Dies at the start of epoch 2 once (as a killed process would, after epoch 1's last.ckpt)."""

    armed = True

    def on_train_epoch_start(self):
        if self.current_epoch == 2 and type(self).armed:
            type(self).armed = False
            raise Interrupt


class AutoStopsAtEpoch2(StopsAtEpoch2):
    lean_loop = False


def _interrupted_and_resumed(cls, tmp, monkeypatch):
    cls.armed = True
    with pytest.raises(Interrupt):
        _fit(cls, tmp, monkeypatch)
    assert (tmp / "checkpoints" / "last.ckpt").is_file() and not (tmp / "model.pt").exists()
    with resuming():
        return _fit(cls, tmp, monkeypatch)


def test_lean_loop_resumes_as_the_automatic_loop_does(tmp_path, monkeypatch):
    # (in either loop a resumed run is the uninterrupted one: last.ckpt carries the RNG and bag-order
    # state and the CSV rows, checkpointing.ResumeState; the lean loop must keep what the automatic one does)
    lean, w_lean, csv_lean, lr_lean, _ = _interrupted_and_resumed(StopsAtEpoch2, tmp_path / "lean", monkeypatch)
    auto, w_auto, csv_auto, lr_auto, _ = _interrupted_and_resumed(AutoStopsAtEpoch2, tmp_path / "auto", monkeypatch)
    assert not lean.automatic_optimization and auto.automatic_optimization
    _, w_full, csv_full, lr_full, cfg = _fit(BagModule, tmp_path / "full", monkeypatch)
    assert lr_lean == pytest.approx(lr_full[2:], rel=1e-12) == lr_auto  # the schedule goes on from epoch 2
    assert csv_lean == csv_auto == csv_full
    assert all(torch.equal(w_lean[k], w_auto[k]) and torch.equal(w_lean[k], w_full[k]) for k in w_lean)
    assert [int(r.split(",")[0]) for r in csv_lean.strip().splitlines()[1:]][::2] == [0, 1, 2, 3, 4]
    # begun in the automatic loop (before the change), resumed in the lean one: the same run, steps counted on
    AutoStopsAtEpoch2.armed = True
    with pytest.raises(Interrupt):
        _fit(AutoStopsAtEpoch2, tmp_path / "mixed", monkeypatch)
    StopsAtEpoch2.armed = False
    with resuming():
        mixed, w_mixed, csv_mixed, _, _ = _fit(StopsAtEpoch2, tmp_path / "mixed", monkeypatch)
    assert not mixed.automatic_optimization
    assert csv_mixed == csv_auto and all(torch.equal(w_mixed[k], w_auto[k]) for k in w_auto)
    assert mixed.trainer.global_step == lean.trainer.global_step == auto.trainer.global_step == 5 * 12


@pytest.mark.parametrize("name,kw", [("adam", {}), ("adamw", {"weight_decay": 1e-2}), ("rmsprop", {}),
                                     ("sgd", {"momentum": 0.9, "nesterov": True})])
def test_multi_tensor_optimisers_match_the_per_parameter_loop(name, kw):
    cfg = TrainerConfig(optimizer=name, lr=1e-2, **{"weight_decay": 1e-4, **kw})
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    ref_net, start = copy.deepcopy(net), copy.deepcopy(net)
    opt = build_optimizer(net.parameters(), cfg)
    assert opt.defaults["foreach"] is True
    kw = {k: v for k, v in opt.defaults.items() if k != "decoupled_weight_decay"}  # AdamW's own, not an argument
    ref = type(opt)(ref_net.parameters(), **{**kw, "foreach": False})
    g = torch.Generator().manual_seed(1)
    for _ in range(40):
        x = torch.randn(8, 6, generator=g)
        for m, o in ((net, opt), (ref_net, ref)):
            o.zero_grad()
            (m(x) ** 2).mean().backward()
            o.step()
    assert not torch.equal(net[0].weight, start[0].weight)  # it did train
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), ref_net.parameters()))


def test_batch_of_one_bag_is_the_padded_batch_without_a_copy():
    bags = _bags(3, 2, sizes=(4, 7))
    for b in bags:
        one = collate_bags([b])
        assert one.instances.data_ptr() == b.instances.data_ptr()  # a view, not a copy
        # the general (padding) path, forced with a second bag and cut back to the first
        two = collate_bags([b, Bag(torch.zeros(1, 4), 0, "pad")])
        n = len(b)
        assert torch.equal(one.instances, two.instances[:1, :n]) and torch.equal(one.mask, two.mask[:1, :n])
        assert torch.equal(one.instance_labels, two.instance_labels[:1, :n])
        assert torch.equal(one.coords, two.coords[:1, :n])
        assert torch.equal(one.labels, two.labels[:1]) and torch.equal(one.sizes, two.sizes[:1])
        assert one.bag_ids == [b.bag_id] and one.adj is None
        assert one.mask.dtype == torch.bool and one.instance_labels.dtype == torch.long


_HEAP_ROUNDS = """
import resource, sys
kept = None
if sys.argv[1] == "1":
    from milkit.malloc import keep_freed_memory
    kept = keep_freed_memory()
def faults():  # minor page faults while 12.5 MiB of small blocks are allocated again after a free
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [bytearray(64 << 10) for _ in range(200)]
    n = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    del blocks
    return n
faults()
print(kept, faults(), faults())
"""


@pytest.mark.skipif(not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"), reason="glibc only")
def test_keep_freed_memory_reuses_the_heap_instead_of_faulting_fresh_pages():
    def run(keep: str):
        out = subprocess.run([sys.executable, "-c", _HEAP_ROUNDS, keep], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        return out.stdout.split()

    kept, *after = run("1")
    _, *default = run("0")
    assert kept == "True"
    assert all(int(n) < 100 for n in after)  # the freed blocks were kept and reused
    assert all(int(n) > 500 for n in default)  # glibc's default gave them back: ~1400 fresh 4 KiB pages each time

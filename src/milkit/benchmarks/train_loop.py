"""``milkit benchmark train-loop``: milkit's ``train`` against a plain PyTorch loop over the
same feature bags, with where each one's time goes.

Both train the same model (milkit's, built from the same config and seed) with the same
optimiser on the same bags for the same epochs, validating every epoch and keeping the
best epoch's weights. The plain loop is what a script would do: every bag in memory,
``for bag in shuffled(train): zero_grad, forward, BCE, backward, step``, then a
validation pass (bag AUROC) and a copy of the best state dict. milkit runs
:func:`milkit.workflow.train_run` unchanged; a timing callback attached to its Lightning
trainer splits each epoch into data (fetch + transfer), forward (``training_step``),
logging (``self.log`` calls, inside the forward), backward, optimiser (step +
zero_grad) and validation (+ checkpointing); "other" is the epoch's remainder (Lightning's
loop). The plain loop uses torch's default (per-parameter) Adam, milkit its multi-tensor one
(bit-identical updates, ``engine.FOREACH``); the ratio without the optimiser column is given beside.
By default the plain loop runs in a spawned process (``--plain-process fresh``), as a script would,
with glibc's default allocator thresholds; ``same`` runs it in this process after milkit's fit,
which leaves them set (``malloc.keep_freed_memory``) for both sides. Startup (imports, building the splits) and what ``train`` does after fitting
(thresholds, evaluation, report) are timed apart.

Rounds alternate which side runs first, so that both see the same machine load; the
table gives medians over rounds and the load average.
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import typer

PHASES = ("data", "forward", "logging", "backward", "optimizer", "validation", "other")

#: the clock of every timing: process CPU time with one torch thread (the work itself, which
#: other processes on the same cores hardly change), else wall time; set by run_benchmark
_now = time.perf_counter


def make_feature_bags(root: Path, n_train: int, n_val: int, n_test: int, n_inst: int, dim: int, seed: int) -> Path:
    """h5 feature bags (``features``, ``coords``) and ``labels.csv`` with a split column.
    A positive bag holds 10 % witness instances shifted along a random direction."""
    import h5py

    rng = np.random.default_rng(seed)
    direction = rng.normal(size=dim).astype(np.float32)
    direction /= np.linalg.norm(direction)
    feats_dir = root / "features"
    feats_dir.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,label,split"]
    k = 0
    for split, count in (("train", n_train), ("val", n_val), ("test", n_test)):
        for i in range(count):
            label = int(i % 2 == 0)
            n = int(rng.integers(max(2, n_inst // 2), n_inst * 3 // 2 + 1))
            x = rng.normal(size=(n, dim)).astype(np.float32)
            if label:
                w = rng.choice(n, max(1, n // 10), replace=False)
                x[w] += 1.5 * direction
            side = int(np.ceil(np.sqrt(n)))
            coords = np.stack([np.arange(n) % side, np.arange(n) // side], 1).astype(np.int64) * 256
            with h5py.File(feats_dir / f"bag{k:04d}.h5", "w") as f:
                f.create_dataset("features", data=x)
                d = f.create_dataset("coords", data=coords)
                d.attrs["patch_size"] = 256
                d.attrs["patch_size_level0"] = 256
            rows.append(f"bag{k:04d},{label},{split}")
            k += 1
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def _experiment(root: Path, dim: int, epochs: int, model: str, seed: int, preload: bool,
                cache_gb: float | None = None):
    from milkit.config import Experiment
    from milkit.registry import lookup, DATASETS, METHODS

    data = lookup(DATASETS, "dataset", "feature_bags").model_validate(
        {"kind": "feature_bags", "features_dir": str(root / "features"), "labels_csv": str(root / "labels.csv"),
         "preload": preload, **({} if cache_gb is None else {"cache_gb": cache_gb})})
    method = lookup(METHODS, "method", "mil").Config.model_validate(
        {"name": "mil", "encoder": {"name": "linear", "in_dim": dim, "out_dim": 512}, "model": {"name": model}})
    from milkit.config import TrainerConfig

    trainer = TrainerConfig(max_epochs=epochs, lr=1e-4, weight_decay=1e-4, progress_bar=False,
                            accelerator="cpu", devices=1)
    return Experiment(seed=seed, data=data, method=method, trainer=trainer)


# -- milkit, timed from inside Lightning ----------------------------------------------------
class _Clock:
    def __init__(self):
        self.t: dict[str, float] = defaultdict(float)
        self.epochs: list[float] = []
        self.steps = 0
        self._mark = None
        self._epoch0 = None
        self._val0 = None
        self.in_val = False

    def lap(self, phase: str) -> None:
        now = _now()
        if self._mark is not None and phase:
            self.t[phase] += now - self._mark
        self._mark = now


def _timing_callback(clock: _Clock):
    from lightning.pytorch.callbacks import Callback

    class Timing(Callback):
        def setup(self, trainer, pl_module, stage):  # self.log is timed on its own
            orig = pl_module.log

            def log(*a, **k):
                t = _now()
                try:
                    return orig(*a, **k)
                finally:
                    if not clock.in_val:  # validation's own logging stays in validation
                        clock.t["logging"] += _now() - t
            pl_module.log = log

        def on_train_epoch_start(self, trainer, pl_module):
            clock._epoch0 = _now()
            clock._mark = clock._epoch0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.lap("data")

        def on_before_backward(self, trainer, pl_module, loss):
            clock.lap("forward")

        def on_after_backward(self, trainer, pl_module):
            clock.lap("backward")

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            clock.lap("other")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            clock.lap("optimizer")
            clock.steps += 1

        def on_validation_start(self, trainer, pl_module):
            clock.lap("other")
            clock._val0 = _now()
            clock.in_val = True

        def on_validation_end(self, trainer, pl_module):
            clock.t["validation"] += _now() - clock._val0
            clock._mark = _now()
            clock.in_val = False

        def on_train_epoch_end(self, trainer, pl_module):
            clock.lap("other")
            clock.epochs.append(_now() - clock._epoch0)

        def on_fit_end(self, trainer, pl_module):  # self.log ran inside training_step: not forward
            clock.t["forward"] -= clock.t.get("logging", 0.0)

    return Timing()


@contextmanager
def _timed_trainer(clock: _Clock):
    """Attach the timing callback to every Lightning Trainer built inside (milkit's engine)."""
    import lightning

    orig = lightning.Trainer

    class TimedTrainer(orig):  # type: ignore[misc, valid-type]
        def __init__(self, *a, callbacks=None, **k):
            super().__init__(*a, callbacks=[*(callbacks or []), _timing_callback(clock)], **k)

    lightning.Trainer = TimedTrainer
    try:
        yield
    finally:
        lightning.Trainer = orig


def run_milkit(exp, out: Path) -> dict:
    import milkit.workflow as wf

    clock = _Clock()
    t0 = _now()
    fit_s = {}
    orig_fit = wf.make_method(exp).__class__.fit

    def fit(self, splits, run):
        t = _now()
        try:
            return orig_fit(self, splits, run)
        finally:
            fit_s["s"] = _now() - t

    cls = wf.make_method(exp).__class__
    cls.fit = fit
    try:
        with _timed_trainer(clock):
            metrics = wf.train_run(exp, out)
    finally:
        cls.fit = orig_fit
    total = _now() - t0
    # data: milkit fetches the next batch before on_train_batch_start; the first epoch's first
    # lap starts at on_train_epoch_start, so every fetch is counted
    return {"total_s": total, "fit_s": fit_s["s"], "after_fit_s": total - fit_s["s"], "epochs_s": clock.epochs,
            "steps": clock.steps, "phases_s": dict(clock.t),
            "test_bag_auroc": metrics.get("mil", {}).get("test", {}).get("bag_auroc")}


# -- the plain loop ----------------------------------------------------------------------
def run_plain(exp) -> dict:
    import torch
    import torch.nn.functional as F

    from milkit.engine import seed_everything
    from milkit.metrics.classification import auroc
    from milkit.models.factory import build_mil_model

    t_start = _now()
    splits = exp.data.build(exp.seed)
    train = [(b.instances.unsqueeze(0), torch.tensor([float(b.label)])) for b in splits.train]
    val = [(b.instances.unsqueeze(0), float(b.label)) for b in splits.val]
    seed_everything(exp.seed)
    model = build_mil_model(exp.method.model, exp.method.encoder)
    opt = torch.optim.Adam(model.parameters(), lr=exp.trainer.lr, weight_decay=exp.trainer.weight_decay)
    g = torch.Generator().manual_seed(exp.seed)
    t: dict[str, float] = defaultdict(float)
    epochs, best, best_state, steps = [], -1.0, None, 0
    startup = _now() - t_start
    for _ in range(exp.trainer.max_epochs):
        e0 = _now()
        model.train()
        mark = _now()
        for i in torch.randperm(len(train), generator=g).tolist():
            x, y = train[i]
            now = _now(); t["data"] += now - mark; mark = now  # noqa: E702
            loss = F.binary_cross_entropy_with_logits(model(x).bag_logits, y)
            now = _now(); t["forward"] += now - mark; mark = now  # noqa: E702
            loss.backward()
            now = _now(); t["backward"] += now - mark; mark = now  # noqa: E702
            opt.step()
            opt.zero_grad(set_to_none=True)
            now = _now(); t["optimizer"] += now - mark; mark = now  # noqa: E702
            steps += 1
        v0 = _now()
        model.eval()
        with torch.no_grad():
            p = np.array([torch.sigmoid(model(x).bag_logits).item() for x, _ in val])
        a = auroc(np.array([y for _, y in val]), p)
        if a > best:
            best, best_state = a, copy.deepcopy(model.state_dict())
        t["validation"] += _now() - v0
        epochs.append(_now() - e0)
    model.load_state_dict(best_state)
    fit = sum(epochs)
    t["other"] = fit - sum(v for k, v in t.items() if k != "other")
    return {"startup_s": startup, "fit_s": fit, "epochs_s": epochs, "steps": steps, "phases_s": dict(t),
            "best_val_auroc": best}


def _plain_child(exp, clock: str, threads: int) -> dict:
    """The plain loop in a fresh process (spawned): what a script gets, without milkit's
    allocator setting (``malloc.keep_freed_memory``) that this process has after milkit's fit."""
    import torch

    global _now
    torch.set_num_threads(threads)
    _now = time.process_time if clock == "process" else time.perf_counter
    return run_plain(exp)


def run_plain_fresh(exp) -> dict:
    """:func:`run_plain` in a spawned process, timed there with this process's clock."""
    import multiprocessing as mp

    import torch

    clock = "process" if _now is time.process_time else "wall"
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_plain_child, (exp, clock, torch.get_num_threads()))


def run_benchmark(n_train: int, n_val: int, n_test: int, n_inst: int, dim: int, epochs: int, model: str,
                  rounds: int, preload: bool, workdir: Path, cache_gb: float | None = None,
                  plain_process: str = "fresh") -> dict:
    import torch

    global _now
    _now = time.process_time if torch.get_num_threads() == 1 else time.perf_counter
    load0 = os.getloadavg()
    root = make_feature_bags(workdir / "bags", n_train, n_val, n_test, n_inst, dim, seed=0)
    exp = _experiment(root, dim, epochs, model, 0, preload, cache_gb)
    rows = []
    for r in range(rounds):
        res = {}
        for side in (("milkit", "plain") if r % 2 == 0 else ("plain", "milkit")):
            if side == "milkit":
                res["milkit"] = run_milkit(exp, workdir / f"run{r}")
            else:
                res["plain"] = run_plain_fresh(exp) if plain_process == "fresh" else run_plain(exp)
        m, p = res["milkit"], res["plain"]
        res["epoch_ratio"] = statistics.median(m["epochs_s"]) / statistics.median(p["epochs_s"])
        res["fit_ratio"] = m["fit_s"] / p["fit_s"]
        # the loop without the optimiser's own update (the same torch.optim class on both sides, whose
        # cost moves with the other jobs' memory traffic; milkit's is the multi-tensor one)
        res["fit_ratio_without_optimizer"] = ((m["fit_s"] - m["phases_s"].get("optimizer", 0.0))
                                              / (p["fit_s"] - p["phases_s"].get("optimizer", 0.0)))
        rows.append(res)
    return {"bags": {"train": n_train, "val": n_val, "test": n_test, "instances_mean": n_inst, "dim": dim},
            "model": model, "epochs": epochs, "preload": preload, "cache_gb": exp.data.cache_gb, "rounds": rows,
            "clock": "process CPU time" if _now is time.process_time else "wall time",
            "torch_threads": torch.get_num_threads(), "loadavg_before": load0, "loadavg_after": os.getloadavg(),
            "cpu_count": os.cpu_count(), "plain_process": plain_process}


def markdown(res: dict) -> str:
    """Per-epoch times, steps/s and the breakdown, medians over rounds."""
    rows = res["rounds"]
    med = statistics.median

    def per_epoch(side: str, phase: str) -> float:
        return med(r[side]["phases_s"].get(phase, 0.0) / res["epochs"] for r in rows)

    def steps_s(side: str) -> float:
        return med(r[side]["steps"] / sum(r[side]["epochs_s"]) for r in rows)

    b = res["bags"]
    lines = [f"{res['model']} on {b['train']} training bags of ~{b['instances_mean']} × {b['dim']} features "
             f"({b['val']} validation, {b['test']} test), {res['epochs']} epochs, batch 1, "
             f"{res['torch_threads']} torch threads, preload={res['preload']}, "
             f"cache_gb={res.get('cache_gb', 'n/a')}, plain loop in the {res.get('plain_process', 'same')} "
             f"process, timed in {res['clock']}; load average "
             f"{res['loadavg_before'][0]:.2f} before, {res['loadavg_after'][0]:.2f} after ({res['cpu_count']} CPUs).",
             "", "| | s / epoch | steps/s | fit s | " + " | ".join(f"{p} s/epoch" for p in PHASES) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(PHASES)]
    for side in ("milkit", "plain"):
        lines.append(f"| {side} | {med(med(r[side]['epochs_s']) for r in rows):.3f} | {steps_s(side):.0f} | "
                     f"{med(r[side]['fit_s'] for r in rows):.2f} | "
                     + " | ".join(f"{per_epoch(side, p):.3f}" for p in PHASES) + " |")
    per_round = ", ".join(f"{r['epoch_ratio']:.2f}" for r in rows)
    wo = [r["fit_ratio_without_optimizer"] for r in rows if "fit_ratio_without_optimizer" in r]
    lines += ["", f"milkit / plain: {med(r['epoch_ratio'] for r in rows):.2f}× per epoch (median epoch; per round "
              f"{per_round}), {med(r['fit_ratio'] for r in rows):.2f}× whole fit"
              + (f", {med(wo):.2f}× whole fit without the optimiser step (per round "
                 f"{', '.join(f'{v:.2f}' for v in wo)})" if wo else "") + "; milkit's `train` also spent "
              f"{med(r['milkit']['after_fit_s'] for r in rows):.2f} s outside fitting (data split, thresholds, "
              f"evaluation, report) and the plain loop {med(r['plain']['startup_s'] for r in rows):.2f} s loading "
              f"bags; {len(rows)} rounds, alternating which side runs first."]
    return "\n".join(lines) + "\n"


def bench(
    n_train: int = typer.Option(192, "--train-bags"),
    n_val: int = typer.Option(48, "--val-bags"),
    n_test: int = typer.Option(24, "--test-bags"),
    n_inst: int = typer.Option(150, "--instances", help="mean bag size (uniform in [n/2, 3n/2])"),
    dim: int = typer.Option(1024, "--dim", help="feature size"),
    epochs: int = typer.Option(10, "--epochs"),
    model: str = typer.Option("abmil", "--model"),
    rounds: int = typer.Option(2, "--rounds", help="side-by-side rounds (medians reported)"),
    preload: bool = typer.Option(False, "--preload/--no-preload", help="milkit: data.preload (default: the config default)"),
    cache_gb: Optional[float] = typer.Option(None, "--cache-gb", min=0, help="milkit: data.cache_gb (default: the config "
                                             "default; 0 reads every bag's file on every access)"),
    out: Optional[Path] = typer.Option(None, "--out", help="folder for train_loop.json and train_loop.md"),
    plain_process: str = typer.Option("fresh", "--plain-process", help="fresh: the plain loop in a spawned process "
                                      "(as a script runs); same: in this one, after milkit's fit (its allocator setting)"),
) -> None:
    """milkit's train vs a plain PyTorch loop on the same feature bags: time per epoch and breakdown."""
    from rich.console import Console

    from milkit.engine import _quiet_lightning

    _quiet_lightning()
    if rounds < 1 or epochs < 1:
        raise ValueError("--rounds and --epochs must be ≥ 1")
    if plain_process not in ("fresh", "same"):
        raise ValueError(f"--plain-process must be fresh or same, got {plain_process!r}")
    with tempfile.TemporaryDirectory() as tmp:
        res = run_benchmark(n_train, n_val, n_test, n_inst, dim, epochs, model, rounds, preload, Path(tmp), cache_gb,
                            plain_process)
    md = markdown(res)
    Console().print(md)
    if out is not None:
        from milkit.benchmarks.common import write_results

        write_results(Path(out), "train_loop", res, f"# milkit benchmark train-loop\n\n{md}")
    else:
        typer.echo(json.dumps(res, indent=1, default=str))


def register(app: typer.Typer) -> None:
    """Add ``milkit benchmark train-loop``."""
    app.command("train-loop")(bench)

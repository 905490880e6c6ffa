"""The one place that runs training: Lightning Trainer, best checkpoint, CSV log, progress bar.

Every Method hands a ``LightningModule`` per stage to :func:`fit_stage`. Inside
:func:`resuming` (``milkit train --resume``) a stage whose ``model.pt`` exists is not
retrained (its weights and the RNG state it ended with are restored) and an unfinished one
continues from its ``checkpoints/last.ckpt`` (Lightning's full state plus every rank's RNG, the
loader's generator and the CSV rows, written at the start of every epoch after the first by
:class:`~milkit.checkpointing.ResumeState`), giving the numbers of an uninterrupted run. The module
logs its validation score under ``trainer.monitor`` (default ``val/bag_auroc``);
the best epoch's weights are restored into the module and saved as
``<stage_dir>/model.pt`` (a plain state dict, loadable with ``weights_only=True``).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import random
import warnings
from pathlib import Path
from typing import Iterator

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader

from milkit import distributed
from milkit.checkpointing import LaterOnTiesCheckpoint, ResumeState, RunCSVLogger, gather_objects
from milkit.config import TrainerConfig
from milkit.io import load_state_dict, save_state_dict
from milkit.malloc import keep_freed_memory

log = logging.getLogger(__name__)

_RESUME: contextvars.ContextVar[bool] = contextvars.ContextVar("milkit_resume", default=False)
#: a stage's RNG state when it ended (restored when a resumed run skips the finished stage)
RNG_FILE = "rng_state.pt"
LAST_CKPT = "last.ckpt"


@contextlib.contextmanager
def resuming(on: bool = True) -> Iterator[None]:
    """Within this block :func:`fit_stage` skips finished stages and resumes unfinished ones."""
    token = _RESUME.set(on)
    try:
        yield
    finally:
        _RESUME.reset(token)


def rng_state() -> dict:
    """Python, NumPy and torch RNG states as tensors and numbers (saved with weights_only)."""
    import numpy as np

    py = random.getstate()
    npst = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": torch.tensor(py[1], dtype=torch.int64),
        "python_gauss": py[2],
        "numpy": torch.from_numpy(np.asarray(npst[1], dtype=np.int64)),
        "numpy_pos": int(npst[2]),
        "numpy_has_gauss": int(npst[3]),
        "numpy_gauss": float(npst[4]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Inverse of :func:`rng_state`."""
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (and dataloader workers) explicitly."""
    L.seed_everything(seed, workers=True, verbose=False)


#: the multi-tensor (``foreach``) update: the same arithmetic as the per-parameter loop, bit for bit
#: (tests/core/test_lean_loop.py), and 30 % less time per Adam step on a CPU, where torch's default is
#: the loop (on CUDA it is already the default); docs/benchmarks.md, issue 15
FOREACH = True


def build_optimizer(params, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """The optimiser named in the trainer config (multi-tensor updates, :data:`FOREACH`)."""
    params = [p for p in params if p.requires_grad]
    fe = FOREACH
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=fe)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=fe)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
            foreach=fe,
        )
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=fe)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def lr_factor(epoch: int, cfg: TrainerConfig) -> float:
    """Multiplier of ``cfg.lr`` during ``epoch`` (0-based): a LinearLR warm-up from 0.1× over
    ``warmup_epochs`` (Sm paper), times ``lr_gamma`` per ``lr_step_every`` epochs and per
    milestone passed (Max-Min §3.3: ÷10 at mid-training), floored at ``min_lr``."""
    f = 1.0
    if cfg.warmup_epochs > 0:
        f = 0.1 + 0.9 * min(epoch, cfg.warmup_epochs) / cfg.warmup_epochs
    decays = (epoch // cfg.lr_step_every if cfg.lr_step_every > 0 else 0) + sum(epoch >= m for m in cfg.lr_milestones)
    f *= cfg.lr_gamma**decays
    return max(f, cfg.min_lr / cfg.lr)


def build_scheduler(opt: torch.optim.Optimizer, cfg: TrainerConfig) -> torch.optim.lr_scheduler.LRScheduler | None:
    """A per-epoch LambdaLR following :func:`lr_factor`, or None when the config has no schedule."""
    if cfg.warmup_epochs == 0 and cfg.lr_step_every == 0 and not cfg.lr_milestones:
        return None
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: lr_factor(epoch, cfg))


def configure_optimizers(module: L.LightningModule, params, cfg: TrainerConfig):
    """Optimiser plus the trainer config's per-epoch learning-rate schedule (:func:`lr_factor`)."""
    opt = build_optimizer(params, cfg)
    sched = build_scheduler(opt, cfg)
    if sched is not None:
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}
    return opt


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written through :mod:`milkit.io` (temp file + rename), so that a
    process killed while saving ``last.ckpt`` leaves the previous one whole for ``--resume``."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        from milkit import io

        with io.atomic_path(path) as tmp:
            torch.save(checkpoint, tmp)


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", ".*is deprecated.*", category=DeprecationWarning)
    # DDP: validation values are gathered before they are logged (milkit.distributed), so equal on every rank
    warnings.filterwarnings("ignore", ".*sync_dist=True.*")
    # --resume: the CSV log of the interrupted process is rewritten from last.ckpt (checkpointing.RunCSVLogger)
    warnings.filterwarnings("ignore", ".*Experiment logs directory .* exists and is not empty.*")
    # a few slides: fewer batches than log_every_n_steps; milkit's curves are per epoch (logs/metrics.csv)
    warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
    os.environ.setdefault("POSSIBLE_USER_WARNING", "off")


def fit_stage(
    module: L.LightningModule,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
    stage_dir: str | Path,
    cfg: TrainerConfig,
    seed: int,
    max_epochs: int | None = None,
    monitor: str | None = None,
    monitor_mode: str | None = None,
) -> Path:
    """Train ``module``; keep and restore the best validation checkpoint; save ``model.pt``.

    Returns the path of ``model.pt``. The stage directory holds ``checkpoints/``,
    the CSV log ``logs/metrics.csv`` and ``model.pt``.
    """
    _quiet_lightning()
    keep_freed_memory()
    stage_dir = Path(stage_dir)
    out = stage_dir / "model.pt"
    resume = _RESUME.get()
    if resume and out.is_file():  # finished before the interruption: not retrained
        log.info("%s: stage finished, not retrained (--resume)", stage_dir)
        load_into(module, load_state_dict(out), out)
        if (stage_dir / RNG_FILE).is_file():
            state = _own_rank_state(load_state_dict(stage_dir / RNG_FILE))
            set_rng_state(state)
            gen = getattr(train_loader, "generator", None)
            if gen is not None and "loader" in state:  # the shuffle order later stages continue from
                gen.set_state(state["loader"])
        return out
    writer = distributed.is_rank_zero()  # DDP: rank 0 alone writes the stage directory
    if writer:
        stage_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    monitor = monitor or cfg.monitor
    mode = monitor_mode or cfg.monitor_mode
    ckpt_dir = stage_dir / "checkpoints"
    last_ckpt = ckpt_dir / LAST_CKPT
    ckpt_path = None
    if resume and last_ckpt.is_file():
        try:  # a checkpoint that cannot be read is named before Lightning tries it
            torch.load(last_ckpt, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised naming the file
            detail = " ".join(str(err).split())[:160]
            raise ValueError(f"{last_ckpt}: cannot resume from this checkpoint ({type(err).__name__}: {detail}); "
                             "rerun with --overwrite") from None
        log.info("%s: resuming from %s", stage_dir, last_ckpt)
        ckpt_path = str(last_ckpt)
    elif writer and (last_ckpt.is_file() or (stage_dir / "logs").exists()):  # begun but not resumed: start clean
        import shutil

        shutil.rmtree(ckpt_dir, ignore_errors=True)
        shutil.rmtree(stage_dir / "logs", ignore_errors=True)
    # full state (optimiser, loops, callbacks, RNG, loader generator, CSV rows) at the start of every
    # epoch after the first, so that --resume continues the stage as if it had not stopped
    csv_logger = RunCSVLogger(save_dir=str(stage_dir), name="logs", version="")
    callbacks: list = [ResumeState(last_ckpt, getattr(train_loader, "generator", None), csv_logger)]
    ckpt = None
    if val_loader is not None:
        ckpt = LaterOnTiesCheckpoint(  # ties → later epoch (issue 12, Max-Min authors' rule)
            dirpath=ckpt_dir,
            filename="best",
            monitor=monitor,
            mode=mode,
            save_top_k=1,
            save_last=False,
            save_weights_only=True,
            enable_version_counter=False,
        )
        callbacks.append(ckpt)
        if cfg.early_stopping_patience:
            callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.early_stopping_patience))
    trainer = L.Trainer(
        max_epochs=max_epochs or cfg.max_epochs,
        accelerator=distributed.accelerator_for(cfg),
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=distributed.strategy_for(cfg),
        use_distributed_sampler=False,  # several processes: milkit shards the loaders itself (below)
        precision=cfg.precision,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=cfg.gradient_clip_val,
        deterministic=cfg.deterministic,
        callbacks=callbacks,
        logger=csv_logger,
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=cfg.log_every_n_steps,
        num_sanity_val_steps=0,
        default_root_dir=str(stage_dir),
        plugins=[AtomicCheckpointIO()],
    )
    if trainer.world_size > 1:  # every rank draws one process's bag order and takes its share
        if val_loader is not None:
            distributed.check_stage(module, val_loader, trainer.world_size)
            val_loader = distributed.shard_loader(val_loader, pad=False)
        train_loader = distributed.shard_loader(train_loader, pad=True)
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader, ckpt_path=ckpt_path,
                weights_only=True)
    if ckpt is not None and ckpt.best_model_path:
        state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    state = rng_state()
    if getattr(train_loader, "generator", None) is not None:
        state["loader"] = train_loader.generator.get_state()
    if trainer.world_size > 1:  # every rank's own: the ranks draw apart (dropout, VAT noise on their own bags)
        state["ranks"] = gather_objects(state, trainer.world_size)
    if writer:
        save_state_dict(stage_dir / RNG_FILE, state)
        save_state_dict(out, {k: v.detach().cpu() for k, v in module.state_dict().items()})  # marks the stage done
        last_ckpt.unlink(missing_ok=True)  # model.pt + best.ckpt are what a finished stage keeps
    distributed.barrier()  # DDP: no rank goes on before the stage's files are written
    return out


def _own_rank_state(state: dict) -> dict:
    """This process's entry of a stage's ``rng_state.pt`` (several processes wrote ``ranks``, one
    each; the process group may not exist yet, so the launcher's rank is read)."""
    ranks = state.get("ranks")
    if not ranks:
        return state
    me = distributed.rank() if distributed.is_distributed() else distributed.launch_rank()
    return ranks[me] if 0 <= me < len(ranks) else state


def load_into(module: torch.nn.Module, state: dict, path: str | Path) -> torch.nn.Module:
    """``module.load_state_dict(state)``; weights that do not fit are an error naming the file."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        detail = next((ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()), str(err).splitlines()[0])
        detail = detail.rstrip(".") if len(detail) <= 200 else detail[:197] + "..."
        raise ValueError(f"{path}: weights do not fit the model of the run's config ({detail})") from None
    return module


def restore(module: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a ``model.pt`` written by :func:`fit_stage` into ``module`` (weights only)."""
    return load_into(module, load_state_dict(path), path)


def restore_submodule(module: torch.nn.Module, path: str | Path, prefix: str = "model.") -> torch.nn.Module:
    """Load the ``prefix``-ed part of a stage's ``model.pt`` (e.g. the student of a distillation
    module that also held its frozen teacher) into ``module``."""
    state = load_state_dict(path)
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise ValueError(f"{path}: no weights under {prefix!r}")
    return load_into(module, sub, path)

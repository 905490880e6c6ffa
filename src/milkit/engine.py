"""The one place that runs training: Lightning Trainer, best checkpoint, CSV log, progress bar.

Every Method hands a ``LightningModule`` per stage to :func:`fit_stage`. The module
logs its validation score under ``trainer.monitor`` (default ``val/bag_auroc``);
the best epoch's weights are restored into the module and saved as
``<stage_dir>/model.pt`` (a plain state dict, loadable with ``weights_only=True``).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from milkit.config import TrainerConfig
from milkit.io import load_state_dict, save_state_dict

log = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (and dataloader workers) explicitly."""
    L.seed_everything(seed, workers=True, verbose=False)


def build_optimizer(params, cfg: TrainerConfig) -> torch.optim.Optimizer:
    """The optimiser named in the trainer config."""
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay
        )
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
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


def _quiet_lightning() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    warnings.filterwarnings("ignore", ".*module\(s\) in eval mode.*")
    warnings.filterwarnings("ignore", ".*is deprecated.*", category=DeprecationWarning)
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
    stage_dir = Path(stage_dir)
    stage_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    monitor = monitor or cfg.monitor
    mode = monitor_mode or cfg.monitor_mode
    callbacks: list = []
    ckpt = None
    if val_loader is not None:
        ckpt = __import__("milkit.checkpointing").checkpointing.LaterOnTiesCheckpoint(  # ties → later epoch (issue 12)
            dirpath=stage_dir / "checkpoints",
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
        accelerator=cfg.accelerator,
        devices=cfg.devices,
        num_nodes=cfg.num_nodes,
        strategy=cfg.strategy,
        precision=cfg.precision,
        accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=cfg.gradient_clip_val,
        deterministic=cfg.deterministic,
        callbacks=callbacks,
        logger=CSVLogger(save_dir=str(stage_dir), name="logs", version=""),
        enable_progress_bar=cfg.progress_bar,
        enable_model_summary=False,
        log_every_n_steps=cfg.log_every_n_steps,
        num_sanity_val_steps=0,
        default_root_dir=str(stage_dir),
    )
    trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
    if ckpt is not None and ckpt.best_model_path:
        state = torch.load(ckpt.best_model_path, map_location="cpu", weights_only=True)["state_dict"]
        module.load_state_dict(state)
    out = stage_dir / "model.pt"
    save_state_dict(out, {k: v.detach().cpu() for k, v in module.state_dict().items()})
    return out


def restore(module: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a ``model.pt`` written by :func:`fit_stage` into ``module`` (weights only)."""
    module.load_state_dict(load_state_dict(path))
    return module


def restore_submodule(module: torch.nn.Module, path: str | Path, prefix: str = "model.") -> torch.nn.Module:
    """Load the ``prefix``-ed part of a stage's ``model.pt`` (e.g. the student of a distillation
    module that also held its frozen teacher) into ``module``."""
    state = load_state_dict(path)
    sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if not sub:
        raise ValueError(f"{path}: no weights under {prefix!r}")
    module.load_state_dict(sub)
    return module

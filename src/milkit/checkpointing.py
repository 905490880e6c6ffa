"""Checkpoint callbacks: best-checkpoint selection that keeps the later epoch on ties (Max-Min
released code), and the ``last.ckpt`` that lets ``--resume`` continue a stage exactly.

Lightning's :class:`~lightning.pytorch.callbacks.ModelCheckpoint` replaces its best
checkpoint only on a strict improvement, so ties go to the *earliest* epoch. With a
discrete monitor such as validation classification error (Max-Min §3.3(b)) ties are
the rule; the authors keep the latest epoch that reaches the best value. Issue 12.

:class:`ResumeState` writes ``last.ckpt`` at the start of every epoch after the first, before
anything of that epoch has drawn a random number, with what Lightning's own state lacks for an
exact resume: every rank's Python/NumPy/torch RNG state, the train loader's shuffle generator and
the CSV log's rows so far (:class:`RunCSVLogger`). A stage resumed from it gives the per-epoch
metrics, best checkpoint, weights and ``metrics.csv`` of the uninterrupted run. Issue 15.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from torch import Tensor

log = logging.getLogger(__name__)


class LaterOnTiesCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose comparison is ``>=`` (mode max) / ``<=`` (mode min)."""

    def check_monitor_top_k(self, trainer, current: Optional[Tensor] = None) -> bool:  # noqa: D102
        if current is None:
            return False
        if self.save_top_k == -1 or len(self.best_k_models) < self.save_top_k:
            return True
        op = {"min": torch.le, "max": torch.ge}[self.mode]
        decision = bool(op(current, self.best_k_models[self.kth_best_model_path]))
        return trainer.strategy.reduce_boolean_decision(decision)


class _RowsWriter(ExperimentWriter):
    """Lightning's CSV writer that also keeps every row it was given (``history``)."""

    def __init__(self, log_dir: str, earlier: list[dict]) -> None:
        super().__init__(log_dir=log_dir)  # removes a metrics.csv an interrupted process left
        self.history: list[dict] = [dict(r) for r in earlier]
        self.metrics = [dict(r) for r in earlier]  # written, with the header, at the first save

    def log_metrics(self, metrics_dict: dict, step: Optional[int] = None) -> None:  # noqa: D102
        super().log_metrics(metrics_dict, step)
        self.history.append(dict(self.metrics[-1]))


class RunCSVLogger(CSVLogger):
    """``CSVLogger`` whose rows so far (:attr:`rows`) go into ``last.ckpt``, and which a resumed
    stage starts from the rows of the interrupted one (:meth:`start_from`): ``metrics.csv`` then
    holds every epoch once, as the uninterrupted run's does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._earlier: list[dict] = []

    @property
    @rank_zero_experiment
    def experiment(self) -> _RowsWriter:  # noqa: D102
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _RowsWriter(self.log_dir, self._earlier)
        return self._experiment

    @property
    def rows(self) -> list[dict]:
        """Every row logged in this stage (those of an interrupted process included)."""
        exp = self._experiment
        return [dict(r) for r in exp.history] if isinstance(exp, _RowsWriter) else []

    def start_from(self, rows: list[dict]) -> None:
        """Continue the log of an interrupted stage: ``rows`` come first in ``metrics.csv``."""
        self._earlier = [dict(r) for r in rows]
        exp = self._experiment
        if isinstance(exp, _RowsWriter):  # already open (not expected: callbacks are restored first)
            self._fs.rm_file(exp.metrics_file_path) if self._fs.isfile(exp.metrics_file_path) else None
            exp.history = [*self._earlier, *exp.history]
            exp.metrics = [*self._earlier, *exp.metrics]
            exp.metrics_keys = []


def gather_objects(obj: Any, world: int) -> list:
    """Every rank's ``obj``, in rank order (one process: ``[obj]``); a collective."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    got: list = [None] * world
    dist.all_gather_object(got, obj)
    return got


class ResumeState(Callback):
    """Writes ``path`` (``last.ckpt``) at the start of every epoch after the first, and restores
    from it what an exact resume needs beyond Lightning's own state.

    The checkpoint is taken after the previous epoch has finished (its schedule stepped, its rows
    logged, every callback updated) and before the next one draws anything (this callback's
    ``on_train_epoch_start`` runs before the module's, and before the train loader's iterator is
    made). Its loop counters are those between two epochs (``epoch_progress.ready`` not yet
    counting the epoch about to start), which Lightning resumes as a fresh epoch. It holds, besides
    model, optimisers, loops and callbacks: per rank, the Python, NumPy and torch (and CUDA) RNG
    states and the train loader's generator state (several processes draw apart: dropout on
    their own bags), and rank 0's CSV rows. Only rank 0 writes the file (Lightning).

    On resume the loader's generator is set when the checkpoint is read (Lightning makes the
    resumed epoch's iterator, which draws its base seed from it, before the epoch starts) and the
    other RNGs at the start of the resumed epoch, where they were taken.
    """

    def __init__(self, path: str | Path, generator: torch.Generator | None, logger: RunCSVLogger | None) -> None:
        self.path = Path(path)
        self.generator = generator
        self.logger = logger
        self._saving: dict | None = None  # what the checkpoint being written holds
        self._restored: dict | None = None  # this rank's RNG states read from last.ckpt, for the next epoch start

    @property
    def state_key(self) -> str:  # noqa: D102
        return "milkit.ResumeState"

    def state_dict(self) -> dict:  # noqa: D102
        return dict(self._saving) if self._saving is not None else {}

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:  # noqa: D102
        if self._saving is None:
            return
        ep = checkpoint.get("loops", {}).get("fit_loop", {}).get("epoch_progress")
        if ep is not None:  # between two epochs: the one starting is not counted as begun
            for part in ("total", "current"):
                c = ep[part]
                if c["ready"] == c["started"] + 1 == c["processed"] + 1 == c["completed"] + 1:
                    c["ready"] = c["started"]

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:  # noqa: D102
        state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
        ranks = state.get("ranks", [])
        if self.logger is not None:
            self.logger.start_from(state.get("log_rows", []))
        if not ranks:  # a last.ckpt of an older milkit: Lightning's state only
            return
        me = trainer.global_rank
        if len(ranks) != trainer.world_size:
            log.warning("last.ckpt was written by %d process(es), resumed on %d: the random draws after the "
                        "resume are not those of the uninterrupted run", len(ranks), trainer.world_size)
            me = min(me, len(ranks) - 1)
        own = ranks[me]
        if self.generator is not None and "loader" in own:
            self.generator.set_state(own["loader"])
        self._restored = own

    def _own_state(self) -> dict:
        from milkit.engine import rng_state

        state = rng_state()
        if self.generator is not None:
            state["loader"] = self.generator.get_state()
        return state

    def on_train_epoch_start(self, trainer, pl_module) -> None:  # noqa: D102
        if self._restored is not None:  # the epoch last.ckpt was taken at: draw as the first process did
            from milkit.engine import set_rng_state

            set_rng_state(self._restored)
            self._restored = None
            return
        if trainer.current_epoch == 0 or trainer.sanity_checking:
            return
        ranks = gather_objects(self._own_state(), trainer.world_size)
        rows = self.logger.rows if self.logger is not None and trainer.is_global_zero else []
        self._saving = {"ranks": ranks, "log_rows": rows}
        try:
            trainer.save_checkpoint(self.path, weights_only=False)
        finally:
            self._saving = None


__all__ = ["LaterOnTiesCheckpoint", "ResumeState", "RunCSVLogger", "gather_objects"]

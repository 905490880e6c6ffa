"""Seed replicas in parallel processes (issue 15): ``trainer.parallel_seeds: P``.

The K replicas of ``trainer.seeds: K`` (:mod:`milkit.trust.ensemble`) are independent runs on
one split, so up to P worker processes train them at once, replica k into its own
``stages/<stage>/seed-<k>/`` only. Each worker rebuilds the experiment from its resolved
config (what ``config.yaml`` holds) and the data from ``exp.seed`` once, then takes the next
replica whenever it is free: it seeds the RNGs with the replica's seed and calls
``Method.fit`` exactly as the one-process loop does, inside
``engine.resuming`` when the run is resumed (a finished stage is loaded, an unfinished one
continues from its ``last.ckpt``). The parent then loads every replica's labeler from the run
directory (``Method.load``, the path :func:`milkit.trust.ensemble.load` takes) and goes on as
with ``P = 1``: calibration, thresholds, evaluation, trust verdict, report.

Processes: on a CPU the workers are forked from a ``forkserver`` that imported torch and
Lightning once (a fresh process, started by this one: no threads, no CUDA, no state of the
parent is inherited, as with ``spawn``, but each worker skips the ~10 s of CPU a fresh import
costs); when GPUs are used, plain ``spawn``. Each worker runs ``torch.set_num_threads(max(1,
cpus // P))`` unless ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` is set, and with several GPUs and
``trainer.devices: 1`` replica k runs on GPU ``k mod n``. Log lines of a worker are prefixed
with its replica (``milkit: [seed-1] …``); progress bars are off in workers. A worker that
exits without finishing, or whose ``fit`` raises, stops the others (killed; their
``last.ckpt`` stays for ``--resume``) and becomes one error naming the replica — a
``ValueError`` (exit 2) when the worker's error was one a user can fix, else a ``RuntimeError``;
temporary files the killed workers left are removed, so no half-written file remains.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from milkit.config import Experiment

log = logging.getLogger(__name__)

#: modules the CPU forkserver imports once, so that each worker starts without importing them
PRELOAD = ["torch", "lightning", "milkit.engine", "milkit.workflow", "milkit.trust.parallel_seeds"]
#: environment variables that mean "the user chose the thread count": workers keep it
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class ReplicaFailed(ValueError):
    """A replica's worker failed on something the user can fix (the CLI exits 2)."""


class ReplicaCrashed(RuntimeError):
    """A replica's worker failed unexpectedly or died."""


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _requested(exp: Experiment) -> int | str:
    return getattr(exp.trainer, "parallel_seeds", 1) or 1


def _gpus(exp: Experiment) -> int:
    """GPUs the replicas run on (0 on a CPU)."""
    import torch

    from milkit.distributed import accelerator_for

    if accelerator_for(exp.trainer) != "cuda" or not torch.cuda.is_available():
        return 0
    return torch.cuda.device_count()


def n_workers(exp: Experiment) -> int:
    """Worker processes for this run: ``parallel_seeds`` (``auto``: one per GPU when several are
    visible, else one per CPU core) but never more than the replicas; 1 = the one-process loop."""
    from milkit.trust.ensemble import n_seeds

    P = _requested(exp)
    if P == "auto":
        P = _gpus(exp) if _gpus(exp) > 1 else cpu_count()
    return max(1, min(int(P), n_seeds(exp)))


def check_supported(exp: Experiment) -> None:
    """One line, before anything is written, for what cannot work: replicas in separate
    processes while each replica is itself a DDP job of several processes."""
    from milkit import distributed
    from milkit.trust.ensemble import n_seeds

    P = _requested(exp)
    if P == 1 or n_seeds(exp) == 1:  # K = 1: nothing to run in parallel (a no-op)
        return
    n = distributed.planned_world_size(exp.trainer)
    if n > 1:
        raise ValueError(f"trainer.parallel_seeds: {P} trains replicas in separate processes, but trainer.devices/"
                         f"num_nodes/strategy (or the launcher) ask for {n} DDP processes per run; use one of them "
                         "(trainer.devices: 1 puts replica k on GPU k mod n, or trainer.parallel_seeds: 1)")


def threads_per_worker(P: int) -> int | None:
    """Torch threads of each of P workers: the cores shared out, unless the user set a count."""
    if any(os.environ.get(v) for v in THREAD_ENV):
        return None
    return max(1, cpu_count() // P)


def _device_for(exp: Experiment, k: int) -> str | None:
    """``trainer.devices`` of replica k: GPU ``k mod n`` with several GPUs and ``devices: 1``."""
    n = _gpus(exp)
    if n > 1 and str(exp.trainer.devices).strip() == "1":
        return f"{k % n},"  # Lightning: a list of one GPU index
    return None


@dataclass
class Task:
    """What a worker needs (picklable): the resolved config, not the live objects. The replicas
    it trains arrive one at a time over its pipe (an int k; None: no more)."""

    K: int
    config: dict
    run_path: str
    resume: bool
    threads: int | None
    devices: dict  # replica → its trainer.devices (several GPUs); empty otherwise
    parent_pid: int


def _watch_parent(pid: int, interval: float = 1.0) -> None:
    """A worker ends itself when the process that started it is gone (killed: no orphans training on)."""
    start_ppid = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            alive = True
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                alive = False
            except PermissionError:
                pass
            if not alive or (start_ppid == pid and os.getppid() != pid):
                os._exit(3)

    threading.Thread(target=watch, daemon=True, name="milkit-parent-watch").start()


#: a worker's sends (its log lines and its results) go one at a time
_SEND = threading.Lock()


def _send(conn, msg: tuple) -> None:
    with _SEND:
        conn.send(msg)


class _PipeHandler(logging.Handler):
    """A worker's milkit log records go to the parent, which logs them with the replica's prefix
    (its own stderr, whatever it is now: lines never interleave mid-line)."""

    def __init__(self, conn):
        super().__init__(logging.INFO)
        self.conn = conn

    def emit(self, record: logging.LogRecord) -> None:
        try:
            _send(self.conn, ("log", record.levelno, record.getMessage()))
        except Exception:  # noqa: BLE001 - the parent is gone: nothing to tell
            pass


def _worker_logging(conn) -> None:
    logger = logging.getLogger("milkit")
    for h in list(logger.handlers):
        logger.removeHandler(h)
    logger.addHandler(_PipeHandler(conn))
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _worker(make_method: Callable, task: Task, conn) -> None:
    """Build the data once, then train each replica k the parent sends into its own ``seed-<k>/``
    folders; report ("ok", k, wall s, CPU s) or the error, and stop at None or on an error."""
    _watch_parent(task.parent_pid)
    _worker_logging(conn)
    k = None
    try:
        import torch

        if task.threads is not None:
            torch.set_num_threads(task.threads)
        from milkit.config import build_experiment
        from milkit.engine import resuming, seed_everything
        from milkit.run_dir import RunDir
        from milkit.trust.ensemble import replica_experiment, replica_run

        raw = dict(task.config)
        raw["trainer"] = {**raw.get("trainer", {}), "progress_bar": False, "parallel_seeds": 1}
        exp = build_experiment(raw, source=f"{task.run_path}/config.yaml")
        splits = exp.data.build(exp.seed)  # the split of exp.seed, as the parent built it; once per worker
        run = RunDir(task.run_path)
        while True:
            k = conn.recv()
            if k is None:
                break
            t0, c0 = time.perf_counter(), time.process_time()
            ek = replica_experiment(exp, k)
            if k in task.devices:
                ek = ek.model_copy(update={"trainer": ek.trainer.model_copy(update={"devices": task.devices[k]})})
            method = make_method(ek)
            seed_everything(ek.seed)  # initialisation depends on the replica's seed only (as fit_members)
            with resuming(task.resume):
                method.fit(splits, replica_run(run, k, task.K))
            _send(conn, ("ok", k, round(time.perf_counter() - t0, 2), round(time.process_time() - c0, 2)))
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent as one message
        from milkit.cli import user_message

        msg = user_message(err) if isinstance(err, Exception) else None
        detail = traceback.format_exc() if os.environ.get("MILKIT_DEBUG") else ""
        try:
            if msg is not None:
                _send(conn, ("user", k, msg, detail))
            else:
                _send(conn, ("unexpected", k, f"{type(err).__name__}: {' '.join(str(err).split())}", detail))
        except Exception:  # noqa: BLE001 - the parent is gone
            pass
        finally:
            conn.close()
        sys.exit(1)
    conn.close()


def _context(exp: Experiment):
    import multiprocessing as mp

    if _gpus(exp) == 0 and "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


@dataclass
class _Slot:
    """One running worker: its process, its pipe (None once closed) and the replica it trains."""

    process: object
    conn: object
    replica: int | None = None


def fit_parallel(make_method: Callable, exp: Experiment, run, P: int, resume: bool) -> None:
    """Train the K replicas in ``P`` workers (each takes the next replica when it is free);
    returns when every one has finished, or raises (:class:`ReplicaFailed` /
    :class:`ReplicaCrashed`) naming the first replica that did not."""
    from multiprocessing.connection import wait

    from milkit import io
    from milkit.trust.ensemble import n_seeds

    K = n_seeds(exp)
    ctx = _context(exp)
    threads = threads_per_worker(P)
    devices = {k: d for k in range(K) if (d := _device_for(exp, k)) is not None}
    task = Task(K, exp.to_dict(), str(Path(run.path).resolve()), resume, threads, devices, os.getpid())
    pending = list(range(K))
    slots: list[_Slot] = []
    log.info("training %d seed replicas in %d processes (%s threads each)", K, P,
             threads if threads is not None else "the environment's")
    failure: Exception | None = None

    def give(slot: _Slot) -> None:
        slot.replica = pending.pop(0) if pending else None
        slot.conn.send(slot.replica)

    try:
        for _ in range(P):
            parent_end, child_end = ctx.Pipe(duplex=True)
            p = ctx.Process(target=_worker, args=(make_method, task, child_end), name="milkit-seed-worker", daemon=True)
            p.start()
            child_end.close()  # the worker holds the only other end: EOF when it is gone
            slot = _Slot(p, parent_end)
            slots.append(slot)
            give(slot)
        while slots and failure is None:
            ready = wait([x for s in slots for x in ((s.conn,) if s.conn is not None else ()) + (s.process.sentinel,)])
            for slot in list(slots):
                if slot.conn is not None and slot.conn in ready:
                    failure = _read(slot, exp.seed, give)
                elif slot.process.sentinel in ready:  # ended, and everything it sent is read
                    slot.process.join()
                    slots.remove(slot)
                    if slot.replica is not None:  # it died inside a replica
                        failure = _died(slot.replica, exp.seed + slot.replica, slot.process.exitcode)
                if failure is not None:
                    break
    finally:
        stopped = [s for s in slots if s.process.is_alive()]
        for s in slots:  # a failure, or this process interrupted: stop the rest
            s.process.kill()
            s.process.join()
            if s.conn is not None:
                s.conn.close()
        if stopped:
            for tmp in io.remove_stale_temps(run.path, recursive=True):  # the killed workers' half-written files
                log.info("removed %s (left by a stopped replica)", tmp)
    if failure is not None:
        raise failure


def _who(k: int, seed: int) -> str:
    return f"seed replica {k} (seed {seed}, stages/<stage>/seed-{k}/)"


def _read(slot: _Slot, seed0: int, give: Callable) -> Exception | None:
    """One message of a worker: a log line (logged here with the replica's prefix), a finished
    replica (the worker gets the next), or an error (returned, naming the replica)."""
    try:
        msg = slot.conn.recv()
    except (EOFError, OSError):  # the worker is gone; its sentinel tells the rest
        slot.conn.close()
        slot.conn = None
        return None
    if msg[0] == "log":
        logging.getLogger("milkit").log(msg[1], "[seed-%s] %s", slot.replica, msg[2])
        return None
    if msg[0] == "ok":
        log.info("[seed-%d] trained in %.1f s (CPU %.1f s)", msg[1], msg[2], msg[3])
        give(slot)
        return None
    kind, k, text, detail = msg
    slot.replica = None  # reported: not a death to name again
    if detail:
        sys.stderr.write(detail)
    who = _who(k, seed0 + k) if k is not None else "a seed-replica worker (before its first replica)"
    return ReplicaFailed(f"{who}: {text}") if kind == "user" else ReplicaCrashed(f"{who} failed: {text}")


def _died(k: int, seed: int, exitcode: int | None) -> Exception:
    return ReplicaCrashed(f"{_who(k, seed)}: its worker process ended with exit code {exitcode} before it "
                          "finished (killed? out of memory?); --resume continues the run")


def load_members(make_method: Callable, exp: Experiment, run) -> dict:
    """Per stage, the K labelers as the workers left them in the run directory (``Method.load``
    of each replica, as :func:`milkit.trust.ensemble.load`; calibration follows in ``finalise``)."""
    from milkit.trust.ensemble import n_seeds, replica_experiment, replica_run

    K = n_seeds(exp)
    members: dict = {}
    for k in range(K):
        for stage, lab in make_method(replica_experiment(exp, k)).load(replica_run(run, k, K)).items():
            members.setdefault(stage, []).append(lab)
    return members

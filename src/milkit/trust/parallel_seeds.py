"""Seed replicas in parallel processes (issue 15): ``trainer.parallel_seeds: P``.

The K replicas of ``trainer.seeds: K`` (:mod:`milkit.trust.ensemble`) are independent runs on
one split, so up to P worker processes train them at once, replica k into its own
``stages/<stage>/seed-<k>/`` only. Each worker rebuilds the experiment from its resolved
config (what ``config.yaml`` holds) and the data from ``exp.seed``, seeds the RNGs with the
replica's seed and calls ``Method.fit`` exactly as the one-process loop does, inside
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

    if exp.trainer.accelerator not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
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
    """What a worker needs (picklable): the resolved config, not the live objects."""

    k: int
    K: int
    config: dict
    run_path: str
    resume: bool
    threads: int | None
    device: str | None
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


class _PipeHandler(logging.Handler):
    """A worker's milkit log records go to the parent, which logs them with the replica's prefix
    (its own stderr, whatever it is now: lines never interleave mid-line)."""

    def __init__(self, conn):
        super().__init__(logging.INFO)
        self.conn = conn
        self.lock_ = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with self.lock_:
                self.conn.send(("log", record.levelno, record.getMessage()))
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
    """Train replica ``task.k`` into its own ``seed-<k>/`` folders; report ("ok",) or the error."""
    _watch_parent(task.parent_pid)
    _worker_logging(conn)
    try:
        import torch

        if task.threads is not None:
            torch.set_num_threads(task.threads)
        from milkit.config import build_experiment
        from milkit.engine import resuming, seed_everything
        from milkit.run_dir import RunDir
        from milkit.trust.ensemble import check_supported as check_method
        from milkit.trust.ensemble import replica_experiment, replica_run

        raw = dict(task.config)
        trainer = {**raw.get("trainer", {}), "progress_bar": False, "parallel_seeds": 1}
        if task.device is not None:
            trainer["devices"] = task.device
        raw["trainer"] = trainer
        exp = build_experiment(raw, source=f"{task.run_path}/config.yaml")
        splits = exp.data.build(exp.seed)  # the split of exp.seed, as the parent built it
        ek = replica_experiment(exp, task.k)
        method = make_method(ek)
        check_method(method, exp)
        seed_everything(ek.seed)  # initialisation depends on the replica's seed only (as fit_members)
        t0 = time.perf_counter()
        with resuming(task.resume):
            method.fit(splits, replica_run(RunDir(task.run_path), task.k, task.K))
        conn.send(("ok", round(time.perf_counter() - t0, 2), round(time.process_time(), 2)))
    except BaseException as err:  # noqa: BLE001 - every failure goes back to the parent as one message
        from milkit.cli import user_message

        msg = user_message(err) if isinstance(err, Exception) else None
        detail = traceback.format_exc() if os.environ.get("MILKIT_DEBUG") else ""
        try:
            if msg is not None:
                conn.send(("user", msg, detail))
            else:
                conn.send(("unexpected", f"{type(err).__name__}: {' '.join(str(err).split())}", detail))
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


def fit_parallel(make_method: Callable, exp: Experiment, run, P: int, resume: bool) -> None:
    """Train the K replicas in up to ``P`` workers; returns when every one has finished, or
    raises (:class:`ReplicaFailed` / :class:`ReplicaCrashed`) naming the first that did not."""
    from milkit import io
    from milkit.trust.ensemble import n_seeds

    K = n_seeds(exp)
    ctx = _context(exp)
    threads = threads_per_worker(P)
    config = exp.to_dict()
    pending = list(range(K))
    running: dict = {}  # replica → [process, its open connection or None, its result]
    log.info("training %d seed replicas in %d processes (%s threads each)", K, P,
             threads if threads is not None else "the environment's")
    failure: Exception | None = None
    try:
        while (pending or running) and failure is None:
            while pending and len(running) < P:
                k = pending.pop(0)
                recv, send = ctx.Pipe(duplex=False)
                task = Task(k, K, config, str(Path(run.path).resolve()), resume, threads, _device_for(exp, k), os.getpid())
                p = ctx.Process(target=_worker, args=(make_method, task, send), name=f"milkit-seed-{k}", daemon=True)
                p.start()
                send.close()  # the worker holds the only write end: EOF when it is gone
                running[k] = (p, recv, None)
            from multiprocessing.connection import wait

            open_conns = {c: k for k, (_, c, _) in running.items() if c is not None}
            sentinels = {p.sentinel: k for k, (p, _, _) in running.items()}
            for obj in wait([*open_conns, *sentinels]):
                if obj in open_conns:
                    k = open_conns[obj]
                    if k in running and running[k][1] is obj:
                        _read(running, k)
                    continue
                k = sentinels[obj]
                while running[k][1] is not None and running[k][1].poll(0):  # what it sent before it ended
                    _read(running, k)
                p, conn, result = running.pop(k)
                if conn is not None:
                    conn.close()
                p.join()
                failure = _outcome(k, exp.seed + k, result, p.exitcode)
                if failure is not None:
                    break
    finally:
        for k, (p, recv, _) in running.items():  # a failure, or this process interrupted: stop the rest
            p.kill()
            p.join()
            if recv is not None:
                recv.close()
        if running:
            for tmp in io.remove_stale_temps(run.path, recursive=True):  # the killed workers' half-written files
                log.info("removed %s (left by a stopped replica)", tmp)
    if failure is not None:
        raise failure


def _read(running: dict, k: int) -> None:
    """One message of replica k's worker: a log line (logged here, prefixed) or its result;
    at the end of the pipe the connection is closed."""
    p, conn, result = running[k]
    try:
        msg = conn.recv()
    except (EOFError, OSError):
        conn.close()
        running[k] = (p, None, result)
        return
    if msg[0] == "log":
        logging.getLogger("milkit").log(msg[1], "[seed-%d] %s", k, msg[2])
    else:
        running[k] = (p, conn, msg)


def _outcome(k: int, seed: int, result, exitcode: int | None) -> Exception | None:
    """None when replica k finished; else the error to raise, naming it."""
    who = f"seed replica {k} (seed {seed}, stages/<stage>/seed-{k}/)"
    if result is not None and result[0] == "ok" and exitcode == 0:
        log.info("[seed-%d] trained in %.1f s (the worker's CPU time: %.1f s)", k, result[1], result[2])
        return None
    if result is not None and result[0] == "user":
        if result[2]:
            sys.stderr.write(result[2])
        return ReplicaFailed(f"{who}: {result[1]}")
    if result is not None and result[0] == "unexpected":
        if result[2]:
            sys.stderr.write(result[2])
        return ReplicaCrashed(f"{who} failed: {result[1]}")
    return ReplicaCrashed(f"{who}: its worker process ended with exit code {exitcode} before it finished "
                          "(killed? out of memory?); --resume continues the run")


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

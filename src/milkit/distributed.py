"""Multi-process training (Lightning DDP, issue 15): ranks, sharded loaders, gathering.

How a DDP run of ``milkit train`` is laid out (docs/scale.md):

- **Launch.** Lightning's ``ddp`` starts the other ranks as copies of the command line when the
  first stage begins (``LOCAL_RANK=1…``); torchrun and ``srun`` start every rank themselves.
  Before the process group exists, :func:`is_rank_zero` reads the rank from the launcher's
  environment, so only rank 0 checks and writes the run directory from the very first line.
- **Training bags.** Every rank draws the epoch order a single process would draw (the same
  seeded sampler, :class:`ShardedSampler`) and takes every W-th bag of it, so that global step
  k of W ranks at per-rank batch b holds exactly the bags of step k of one process at batch
  W·b. DDP averages the ranks' gradients; each rank's loss is the mean over its b bags, so the
  update is the one-process update (up to float rounding) when W·b divides the training set.
  Otherwise the order is padded by repeating its first bags (every rank must take the same
  number of steps).
- **Validation bags.** Rank r scores bags r, r+W, … (no padding: nothing is scored twice);
  :func:`gather_in_order` puts every rank's predictions back into dataset order on every rank
  before the AUROC, so the monitored value and the checkpoint choice are the same everywhere.
- **After training.** Rank 0 alone calibrates, chooses thresholds, evaluates and writes
  ``metrics.json`` and ``report.html``; the others wait at :func:`finish_barrier`.
"""

from __future__ import annotations

import datetime
import itertools
import math
import os
from typing import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Sampler

#: strategies milkit runs correctly (every rank is a copy of the command; milkit gathers validation)
SUPPORTED_STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false",
                        "single_device")
#: how long the other ranks wait for rank 0's evaluation and writes after training
FINISH_TIMEOUT = datetime.timedelta(hours=12)


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


def world_size() -> int:
    """Processes in the job (1 before the process group exists or without one)."""
    d = _dist()
    return d.get_world_size() if d is not None else 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    d = _dist()
    return d.get_rank() if d is not None else 0


def is_distributed() -> bool:
    """A process group of more than one rank exists."""
    return world_size() > 1


def launch_rank() -> int:
    """The global rank the launcher gave this process, read before any process group exists:
    torchrun (``RANK``), SLURM with several tasks (``SLURM_PROCID``), or a rank Lightning
    started (``NODE_RANK``/``LOCAL_RANK``; non-zero means "not rank 0", not the exact rank)."""
    env = os.environ
    if "RANK" in env:
        return int(env["RANK"])
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return int(env["SLURM_PROCID"])
    local, node = int(env.get("LOCAL_RANK", "0")), int(env.get("NODE_RANK", env.get("GROUP_RANK", "0")))
    return local if node == 0 else node * 10_000 + local


def is_rank_zero() -> bool:
    """True in the one process that writes the run directory."""
    return rank() == 0 if _dist() is not None else launch_rank() == 0


def accelerator_for(cfg) -> str:
    """What ``L.Trainer(accelerator=…)`` gets: ``auto`` is a CUDA GPU when one is visible, else the CPU —
    never Apple's MPS, which Lightning's own ``auto`` (and ``gpu``) would pick on a Mac."""
    if cfg.accelerator in ("auto", "gpu", "cuda"):
        return "cuda" if cfg.accelerator != "auto" or torch.cuda.is_available() else "cpu"
    return cfg.accelerator


def _gpu_ids(devices: str | int) -> list[int] | None:
    """The GPU indices of ``trainer.devices`` when it lists them (``'0,1'``), else None (a count)."""
    if isinstance(devices, str) and "," in devices:
        return [int(d) for d in devices.split(",") if d.strip()]
    return None


def check_devices(cfg) -> None:
    """GPUs asked for that this machine does not have: one line naming the key, before anything is written
    (Lightning would stop with its own exception after the run directory was made)."""
    acc = accelerator_for(cfg)
    ids = _gpu_ids(cfg.devices)
    if acc == "cpu":
        if ids is not None:
            raise ValueError(f"trainer.devices: {cfg.devices!r} names GPUs, but the run is on the CPU "
                             f"(trainer.accelerator {cfg.accelerator!r}, no CUDA GPU visible); give a process count")
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ValueError(f"trainer.accelerator: {cfg.accelerator!r} asks for a CUDA GPU, but none is visible here "
                         "(torch.cuda.is_available() is False); use auto or cpu")
    if "WORLD_SIZE" in os.environ or "SLURM_NTASKS" in os.environ:
        return  # the launcher shares the GPUs out
    wanted = ids if ids is not None else (list(range(int(cfg.devices))) if str(cfg.devices).strip().isdigit() else [])
    missing = [i for i in wanted if i >= n]
    if missing:
        raise ValueError(f"trainer.devices: {cfg.devices!r} asks for GPU {missing[0]}, but {n} "
                         f"GPU{'s are' if n > 1 else ' is'} visible (0–{n - 1})")


def planned_world_size(cfg) -> int:
    """How many processes ``trainer.devices``/``num_nodes``/``strategy`` ask for (or the launcher's
    ``WORLD_SIZE``/``SLURM_NTASKS``); ``devices: auto`` counts the visible GPUs, 1 on a CPU."""
    env = os.environ
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        return int(env["SLURM_NTASKS"])
    if cfg.strategy == "single_device":
        return 1
    devices = cfg.devices
    if isinstance(devices, str) and "," in devices:
        n = len([d for d in devices.split(",") if d.strip()])
    elif isinstance(devices, str) and devices.strip().lstrip("-").isdigit():
        n = int(devices)
    elif isinstance(devices, int):
        n = devices
    else:  # "auto"
        n = -1
    if n == -1:
        n = torch.cuda.device_count() if accelerator_for(cfg) == "cuda" and torch.cuda.is_available() else 1
    return max(n, 1) * cfg.num_nodes


def strategy_for(cfg):
    """What ``L.Trainer(strategy=…)`` gets: ``ddp`` (and ``auto`` over several processes) becomes
    DDP with ``find_unused_parameters=True``: MIL models leave parameters out of some losses
    (WENO's student head in the teacher step, CLAM's other-class instance heads), and plain
    Lightning ``ddp`` then stops with "Expected to have finished reduction". Name
    ``ddp_find_unused_parameters_false`` for the faster reducer when every parameter is used."""
    if cfg.strategy == "ddp" or (cfg.strategy == "auto" and planned_world_size(cfg) > 1):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=True)
    return cfg.strategy


#: methods whose every stage gathers validation across ranks (tests/distributed)
DDP_METHODS = ("distill_to_label", "mil", "weno")


def check_supported(exp) -> None:
    """A method whose stages do not gather validation across ranks is refused before anything
    is written (one line naming the key)."""
    n = planned_world_size(exp.trainer)
    if n > 1 and exp.method.name not in DDP_METHODS:
        raise ValueError(f"trainer.devices: {n} processes are supported for the methods {', '.join(DDP_METHODS)}; "
                         f"{exp.method.name!r} computes validation in each process — use trainer.devices: 1")


# -- loaders --------------------------------------------------------------------------


def shard_order(order: list[int], world: int, rank_: int, pad: bool) -> list[int]:
    """Rank ``rank_``'s items of ``order``: positions rank_, rank_+world, …; with ``pad`` the order
    is first extended cyclically to a multiple of ``world`` (every rank the same count)."""
    if pad and order and len(order) % world:
        total = math.ceil(len(order) / world) * world
        order = (order * math.ceil(total / len(order)))[:total]
    return order[rank_::world]


def interleave(parts: Sequence[Tensor], world: int) -> Tensor:
    """Inverse of an unpadded :func:`shard_order`: ``parts[r]`` holds items r, r+world, … of the whole."""
    n = sum(len(p) for p in parts)
    for r, p in enumerate(parts):
        if len(p) != len(range(r, n, world)):
            raise RuntimeError(f"rank {r} holds {len(p)} of {n} items; expected every {world}-th from {r}")
    full = parts[0].new_empty((n, *parts[0].shape[1:]))
    for r, p in enumerate(parts):
        full[r::world] = p
    return full


class ShardedSampler(Sampler[int]):
    """Rank r of W takes items r, r+W, r+2W, … of the order ``base`` gives one process.

    ``pad``: repeat the order's first items until W divides it (training: every rank takes
    the same number of steps); without it (validation) nothing is taken twice.
    """

    def __init__(self, base: Sampler | Sequence[int], pad: bool):
        self.base = base
        self.pad = pad

    def __iter__(self) -> Iterator[int]:
        # the draw a single process makes (same generator, same state); islice, not list(): one
        # process stops after len(base) items, so RandomSampler's trailing draw never runs either
        order = list(itertools.islice(iter(self.base), len(self.base)))  # type: ignore[arg-type]
        yield from shard_order(order, world_size(), rank(), self.pad)

    def __len__(self) -> int:
        n, w = len(self.base), world_size()  # type: ignore[arg-type]
        return math.ceil(n / w) if self.pad else len(range(rank(), n, w))


def shard_loader(loader: DataLoader, pad: bool) -> DataLoader:
    """The same loader over this rank's share (:class:`ShardedSampler` around its sampler; the
    generator object is shared, so the shuffle order follows it exactly as in one process)."""
    bs = loader.batch_sampler
    if type(bs) is not BatchSampler:
        raise ValueError(f"multi-process training needs a DataLoader with batch_size and a sampler; "
                         f"got batch_sampler {type(bs).__name__}")
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=ShardedSampler(loader.sampler, pad),
        collate_fn=loader.collate_fn,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        drop_last=loader.drop_last,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
        **({"prefetch_factor": loader.prefetch_factor} if loader.num_workers > 0 else {}),
    )


def check_stage(module, val_loader: DataLoader, world: int) -> None:
    """A stage validated under DDP must gather its validation predictions (``gathers_validation``),
    and every rank needs a validation bag (a rank without one would skip the gathering)."""
    if not getattr(module, "gathers_validation", False):
        raise ValueError(f"{type(module).__name__}: its validation is computed per process; "
                         "this stage cannot run on several processes — use trainer.devices: 1")
    n = len(val_loader.dataset)  # type: ignore[arg-type]
    if n < world:
        raise ValueError(f"the validation split has {n} bag(s), fewer than the {world} processes; "
                         "use fewer trainer.devices or more validation bags")


# -- collectives ----------------------------------------------------------------------


def gather_in_order(*shards: Tensor) -> tuple[Tensor, ...]:
    """Each rank's validation tensors (rank r holds items r, r+W, … of the split, the layout of
    an unpadded :class:`ShardedSampler`) → the whole split in dataset order, on every rank.
    One process: the tensors unchanged."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return shards
    w = d.get_world_size()
    got: list = [None] * w
    d.all_gather_object(got, [t.detach().cpu() for t in shards])
    return tuple(interleave([g[j] for g in got], w) for j in range(len(shards)))


def _device_for_collectives() -> torch.device:
    d = _dist()
    if d is not None and d.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def merge_seen(values: Tensor, fresh: Tensor) -> tuple[Tensor, Tensor]:
    """Per-item tables each rank filled for its own bags since the last merge (``fresh`` marks
    what it filled) → (the same table on every rank, which items any rank filled). An item
    filled by several ranks (padding) takes the lowest rank's value; one filled by none keeps
    this rank's value (the previous merge's, the same on every rank). One process: unchanged."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return values, fresh
    dev = _device_for_collectives()
    v, s = values.detach().to(dev), fresh.to(dev, torch.uint8)
    vs = [torch.empty_like(v) for _ in range(d.get_world_size())]
    ss = [torch.empty_like(s) for _ in range(d.get_world_size())]
    d.all_gather(vs, v)
    d.all_gather(ss, s)
    out_v = values.detach().cpu().clone()
    out_s = torch.zeros(len(fresh), dtype=torch.bool)
    for vr, sr in zip(vs, ss):
        take = sr.cpu().bool() & ~out_s
        out_v[take] = vr.cpu()[take]
        out_s |= take
    return out_v.to(values.device), out_s.to(fresh.device)


def all_sum(*values: float) -> tuple[float, ...]:
    """Sums over ranks of a few numbers (one process: unchanged)."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=_device_for_collectives())
    d.all_reduce(t)
    return tuple(float(x) for x in t.cpu())


def barrier() -> None:
    """Every rank waits here (one process: nothing)."""
    d = _dist()
    if d is not None and d.get_world_size() > 1:
        d.barrier()


def finish_group():
    """A gloo group with a long timeout for :func:`finish_barrier` (a collective: every rank calls it
    at the same point); None in one process."""
    d = _dist()
    if d is None or d.get_world_size() == 1:
        return None
    return d.new_group(backend="gloo", timeout=FINISH_TIMEOUT)


def finish_barrier(group) -> None:
    """The other ranks wait here while rank 0 evaluates and writes; rank 0 arrives when done."""
    if group is not None:
        import torch.distributed as dist

        dist.barrier(group=group)

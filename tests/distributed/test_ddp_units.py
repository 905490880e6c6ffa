"""milkit.distributed without a process group: sharding arithmetic, rank detection, the
trainer checks (one-line errors naming the key) and the strategy milkit hands Lightning."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from milkit import distributed as dd
from milkit.config import ConfigError, TrainerConfig, build_experiment, validate_section


def test_shard_order_by_hand() -> None:
    order = [5, 3, 1, 4, 2]
    assert dd.shard_order(order, 2, 0, pad=False) == [5, 1, 2]
    assert dd.shard_order(order, 2, 1, pad=False) == [3, 4]  # validation: nothing twice
    assert dd.shard_order(order, 2, 1, pad=True) == [3, 4, 5]  # training: padded with the first bag
    assert dd.shard_order([7], 3, 2, pad=True) == [7]  # fewer items than ranks: every rank one step


def test_global_batches_of_two_ranks_are_the_one_process_batches() -> None:
    order = list(torch.randperm(12, generator=torch.Generator().manual_seed(3)))
    r0, r1 = dd.shard_order(order, 2, 0, True), dd.shard_order(order, 2, 1, True)
    for k in range(3):  # per-rank batch 2 on 2 ranks = one process at batch 4
        assert sorted(r0[2 * k:2 * k + 2] + r1[2 * k:2 * k + 2]) == sorted(order[4 * k:4 * k + 4])


def test_interleave_inverts_unpadded_sharding() -> None:
    x = torch.arange(7.0) * 10
    parts = [x[dd.shard_order(list(range(7)), 3, r, pad=False)] for r in range(3)]
    assert torch.equal(dd.interleave(parts, 3), x)
    with pytest.raises(RuntimeError, match="rank 1 holds 3 of 7"):
        dd.interleave([parts[0], torch.zeros(3), parts[2][:1]], 3)


def test_sharded_loader_draws_the_one_process_order_epoch_after_epoch() -> None:
    ds = list(range(10))

    def epochs(loader) -> list:
        out = []
        for _ in range(3):  # as Lightning consumes a loader: len(loader) batches per epoch
            it = iter(loader)
            out.append([next(it).tolist() for _ in range(len(loader))])
        return out

    plain = DataLoader(ds, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))
    sharded = dd.shard_loader(DataLoader(ds, batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0)),
                              pad=True)
    assert isinstance(sharded.sampler, dd.ShardedSampler)
    assert epochs(sharded) == epochs(plain)  # one rank = one process, every epoch (same generator draws)


@pytest.mark.parametrize("env,zero", [({}, True), ({"RANK": "1"}, False), ({"LOCAL_RANK": "1"}, False),
                                      ({"LOCAL_RANK": "0", "NODE_RANK": "1"}, False),
                                      ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2"}, False),
                                      ({"SLURM_PROCID": "3", "SLURM_NTASKS": "1"}, True)])
def test_rank_zero_is_read_from_the_launcher(monkeypatch, env, zero) -> None:
    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert dd.is_rank_zero() is zero


def test_planned_processes_and_strategy(monkeypatch) -> None:
    for k in ("WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    tc = lambda **kw: TrainerConfig(**kw)  # noqa: E731
    assert dd.planned_world_size(tc(accelerator="cpu", devices=2, num_nodes=2, strategy="ddp")) == 4
    assert dd.planned_world_size(tc(accelerator="cpu", devices="0,1")) == 2
    assert dd.planned_world_size(tc(accelerator="cpu")) == 1  # devices auto on a CPU: one process
    from lightning.pytorch.strategies import DDPStrategy

    s = dd.strategy_for(tc(accelerator="cpu", devices=2, strategy="ddp"))
    assert isinstance(s, DDPStrategy) and s._ddp_kwargs["find_unused_parameters"] is True
    assert isinstance(dd.strategy_for(tc(accelerator="cpu", devices=2)), DDPStrategy)  # auto over 2 processes
    assert dd.strategy_for(tc(accelerator="cpu", devices=1)) == "auto"
    assert dd.strategy_for(tc(devices=2, strategy="ddp_find_unused_parameters_false")) == "ddp_find_unused_parameters_false"
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun / srun: the launcher's count wins
    assert dd.planned_world_size(tc(accelerator="cpu", devices=1)) == 8


@pytest.mark.parametrize("raw,needle", [
    ({"strategy": "ddp_spawn"}, "'trainer.strategy': 'ddp_spawn' is not supported (it starts the ranks from inside"),
    ({"strategy": "fsdp"}, "'trainer.strategy': 'fsdp' is not supported; use one of auto, ddp"),
    ({"devices": 0}, "'trainer.devices': 0 is not a device count"),
    ({"devices": "two"}, "'trainer.devices': 'two' is not a device count"),
    ({"devices": 2, "strategy": "single_device"}, "strategy 'single_device' runs one process but devices is 2"),
    ({"num_nodes": 0}, "num_nodes must be ≥ 1"),
])
def test_bad_devices_or_strategy_is_one_line_naming_the_key(raw, needle) -> None:
    with pytest.raises(ConfigError) as err:
        validate_section(TrainerConfig, raw, "trainer", "exp.yaml")
    msg = str(err.value)
    assert needle in msg and msg.startswith("exp.yaml: ") and "\n" not in msg


def test_a_method_that_validates_per_process_is_refused(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    exp = build_experiment({"data": {"kind": "seg_synthetic"}, "method": {"name": "ikd"},
                            "trainer": {"accelerator": "cpu", "devices": 2, "strategy": "ddp"}})
    with pytest.raises(ValueError, match=r"^trainer.devices: 2 processes are supported for the methods "
                                         r"distill_to_label, mil, weno; 'ikd' computes validation in each process"):
        dd.check_supported(exp)
    dd.check_supported(exp.model_copy(update={"trainer": TrainerConfig(accelerator="cpu", devices=1)}))


def test_cli_rejects_ddp_spawn_with_exit_2(tmp_path, capsys) -> None:
    from milkit.cli import main

    cfg = tmp_path / "exp.yaml"
    cfg.write_text("data: {kind: hard_bags}\nmethod: {name: mil}\ntrainer: {strategy: ddp_spawn}\n")
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert "trainer.strategy" in err and "ddp_spawn" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()

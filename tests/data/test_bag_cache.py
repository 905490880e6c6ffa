"""Feature bags kept in memory after their first read (``data.cache_gb``, issue 15)."""

import os

import h5py
import numpy as np
import pytest
import torch

from milkit.benchmarks.train_loop import make_feature_bags
from milkit.config import TrainerConfig
from milkit.data.bag_cache import BagCache, bag_bytes
from milkit.data.features import FeatureBagsConfig
from milkit.methods.base import bag_loader


def _cfg(root, **kw):
    return FeatureBagsConfig(features_dir=root / "features", labels_csv=root / "labels.csv", **kw)


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    return make_feature_bags(tmp_path_factory.mktemp("cache"), 8, 4, 2, 12, 6, seed=3)


def _epochs(splits, n_epochs=2):
    loader = bag_loader(splits.train, TrainerConfig(batch_size=2), shuffle=True, seed=5)
    out = []
    for _ in range(n_epochs):
        out += [(b.instances.clone(), b.mask.clone(), b.labels.clone(), list(b.bag_ids), b.coords.clone())
                for b in loader]
    out += [(b.instances.clone(), b.bag_id) for b in splits.val]
    return out


def test_same_batches_with_and_without_cache(bags):
    plain, cached = _cfg(bags, cache_gb=0).build(0), _cfg(bags).build(0)
    a, b = _epochs(plain), _epochs(cached)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v
    cache = cached.train.table.cache
    assert len(cache) == 8 + 4 and cache.hits >= 8  # the second epoch read no file
    assert plain.train.table.cache.hits == 0 and len(plain.train.table.cache) == 0


def test_changed_file_is_read_again(tmp_path):
    root = make_feature_bags(tmp_path, 4, 2, 2, 10, 4, seed=1)
    splits = _cfg(root).build(0)
    ds = splits.train
    first = ds[0].instances.clone()
    assert torch.equal(ds[0].instances, first) and ds.table.cache.hits == 1
    path = root / "features" / f"{ds.bag_ids[0]}.h5"
    st = os.stat(path)
    with h5py.File(path, "r+") as f:  # same shape, same file size: only the values and mtime change
        f["features"][...] = f["features"][()] + 1.0
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = ds[0].instances
    np.testing.assert_array_equal(again.numpy(), first.numpy() + 1.0)
    assert torch.equal(ds[0].instances, again)  # cached afresh


def test_budget_is_respected_and_uncached_bags_still_read(bags):
    splits = _cfg(bags, cache_gb=0).build(0)
    one = bag_bytes(splits.train[0])
    sizes = [bag_bytes(splits.train[i]) for i in range(len(splits.train))]
    budget = int(2.5 * one)
    cache = BagCache(budget)
    table = splits.train.table
    table.cache = cache
    got = [splits.train[i] for i in range(len(splits.train))]
    assert 0 < cache.used_bytes <= budget
    # first come, first kept: bags are kept in reading order while they fit
    kept, used = [], 0
    for i, s in enumerate(sizes):
        if used + s <= budget:
            kept.append(splits.train.indices[i])
            used += s
    assert sorted(k for k in kept) == sorted(k for k in table.cache._items)
    assert cache.used_bytes == used
    ref = _cfg(bags, cache_gb=0).build(0).train
    for i, b in enumerate(got):  # cached or not, the same bags
        assert torch.equal(b.instances, ref[i].instances) and b.bag_id == ref[i].bag_id
        assert torch.equal(splits.train[i].instances, ref[i].instances)


def test_setting_an_attribute_leaves_the_cache_alone(bags):
    ds = _cfg(bags).build(0).train
    b = ds[1]
    b.adj = "changed"
    b.meta["path"] = "elsewhere"
    c = ds[1]
    assert c.adj is None and c.meta["path"] != "elsewhere"


def test_negative_budget_is_refused(bags):
    with pytest.raises(ValueError, match="cache_gb"):
        _cfg(bags, cache_gb=-1)


# -- data.preload: the bag cache warmed before training ------------------------------------


def test_preload_reads_every_bag_once_into_the_cache_and_gives_the_same_batches(bags):
    plain, pre = _cfg(bags, cache_gb=0).build(0), _cfg(bags, preload=True).build(0)
    cache = pre.train.table.cache
    assert cache.budget_bytes is None  # cache_gb left out: preload keeps every bag, as it always did
    assert len(cache) == 8 + 4 + 2 and cache.misses == 14 and cache.hits == 0  # each bag read once, up front
    a, b = _epochs(plain), _epochs(pre)
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        for u, v in zip(x, y):
            assert torch.equal(u, v) if isinstance(u, torch.Tensor) else u == v
    assert cache.misses == 14 and cache.hits == 2 * 8 + 4  # two epochs of train, one pass over val: no file read
    assert [t.bag_id for t in pre.test] == [t.bag_id for t in plain.test]


def test_preload_within_an_explicit_budget_and_the_default_budget(bags):
    pre = _cfg(bags, preload=True, cache_gb=1).build(0)
    assert pre.train.table.cache.budget_bytes == 2**30 and len(pre.train.table.cache) == 14
    assert _cfg(bags).cache_budget_bytes() == 2 * 2**30  # left out, no preload: 2 GiB
    assert _cfg(bags, cache_gb=0.5).cache_budget_bytes() == 2**29


def test_preload_with_a_budget_too_small_is_refused_in_one_line(bags):
    plain = _cfg(bags, cache_gb=0).build(0)
    need = sum(bag_bytes(b) for s in (plain.train, plain.val, plain.test) for b in s)
    with pytest.raises(ValueError) as err:
        _cfg(bags, preload=True, cache_gb=need / 2 / 2**30).build(0)
    msg = str(err.value)
    assert "\n" not in msg and "data.preload" in msg and "data.cache_gb" in msg and "14 bags" in msg
    assert f"{need / 2**30:.3g} GiB" in msg  # the size they need, so the user can set the budget
    _cfg(bags, preload=True, cache_gb=need / 2**30).build(0)  # exactly enough: accepted
    with pytest.raises(ValueError, match=r"data\.preload.*data\.cache_gb: 0"):
        _cfg(bags, preload=True, cache_gb=0)


def test_preload_budget_error_on_the_cli_exits_2_before_writing(bags, tmp_path, capsys):
    import yaml

    from milkit.cli import main

    exp = {"seed": 0, "data": {"kind": "feature_bags", "features_dir": str(bags / "features"),
                               "labels_csv": str(bags / "labels.csv"), "preload": True, "cache_gb": 1e-9},
           "method": {"name": "mil", "encoder": {"name": "identity"}, "model": {"name": "abmil"}},
           "trainer": {"max_epochs": 1, "accelerator": "cpu", "progress_bar": False}}
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(yaml.safe_dump(exp))
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", str(cfg), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.preload" in err[0] and "data.cache_gb" in err[0]
    assert not out.exists()


def test_resume_accepts_another_memory_setting(bags, tmp_path):
    """``cache_gb``/``preload`` change no batch, so a run written with one (or before ``cache_gb``
    was left out by default) resumes with another; a real data change is still refused."""
    from milkit.config import build_experiment
    from milkit.run_dir import RunDir
    from milkit.workflow import _check_same_config

    raw = {"seed": 0, "data": {"kind": "feature_bags", "features_dir": str(bags / "features"),
                               "labels_csv": str(bags / "labels.csv")},
           "method": {"name": "mil", "encoder": {"name": "identity"}, "model": {"name": "abmil"}}}
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_config(build_experiment({**raw, "data": {**raw["data"], "cache_gb": 2.0}}))
    _check_same_config(run, build_experiment(raw))
    _check_same_config(run, build_experiment({**raw, "data": {**raw["data"], "preload": True}}))
    with pytest.raises(ValueError, match="data.val_fraction"):
        _check_same_config(run, build_experiment({**raw, "data": {**raw["data"], "val_fraction": 0.3}}))

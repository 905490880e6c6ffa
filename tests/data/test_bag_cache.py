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

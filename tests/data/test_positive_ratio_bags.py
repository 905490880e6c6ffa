"""WENO §4.1 positive-ratio bags: protocol, disjoint splits, sources, named errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from milkit.config import ConfigError, build_experiment
from milkit.data.positive_ratio import PositiveRatioBagsConfig, positive_ratio_splits


def _image_sets(splits) -> list[set[int]]:
    return [{i for b in ds for i in b.meta["image_index"]} for ds in (splits.train, splits.val, splits.test)]


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_digits_protocol(ratio: float) -> None:
    cfg = PositiveRatioBagsConfig(positive_ratio=ratio, bag_size=20, n_train_bags=10, n_val_bags=4, n_test_bags=6)
    s = cfg.build(seed=3)
    assert (len(s.train), len(s.val), len(s.test)) == (10, 4, 6)
    k = int(round(ratio * 20))
    for ds in (s.train, s.val, s.test):
        labels = [b.label for b in ds]
        assert sum(labels) == len(ds) // 2  # half the bags positive
        for b in ds:
            assert b.instances.shape == (20, 1, 28, 28)  # digits resized 8x8 -> 28x28
            assert int(b.instance_labels.sum()) == (k if b.label == 1 else 0)
    a, b_, c = _image_sets(s)
    assert not (a & b_) and not (a & c) and not (b_ & c)  # disjoint images across splits


def test_deterministic_and_seed_dependent() -> None:
    cfg = PositiveRatioBagsConfig(positive_ratio=0.2, bag_size=10, n_train_bags=4, n_val_bags=2, n_test_bags=2)
    a, b, c = cfg.build(0), cfg.build(0), cfg.build(1)
    assert all(torch.equal(x.instances, y.instances) for x, y in zip(a.train, b.train))
    assert any(not torch.equal(x.instances, y.instances) for x, y in zip(a.train, c.train))


def test_no_reuse_raises_when_pool_too_small() -> None:
    cfg = PositiveRatioBagsConfig(positive_ratio=0.5, bag_size=100, n_train_bags=20, reuse_images=False)
    with pytest.raises(ValueError, match="not enough train positive images"):
        cfg.build(0)


def test_flat_representation() -> None:
    cfg = PositiveRatioBagsConfig(bag_size=10, n_train_bags=2, n_val_bags=2, n_test_bags=2, representation="flat", image_size=8)
    assert cfg.build(0).train[0].instances.shape == (10, 64)


@pytest.mark.parametrize("ratio", [0.0, -0.1, 1.5])
def test_ratio_outside_unit_interval_is_an_error(ratio: float) -> None:
    with pytest.raises(ValidationError, match="positive_ratio"):
        PositiveRatioBagsConfig(positive_ratio=ratio)
    raw = {"data": {"kind": "positive_ratio_bags", "positive_ratio": ratio}, "method": {"name": "weno"}}
    with pytest.raises(ConfigError, match="data.positive_ratio"):
        build_experiment(raw, source="exp.yaml")


def test_ratio_too_small_for_bag_size() -> None:
    with pytest.raises(ValidationError, match="no positive instance"):
        PositiveRatioBagsConfig(positive_ratio=0.01, bag_size=20)


def test_sources_need_a_path() -> None:
    for src in ("cifar10", "nct_crc", "features"):
        with pytest.raises(ValidationError, match="needs 'path'"):
            PositiveRatioBagsConfig(source=src)


def test_feature_source_npz_and_arrays(tmp_path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 12)).astype(np.float32)
    y = rng.integers(0, 3, size=600)
    np.savez(tmp_path / "f.npz", features=x, labels=y)
    cfg = PositiveRatioBagsConfig(
        source="features", path=tmp_path / "f.npz", positive_class=2, positive_ratio=0.3, bag_size=10,
        n_train_bags=6, n_val_bags=2, n_test_bags=2, reuse_images=False,
    )
    s = cfg.build(0)
    bag = s.train[0]
    assert bag.instances.shape == (10, 12)
    idx = np.asarray(bag.meta["image_index"])
    assert torch.allclose(bag.instances, torch.from_numpy(x[idx]))  # features kept as given
    assert torch.equal(bag.instance_labels, torch.from_numpy((y[idx] == 2).astype(np.int64)))
    s2 = positive_ratio_splits(x, y, 2, cfg.model_copy(update={"source": "digits", "path": None}), seed=0)
    assert s2.train[0].instances.shape == (10, 12)
    np.savez(tmp_path / "bad.npz", feats=x)
    with pytest.raises(ValueError, match="bad.npz"):
        cfg.model_copy(update={"path": tmp_path / "bad.npz"}).build(0)


def test_cifar10_python_batches(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        labels = list(rng.integers(0, 10, size=60))
        data = rng.integers(0, 256, size=(60, 3072), dtype=np.uint8)
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    cfg = PositiveRatioBagsConfig(
        source="cifar10", path=tmp_path, positive_ratio=0.2, bag_size=10, n_train_bags=4, n_val_bags=2, n_test_bags=2
    )
    s = cfg.build(0)
    assert s.train[0].instances.shape == (10, 3, 32, 32)
    assert float(s.train[0].instances.max()) <= 1.0
    test_idx = {i for b in s.test for i in b.meta["image_index"]}
    train_idx = {i for b in s.train for i in b.meta["image_index"]}
    assert min(test_idx) >= 300 and max(train_idx) < 300  # test pool = test_batch
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        cfg.build(0)


def test_cifar10_refuses_arbitrary_pickles(tmp_path) -> None:
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"data": pytest.raises, "labels": []}, f)  # a function reference: must not load
    cfg = PositiveRatioBagsConfig(source="cifar10", path=tmp_path)
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        cfg.build(0)


def test_nct_crc_folder(tmp_path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("ADI", "NORM", "TUM"):
        (tmp_path / cls).mkdir()
        for i in range(8):
            arr = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{cls}-{i}.tif")
    cfg = PositiveRatioBagsConfig(
        source="nct_crc", path=tmp_path, positive_ratio=0.5, bag_size=4, n_train_bags=2, n_val_bags=2, n_test_bags=2,
        image_size=16,
    )
    s = cfg.build(0)
    b = next(b for b in s.train if b.label == 1)
    assert b.instances.shape == (4, 3, 16, 16)
    assert int(b.instance_labels.sum()) == 2
    with pytest.raises(ValueError, match="unknown positive_class 'XYZ'"):
        cfg.model_copy(update={"positive_class": "XYZ"}).build(0)

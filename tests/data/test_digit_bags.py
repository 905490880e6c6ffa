import gzip
import math

import numpy as np
import pytest

from milkit.data.digits import load_digit_images
from milkit.data.synthetic import DigitBagsConfig


def test_digit_bags_protocol():
    cfg = DigitBagsConfig(n_train=200, n_val=100, n_test=100, mean_bag_size=10)
    s = cfg.build(seed=3)
    train = s.train
    labels = np.array(train.labels)
    assert len(train) == 200 and labels.sum() == 100  # balanced
    for b in train:
        has9 = 9 in b.meta["digits"]
        assert b.label == int(has9)  # positive iff it holds a 9
        assert b.instances.shape[1:] == (1, 28, 28)
        assert b.instance_labels.tolist() == [int(d == 9) for d in b.meta["digits"]]
    sizes = np.array([len(b) for b in s.train] + [len(b) for b in s.val] + [len(b) for b in s.test])
    assert abs(sizes.mean() - 10) < 0.6 and abs(sizes.std() - math.sqrt(5)) < 0.6


def test_digit_bags_deterministic_and_disjoint_pools():
    cfg = DigitBagsConfig(n_train=20, n_val=20, n_test=20)
    a, b = cfg.build(seed=1), cfg.build(seed=1)
    assert [x.bag_id for x in a.train] == [x.bag_id for x in b.train]
    assert all((x.instances == y.instances).all() for x, y in zip(a.train, b.train))
    train_imgs = {tuple(v.flatten().tolist()) for bag in a.train for v in bag.instances[:, 0, ::7, ::7]}
    test_imgs = {tuple(v.flatten().tolist()) for bag in a.test for v in bag.instances[:, 0, ::7, ::7]}
    assert len(train_imgs & test_imgs) <= 2  # sklearn digits has a few exact duplicates


def test_mnist_npz_and_idx(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    labs = np.arange(30) % 10
    np.savez(tmp_path / "m.npz", images=imgs, labels=labs)
    x, y = load_digit_images(tmp_path / "m.npz")
    assert x.shape == (30, 1, 28, 28) and float(x.max()) <= 1.0 and y.tolist() == labs.tolist()
    d = tmp_path / "idx"
    d.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        im = imgs[:n] if prefix == "train" else imgs[20:]
        lb = labs[:n] if prefix == "train" else labs[20:]
        head_i = bytes([0, 0, 8, 3]) + b"".join(int(v).to_bytes(4, "big") for v in im.shape)
        head_l = bytes([0, 0, 8, 1]) + int(len(lb)).to_bytes(4, "big")
        with gzip.open(d / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(head_i + im.tobytes())
        (d / f"{prefix}-labels-idx1-ubyte").write_bytes(head_l + lb.astype(np.uint8).tobytes())
    x2, y2 = load_digit_images(d)
    assert x2.shape == (30, 1, 28, 28) and y2.tolist() == labs.tolist()


def test_mnist_wrong_shape_is_named(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((5, 8, 8), np.uint8), labels=np.zeros(5))
    with pytest.raises(ValueError, match=r"bad.npz.*\(N, 28, 28\)"):
        load_digit_images(tmp_path / "bad.npz")
    np.savez(tmp_path / "nolab.npz", images=np.zeros((5, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="'labels'"):
        load_digit_images(tmp_path / "nolab.npz")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_digit_images(tmp_path / "missing.npz")

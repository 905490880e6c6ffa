"""Synthetic tissue generator and segmentation image readers (tiny stand-ins made here)."""

import numpy as np
import pytest
import torch
from PIL import Image

from milkit.config import ConfigError, build_experiment
from milkit.data.images import SegImagesConfig
from milkit.data.seg_synthetic import SyntheticTissueConfig
from milkit.methods.seg_base import collate_seg, has_masks, seg_loader
from milkit.config import TrainerConfig


def test_synthetic_shapes_labels_and_masks():
    cfg = SyntheticTissueConfig(image_size=32, n_train=10, n_val=4, n_test=6)
    s = cfg.build(3)
    assert [len(s.train), len(s.val), len(s.test)] == [10, 4, 6]
    for b in s.train:
        assert b.instances.shape == (1, 3, 32, 32) and b.instances.dtype == torch.float32
        assert 0.0 <= float(b.instances.min()) and float(b.instances.max()) <= 1.0
        m = b.meta["mask"]
        assert m.shape == (32, 32) and m.dtype == torch.uint8
        assert bool(m.any()) == bool(b.label)  # image label = any lesion
    assert sum(b.label for b in s.train) == 5
    again = cfg.build(3)
    assert torch.equal(s.test[0].instances, again.test[0].instances)
    assert not torch.equal(s.test[0].instances, cfg.build(4).test[0].instances)


def test_synthetic_lesions_are_darker():
    s = SyntheticTissueConfig(image_size=48, n_train=8, n_val=2, n_test=2, stain_jitter=0.0).build(0)
    inside, outside = [], []
    for b in s.train:
        m = b.meta["mask"].bool()
        x = b.instances[0].mean(0)
        if m.any():
            inside.append(float(x[m].mean()))
        outside.append(float(x[~m].mean()))
    assert np.mean(inside) < np.mean(outside) - 0.05


def test_bad_synthetic_config_is_named():
    with pytest.raises(ConfigError, match="max_lesions"):
        build_experiment({"data": {"kind": "seg_synthetic", "min_lesions": 3, "max_lesions": 1},
                          "method": {"name": "segmentation_baseline", "baseline": "all_ones"}})


def test_training_loader_has_no_masks():
    s = SyntheticTissueConfig(image_size=16, n_train=4, n_val=2, n_test=2).build(0)
    cfg = TrainerConfig(batch_size=2)
    batch = next(iter(seg_loader(s.train, cfg, shuffle=True, with_masks=False)))
    assert batch.masks is None and batch.images.shape == (2, 3, 16, 16)
    assert collate_seg(list(s.val)).masks.shape == (2, 16, 16)
    assert has_masks(s.val)


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _img(rng, size=12):
    return (rng.random((size, size, 3)) * 255).astype(np.uint8)


def _mask(size=12):
    m = np.zeros((size, size), np.uint8)
    m[2:6, 2:6] = 255
    return m


def test_glas_reader(tmp_path):
    rng = np.random.default_rng(0)
    lines = ["name,patient ID,grade (GlaS),grade (Sirinukunwattana et al. 2015)"]
    for k in range(1, 11):
        grade = " malignant" if k % 2 else " benign"
        _save(tmp_path / f"train_{k}.bmp", _img(rng))
        _save(tmp_path / f"train_{k}_anno.bmp", _mask())
        lines.append(f"train_{k},1,{grade},x")
    for k in range(1, 3):
        _save(tmp_path / f"testA_{k}.bmp", _img(rng))
        _save(tmp_path / f"testA_{k}_anno.bmp", _mask())
        lines.append(f"testA_{k},1, benign,x")
    (tmp_path / "Grade.csv").write_text("\n".join(lines) + "\n")
    s = SegImagesConfig(format="glas", root=str(tmp_path), image_size=8).build(0)
    assert len(s.test) == 2 and len(s.train) + len(s.val) == 10
    assert len(s.val) == 2  # round(5 * 18/85) = 1 per grade
    b = s.train[0]
    assert b.instances.shape == (1, 3, 8, 8) and b.meta["mask"].shape == (8, 8)
    assert set(b.meta["mask"].unique().tolist()) <= {0, 1} and b.meta["mask"].any()
    assert {x.label for x in s.train} == {0, 1}


def test_glas_missing_image_is_named(tmp_path):
    (tmp_path / "Grade.csv").write_text("name,patient ID,grade (GlaS)\ntrain_1,1, benign\n")
    with pytest.raises(FileNotFoundError, match="train_1"):
        SegImagesConfig(format="glas", root=str(tmp_path)).build(0)


def test_camelyon_patch_list(tmp_path):
    rng = np.random.default_rng(1)
    rows = ["image,mask,label,split"]
    for k in range(6):
        _save(tmp_path / "img" / f"p{k}.png", _img(rng))
        if k % 2:
            _save(tmp_path / "msk" / f"p{k}.png", _mask())
        split = ["train", "train", "val", "val", "test", "test"][k]
        rows.append(f"img/p{k}.png,{'msk/p%d.png' % k if k % 2 else ''},{k % 2},{split}")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    s = SegImagesConfig(format="camelyon16_patches", root=str(tmp_path), csv="list.csv", image_size=12).build(0)
    assert [len(s.train), len(s.val), len(s.test)] == [2, 2, 2]
    neg = [b for b in s.train if b.label == 0][0]
    assert not neg.meta["mask"].any()  # a normal patch without a mask file: zeros
    pos = [b for b in s.train if b.label == 1][0]
    assert int(pos.meta["mask"].sum()) == 16
    (tmp_path / "bad.csv").write_text("image,label\nimg/p0.png,maybe\n")
    with pytest.raises(ValueError, match="bad.csv.*label"):
        SegImagesConfig(format="camelyon16_patches", root=str(tmp_path), csv="bad.csv").build(0)


def test_digestpath_and_folder(tmp_path):
    rng = np.random.default_rng(2)
    dp = tmp_path / "dp"
    for k in range(5):
        _save(dp / "tissue-train-pos-v1" / f"a{k}.jpg", _img(rng))
        _save(dp / "tissue-train-pos-v1" / f"a{k}_mask.jpg", _mask())
        _save(dp / "tissue-train-neg" / f"b{k}.jpg", _img(rng))
    s = SegImagesConfig(format="digestpath", root=str(dp), image_size=12, val_fraction=0.2, test_fraction=0.2).build(0)
    assert len(s.train) + len(s.val) + len(s.test) == 10 and len(s.test) == 2
    assert all(int(b.meta["mask"].sum()) == 16 for split in (s.train, s.val, s.test) for b in split if b.label == 1)
    fd = tmp_path / "fd"
    lines = ["image_id,label,split"]
    for k, split in enumerate(["train", "train", "val", "test"]):
        _save(fd / f"im{k}.png", _img(rng))
        if k % 2:
            _save(fd / "masks" / f"im{k}.png", _mask())
        lines.append(f"im{k},{k % 2},{split}")
    (fd / "labels.csv").write_text("\n".join(lines) + "\n")
    s = SegImagesConfig(format="folder", root=str(fd), image_size=12).build(0)
    assert [len(s.train), len(s.val), len(s.test)] == [2, 1, 1]
    assert int(s.val[0].meta["mask"].sum()) == 0 and s.val[0].label == 0
    lazy = SegImagesConfig(format="folder", root=str(fd), image_size=12, lazy=True).build(0)
    assert lazy.train.labels == s.train.labels and torch.equal(lazy.test[0].instances, s.test[0].instances)
    assert int(s.test[0].meta["mask"].sum()) == 16
    with pytest.raises(FileNotFoundError, match="nowhere"):
        SegImagesConfig(format="folder", root=str(tmp_path / "nowhere")).build(0)

"""DigestPath 1536-px crop step (IKD §4.1), at toy scale: crop labels follow the mask, crops
keep their source image's split, images are cropped before the resize."""

import numpy as np
from PIL import Image

from milkit.data.images import SegImagesConfig


def _folder(tmp_path, n_pos=3, n_neg=3, w=64, h=48):
    rng = np.random.default_rng(0)
    pos, neg = tmp_path / "tissue-train-pos-v1", tmp_path / "tissue-train-neg"
    pos.mkdir()
    neg.mkdir()
    for k in range(n_pos):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img[:16, :16] = 0  # dark tumour block in the top-left corner
        Image.fromarray(img).save(pos / f"p{k}.png")
        m = np.zeros((h, w), np.uint8)
        m[:16, :16] = 255
        Image.fromarray(m).save(pos / f"p{k}_mask.png")
    for k in range(n_neg):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(neg / f"n{k}.png")
    return tmp_path


def _all(splits):
    return [(name, splits.get(name)[i]) for name in ("train", "val", "test") for i in range(len(splits.get(name)))]


def test_crops_labels_follow_the_mask_and_split_by_source(tmp_path):
    root = _folder(tmp_path)
    cfg = SegImagesConfig(format="digestpath", root=str(root), image_size=8, crop_size=20, crops_per_image=10,
                          val_fraction=0.34, test_fraction=0.34)
    bags = _all(cfg.build(0))
    assert len(bags) == 6 * 10
    source_split: dict[str, set] = {}
    n_pos = 0
    for split, b in bags:
        assert tuple(b.instances.shape) == (1, 3, 8, 8)
        src, xy = b.bag_id.split("@")
        x, y = map(int, xy.split("_"))
        assert 0 <= x <= 64 - 20 and 0 <= y <= 48 - 20
        source_split.setdefault(src, set()).add(split)
        overlaps = x < 16 and y < 16  # the crop reaches the tumour block
        expected = int(src.startswith("tissue-train-pos") and overlaps)
        assert b.label == expected, b.bag_id
        assert int(b.meta["mask"].any()) == expected
        n_pos += b.label
    assert all(len(s) == 1 for s in source_split.values())  # no crop leaks across splits
    assert 0 < n_pos < 30  # some crops of positive images miss the tumour and are negative


def test_crop_is_taken_before_the_resize(tmp_path):
    root = _folder(tmp_path, n_pos=1, n_neg=1)
    cfg = SegImagesConfig(format="digestpath", root=str(root), image_size=16, crop_size=16, crops_per_image=5,
                          val_fraction=0.0, test_fraction=0.0)
    for _, b in _all(cfg.build(0)):
        src, xy = b.bag_id.split("@")
        x, y = map(int, xy.split("_"))
        full = np.asarray(Image.open(root / f"{src}.png").convert("RGB"), dtype=np.float32) / 255.0
        # image_size == crop_size: no resampling, the crop must be the source pixels exactly
        np.testing.assert_allclose(b.instances[0].permute(1, 2, 0).numpy(), full[y:y + 16, x:x + 16], atol=1e-6)


def test_crops_are_seeded_and_whole_images_stay_the_default(tmp_path):
    root = _folder(tmp_path)
    kw = dict(format="digestpath", root=str(root), image_size=8, val_fraction=0.0, test_fraction=0.0)
    a = [b.bag_id for _, b in _all(SegImagesConfig(**kw, crop_size=20, crops_per_image=4).build(3))]
    b = [b.bag_id for _, b in _all(SegImagesConfig(**kw, crop_size=20, crops_per_image=4).build(3))]
    assert a == b
    whole = _all(SegImagesConfig(**kw).build(0))
    assert len(whole) == 6 and all("@" not in b.bag_id for _, b in whole)

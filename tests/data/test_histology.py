"""Colon nuclei and UCSB breast bags (D2L §IV-A): layouts, patches, white filter, splits, errors.

Every dataset here is a tiny stand-in written inside the test in the published layout
(BMP + MATLAB ``detection`` arrays; ``*_ccd.tif`` names)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from milkit.config import ConfigError, build_experiment, load_experiment
from milkit.data.bag import BagDataset
from milkit.data.histology import (
    AugmentConfig,
    AugmentedHistologyBags,
    BreastUCSBConfig,
    ColonNucleiConfig,
    load_breast_image,
    load_colon_bags,
    rotate_flip,
    stain_perturb,
    fold_indices,
    white_fractions,
)
from milkit.nn.d2l_encoders import BreastEncoder, ColonEncoder, count_conv_layers, count_linear_layers

REPO = Path(__file__).resolve().parents[2]
CLASSES = ("epithelial", "inflammatory", "fibroblast", "others")


def coord_image(w: int, h: int) -> np.ndarray:
    """R = x, G = y, B = 7: every pixel tells where it is (w, h ≤ 256)."""
    img = np.zeros((h, w, 3), dtype=np.uint8)
    img[..., 0] = np.arange(w)[None, :]
    img[..., 1] = np.arange(h)[:, None]
    img[..., 2] = 7
    return img


def write_colon_image(base: Path, k: int, nuclei: dict[str, list[tuple[float, float]]], w: int = 120, h: int = 100) -> Path:
    """``base/img<k>/img<k>.bmp`` + the four class ``.mat`` files (1-based (x, y) centres)."""
    folder = base / f"img{k}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(coord_image(w, h)).save(folder / f"img{k}.bmp")
    for cls in CLASSES:
        det = np.array(nuclei.get(cls, []), dtype=np.float64).reshape(-1, 2)
        scipy.io.savemat(folder / f"img{k}_{cls}.mat", {"detection": det})
    return folder


@pytest.fixture
def colon_root(tmp_path: Path) -> Path:
    cls = tmp_path / "CRCHistoPhenotypes_2016_04_28" / "Classification"
    (tmp_path / "CRCHistoPhenotypes_2016_04_28" / "Detection").mkdir(parents=True)
    write_colon_image(cls, 1, {"epithelial": [(51, 41), (1, 1)], "fibroblast": [(120, 100)]})
    write_colon_image(cls, 2, {"inflammatory": [(30, 30), (60.4, 70.6)], "others": [(90, 20)]})
    write_colon_image(cls, 10, {"epithelial": [(20, 80)], "others": [(100, 50), (10, 10), (70, 70)]})
    return tmp_path / "CRCHistoPhenotypes_2016_04_28"


# --------------------------------------------------------------------------- colon
def test_colon_bag_and_instance_counts(colon_root: Path) -> None:
    bags = load_colon_bags(colon_root)
    assert [b.bag_id for b in bags] == ["img1", "img2", "img10"]  # numeric order
    assert [len(b) for b in bags] == [3, 3, 4]
    assert [b.label for b in bags] == [1, 0, 1]
    assert bags[0].instance_labels.tolist() == [1, 1, 0]
    assert bags[1].instance_labels.tolist() == [0, 0, 0]
    assert bags[2].instance_labels.tolist() == [1, 0, 0, 0]
    assert bags[0].instances.shape == (3, 3, 27, 27) and bags[0].instances.dtype == torch.float32
    # the Classification folder itself is accepted as root
    assert [len(b) for b in load_colon_bags(colon_root / "Classification")] == [3, 3, 4]


def test_colon_patch_centring_and_border_clamping(colon_root: Path) -> None:
    bag = load_colon_bags(colon_root)[0]
    x = (bag.instances * 255).round().long()  # R = column, G = row of the source pixel
    # (51, 41) 1-based -> pixel (50, 40): the patch centre (13, 13) is that pixel
    assert (x[0, 0, 13, 13].item(), x[0, 1, 13, 13].item()) == (50, 40)
    assert (x[0, 0, 0, 0].item(), x[0, 1, 0, 0].item()) == (37, 27)
    assert bag.coords[0].tolist() == [37, 27]
    # (1, 1) -> pixel (0, 0): window shifted inside, top-left at the image corner
    assert bag.coords[1].tolist() == [0, 0]
    assert (x[1, 0, 0, 0].item(), x[1, 1, 0, 0].item()) == (0, 0)
    # (120, 100) on a 120×100 image -> bottom-right corner; window ends at the last pixel
    assert bag.coords[2].tolist() == [120 - 27, 100 - 27]
    assert (x[2, 0, 26, 26].item(), x[2, 1, 26, 26].item()) == (119, 99)
    # sub-pixel centres are rounded: (60.4, 70.6) -> pixel (59, 70)
    b2 = load_colon_bags(colon_root)[1]
    y = (b2.instances[1] * 255).round().long()
    assert (y[0, 13, 13].item(), y[1, 13, 13].item()) == (59, 70)


def test_colon_zero_based_option(colon_root: Path) -> None:
    bags = ColonNucleiConfig(root=colon_root, one_based=False).load_bags()
    x = (bags[0].instances[0] * 255).round().long()
    assert (x[0, 13, 13].item(), x[1, 13, 13].item()) == (51, 41)


def test_colon_wrong_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_colon_bags(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty.*not a CRCHistoPhenotypes folder"):
        load_colon_bags(tmp_path / "empty")


def test_colon_mat_without_detection_is_named(colon_root: Path) -> None:
    bad = colon_root / "Classification" / "img2" / "img2_others.mat"
    scipy.io.savemat(bad, {"centres": np.ones((2, 2))})
    with pytest.raises(ValueError, match=r"img2_others\.mat: no 'detection' array \(found: centres\)"):
        load_colon_bags(colon_root)


def test_colon_missing_mat_is_named(colon_root: Path) -> None:
    (colon_root / "Classification" / "img1" / "img1_fibroblast.mat").unlink()
    with pytest.raises(FileNotFoundError, match=r"img1_fibroblast\.mat"):
        load_colon_bags(colon_root)


def test_colon_nucleus_outside_image_is_named(colon_root: Path) -> None:
    write_colon_image(colon_root / "Classification", 3, {"inflammatory": [(40, 40), (250, 30)]})
    with pytest.raises(ValueError, match=r"img3_inflammatory\.mat: 1 nucleus centre\(s\) lie outside the 120×100 image"):
        load_colon_bags(colon_root)


# --------------------------------------------------------------------------- breast
def write_ucsb(path: Path, w: int = 96, h: int = 64) -> None:
    """3×2 grid of 32-px patches; (0,0) all white, (1,0) exactly 75% white, (2,0) 23/32 rows white."""
    img = np.full((h, w, 3), (220, 150, 190), dtype=np.uint8)
    img[0:32, 0:32] = 255
    img[0:24, 32:64] = 250  # 24/32 = 75% white -> dropped
    img[0:23, 64:96] = (255, 255, 200)  # 23/32 < 75% (and B=200 is still white at threshold 200) -> kept
    Image.fromarray(img).save(path)


def test_breast_white_filter_grid_and_labels(tmp_path: Path) -> None:
    root = tmp_path / "Breast Cancer Cells"
    root.mkdir()
    write_ucsb(root / "ytma10_010704_benign1_ccd.tif")
    write_ucsb(root / "ytma12_010804_malignant1_ccd.tif")
    (root / "ytma10_010704_benign1.TIF").write_bytes(b"mask, not an image of the benchmark")  # not matched
    cfg = BreastUCSBConfig(root=root)
    bags = cfg.load_bags()
    assert [b.bag_id for b in bags] == ["ytma10_010704_benign1_ccd", "ytma12_010804_malignant1_ccd"]
    assert [b.label for b in bags] == [0, 1]
    b = bags[0]
    assert len(b) == 4 and b.instance_labels is None
    assert b.coords.tolist() == [[64, 0], [0, 32], [32, 32], [64, 32]]
    assert b.meta["n_grid"] == 6 and b.meta["n_white"] == 2
    assert b.instances.shape == (4, 3, 32, 32)
    assert torch.allclose(b.instances[1, :, 0, 0], torch.tensor([220, 150, 190]) / 255.0)


def test_white_fractions_by_hand() -> None:
    p = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    p[0, :, :3, :] = 255  # 12/16 white
    p[1, :2, :, :] = 255  # B channel 0: not white
    assert white_fractions(p, 200).tolist() == [0.75, 0.0]


def test_breast_errors_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no UCSB breast images matching"):
        BreastUCSBConfig(root=tmp_path).load_bags()
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        BreastUCSBConfig(root=tmp_path / "missing_dir").load_bags()
    bad = tmp_path / "ytma1_1_unknown1_ccd.tif"
    write_ucsb(bad)
    with pytest.raises(ValueError, match=r"ytma1_1_unknown1_ccd\.tif: file name must contain"):
        BreastUCSBConfig(root=tmp_path).load_bags()
    white = tmp_path / "w" / "ytma1_1_benign1_ccd.tif"
    white.parent.mkdir()
    Image.fromarray(np.full((64, 64, 3), 255, dtype=np.uint8)).save(white)
    with pytest.raises(ValueError, match=r"benign1_ccd\.tif: every patch"):
        load_breast_image(white)


# --------------------------------------------------------------------------- splits
@pytest.mark.parametrize("n,n_pos", [(100, 40), (58, 26)])
def test_fold_split_sizes_disjoint_and_stratified(n: int, n_pos: int) -> None:
    y = np.array([1] * n_pos + [0] * (n - n_pos))
    tests = []
    for fold in range(5):
        tr, va, te = fold_indices(y, fold, 5, 0.1, seed=3)
        assert len(set(tr) | set(va) | set(te)) == n == len(tr) + len(va) + len(te)
        assert len(te) in (n // 5, n // 5 + 1) and abs(len(va) - 0.1 * n) <= 1.0
        assert abs(y[te].mean() - n_pos / n) <= 1.0 / len(te) + 1e-9  # stratified
        assert abs(y[va].sum() - len(va) * n_pos / n) <= 1.0
        if n == 100:
            assert (len(tr), len(va), len(te)) == (70, 10, 20)
        tests.append(set(te.tolist()))
    assert set().union(*tests) == set(range(n))
    assert sum(len(t) for t in tests) == n  # test parts disjoint across folds
    a = fold_indices(y, 1, seed=3)
    assert all(np.array_equal(u, v) for u, v in zip(a, fold_indices(y, 1, seed=3)))
    assert not np.array_equal(a[2], fold_indices(y, 1, seed=4)[2])
    with pytest.raises(ValueError, match="fold 5 does not exist"):
        fold_indices(y, 5)


def test_small_validation_holds_both_classes() -> None:
    y = np.array([1] * 10 + [0] * 10)
    for fold in range(5):
        tr, va, te = fold_indices(y, fold, 5, 0.1, seed=2)
        assert sorted(y[va].tolist()) == [0, 1] and sorted(y[te].tolist()) == [0, 0, 1, 1]


def test_config_splits_across_folds(colon_root: Path) -> None:
    for k in range(4, 11):
        write_colon_image(colon_root / "Classification", 10 + k, {"epithelial": [(50, 50)]} if k % 2 else {"others": [(50, 50)]})
    ids = []
    for fold in range(5):
        s = ColonNucleiConfig(root=colon_root, fold=fold).build(seed=0)
        parts = [{b.bag_id for b in s.get(p)} for p in ("train", "val", "test")]
        assert sum(map(len, parts)) == 10 and len(set().union(*parts)) == 10
        assert len(parts[2]) == 2 and 1 <= len(parts[1]) <= 2
        ids.append(parts[2])
        assert type(s.train) is BagDataset  # augmentation off by default
    assert len(set().union(*ids)) == 10


def test_too_few_bags_is_named(colon_root: Path) -> None:
    with pytest.raises(ValueError, match="CRCHistoPhenotypes_2016_04_28: cannot split 3 bags into 5 folds"):
        ColonNucleiConfig(root=colon_root).build(seed=0)


def test_fold_must_exist() -> None:
    raw = {"data": {"kind": "colon_nuclei", "root": "x", "fold": 5}, "method": {"name": "distill_to_label"}}
    with pytest.raises(ConfigError, match="fold 5 does not exist"):
        build_experiment(raw)


# --------------------------------------------------------------------------- augmentation
def test_rotate_flip_permutes_pixels_only() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 5, 5)
    y = rotate_flip(x, True, True, g)
    assert not torch.equal(x, y)
    for i in range(16):  # each patch is one of the 8 dihedral images of itself
        cands = [torch.rot90(x[i], k, (-2, -1)) for k in range(4)]
        cands += [torch.flip(c, (-1,)) for c in cands]
        assert any(torch.equal(y[i], c) for c in cands)


def test_stain_perturbation() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 6, 6) * 0.9 + 0.05
    assert torch.equal(stain_perturb(x, 0.0, g), x)
    y = stain_perturb(x, 0.1, g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert 0 < (y - x).abs().mean() < 0.2
    # α = 1, β = 0 round-trips through HED space
    z = stain_perturb(x, 1e-12, torch.Generator().manual_seed(0))
    assert torch.allclose(z, x, atol=1e-5)


def test_augmented_train_bags_deterministic(colon_root: Path) -> None:
    bags = load_colon_bags(colon_root)
    cfg = AugmentConfig(enabled=True, jitter=3)
    a = AugmentedHistologyBags(bags, cfg, 27, seed=1)
    b = AugmentedHistologyBags(bags, cfg, 27, seed=1)
    for i in range(len(bags)):
        ba, bb = a[i], b[i]
        assert torch.equal(ba.instances, bb.instances) and ba.instances.shape == bags[i].instances.shape
        assert torch.equal(ba.instance_labels, bags[i].instance_labels)
        assert (ba.coords - bags[i].coords).abs().max() <= 3
    off = AugmentedHistologyBags(bags, AugmentConfig(enabled=True, rot90=False, flips=False, jitter=0, stain_sigma=0), 27, 0)
    assert torch.equal(off[0].instances, bags[0].instances)
    s = ColonNucleiConfig(root=colon_root, n_folds=2, augment={"enabled": True}).build(seed=0)
    assert isinstance(s.train, AugmentedHistologyBags) and type(s.test) is BagDataset


# --------------------------------------------------------------------------- encoders, configs
@pytest.mark.parametrize("cls,size,n_conv", [(ColonEncoder, 27, 2), (BreastEncoder, 32, 5)])
def test_d2l_encoders(cls, size: int, n_conv: int) -> None:
    enc = cls(in_channels=3, image_size=size, out_dim=64)
    assert enc(torch.rand(5, 3, size, size)).shape == (5, 64) and enc.out_dim == 64
    assert count_conv_layers(enc) == n_conv and count_linear_layers(enc) == 3
    with pytest.raises(ValueError, match=f"expects \\(N, 3, {size}, {size}\\)"):
        enc(torch.rand(2, 3, size + 1, size + 1))


def test_build_encoder_names_map_to_d2l() -> None:
    from milkit.nn.encoders import EncoderConfig, build_encoder

    enc, dim = build_encoder(EncoderConfig(name="d2l_breast", in_channels=3, image_size=32))
    assert isinstance(enc, BreastEncoder) and dim == 512


def test_paper_configs_validate() -> None:
    colon = load_experiment(REPO / "configs/distill_to_label/colon.yaml")
    breast = load_experiment(REPO / "configs/distill_to_label/breast.yaml")
    assert colon.data.kind == "colon_nuclei" and breast.data.kind == "breast_ucsb"
    for exp in (colon, breast):
        t = exp.trainer
        assert (t.optimizer, t.lr, t.batch_size) == ("adam", 1e-4, 1)
        s = exp.method.student
        assert (s.gamma_c, s.gamma_b, s.gamma_i, s.gamma_e) == (0.3, 0.5, 0.5, 0.1)
        assert exp.data.n_folds == 5 and exp.data.val_fraction == 0.1 and not exp.data.augment.enabled
    tc, tb = colon.method.teacher, breast.method.teacher
    assert (tc.lambda_c, tc.lambda_n, tc.lambda_delta, tc.lambda_e, tc.subbag_realisations) == (1.0, 0.5, 0.3, 0.3, 1)
    assert (tb.lambda_c, tb.lambda_n, tb.lambda_delta, tb.lambda_e, tb.subbag_realisations) == (0.8, 0.8, 0.3, 0.3, 5)
    assert (colon.method.encoder.name, colon.data.patch_size) == ("d2l_colon", 27)
    assert (breast.method.encoder.name, breast.data.patch_size, breast.data.white_fraction) == ("d2l_breast", 32, 0.75)

"""Feature extraction: encoders, resumability, atomic writes, sharding across ranks."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest
import torch

from milkit.slide import extract as ex


def test_shard_assignment_covers_every_slide_once_and_balances():
    sizes = [100, 5, 40, 40, 30, 10, 1, 70]
    ranks = ex.shard_assignment(sizes, 3)
    assert len(ranks) == len(sizes) and set(ranks) <= {0, 1, 2}
    loads = [sum(s for s, r in zip(sizes, ranks) if r == k) for k in range(3)]
    assert max(loads) - min(loads) <= max(sizes)  # greedy longest-first bound
    assert ranks == ex.shard_assignment(sizes, 3)  # every rank computes the same plan
    assert ex.shard_assignment(sizes, 1) == [0] * len(sizes)
    assert ranks[0] == 0  # the largest slide goes to rank 0
    with pytest.raises(ValueError):
        ex.shard_assignment(sizes, 0)


def test_dist_env_torchrun_slurm_and_plain():
    assert ex.dist_env({}) == (0, 1, 0)
    assert ex.dist_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    assert ex.dist_env({"SLURM_PROCID": "2", "SLURM_NTASKS": "3", "SLURM_LOCALID": "0"}) == (2, 3, 0)
    with pytest.raises(ValueError, match="RANK=4"):
        ex.dist_env({"RANK": "4", "WORLD_SIZE": "4"})


def test_encoders_dims_and_names(tmp_path):
    enc = ex.build_patch_encoder("tiny_cnn", "none")
    assert enc.dim == 32 and enc.name == "tiny_cnn:none" and enc.input_size is None
    r18 = ex.build_patch_encoder("resnet18", "none")
    assert r18.dim == 512 and r18.input_size == 224
    # weights from a local file (weights_only load), recorded by name and hash
    p = tmp_path / "tiny.pt"
    torch.save(enc.model.state_dict(), p)
    again = ex.build_patch_encoder("tiny_cnn", str(p), seed=5)
    assert again.name.startswith("tiny_cnn:tiny.pt@")
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(again.model(x), enc.model(x))
    with pytest.raises(ValueError, match="unknown encoder"):
        ex.build_patch_encoder("vgg99", "none")
    with pytest.raises(FileNotFoundError, match="nothere.pt"):
        ex.build_patch_encoder("tiny_cnn", str(tmp_path / "nothere.pt"))


def test_resnet50_truncated_after_layer3():
    enc = ex.build_patch_encoder("resnet50", "none")
    assert enc.dim == 1024 and enc.name == "resnet50_trunc:none"


def test_extract_skips_finished_and_writes_atomically(cohort, tmp_path, monkeypatch):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for n in ("s01.h5", "s02.h5"):
        shutil.copy(cohort.tiles_dir / n, tiles / n)
    # resumable: same encoder → skipped
    r = ex.extract_dir(tiles, "tiny_cnn", "none", num_workers=0, progress=False)
    assert r["written"] == [] and len(r["skipped"]) == 2
    # an interrupted run leaves the original file intact and no temp files behind
    with h5py.File(tiles / "s01.h5", "a") as f:
        del f["features"]
    before = (tiles / "s01.h5").read_bytes()

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ex, "encode_patches", boom)
    with pytest.raises(KeyboardInterrupt):
        ex.extract_dir(tiles, "tiny_cnn", "none", num_workers=0, progress=False)
    assert (tiles / "s01.h5").read_bytes() == before
    assert sorted(p.name for p in tiles.iterdir()) == ["s01.h5", "s02.h5"]
    monkeypatch.undo()
    # a different output folder, sharded as rank 1 of 2: only that rank's slide is written
    out = tmp_path / "feats"
    r = ex.extract_dir(tiles, "tiny_cnn", "none", out_dir=out, num_workers=0, progress=False,
                       environ={"RANK": "1", "WORLD_SIZE": "2"})
    sizes = []
    for n in ("s01.h5", "s02.h5"):
        with h5py.File(tiles / n) as f:
            sizes.append(f["coords"].shape[0])
    expect = [n for n, rk in zip(("s01.h5", "s02.h5"), ex.shard_assignment(sizes, 2)) if rk == 1]
    assert sorted(p.name for p in out.glob("*.h5")) == expect
    with h5py.File(out / expect[0]) as f, h5py.File(cohort.tiles_dir / expect[0]) as g:
        np.testing.assert_allclose(f["features"][()], g["features"][()], rtol=1e-5, atol=1e-6)
        assert f["features"].attrs["encoder"] == "tiny_cnn:none"
        np.testing.assert_array_equal(f["coords"][()], g["coords"][()])


def test_extract_named_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nofolder"):
        ex.extract_dir(tmp_path / "nofolder", "tiny_cnn", "none")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no .h5 patch files"):
        ex.extract_dir(empty, "tiny_cnn", "none")
    with h5py.File(empty / "x.h5", "w") as f:
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64))
    with pytest.raises(ValueError, match=r"x\.h5: 'coords' has no patch_size"):
        ex.extract_dir(empty, "tiny_cnn", "none")
    with h5py.File(empty / "x.h5", "a") as f:
        f["coords"].attrs["patch_size"] = 32
        f["coords"].attrs["patch_size_level0"] = 64
        f["coords"].attrs["slide_path"] = str(tmp_path / "gone.tif")
    with pytest.raises(FileNotFoundError, match="cannot find the slide 'x'"):
        ex.extract_dir(empty, "tiny_cnn", "none", num_workers=0, progress=False)
    assert sorted(p.name for p in empty.iterdir()) == ["x.h5"]

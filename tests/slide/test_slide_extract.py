"""Feature extraction: encoders, resumability, atomic writes, sharding across ranks."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

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
    with pytest.raises(ex.ExtractionFailed, match=r"failed\.csv: 1 of 1 .*x\.h5: 'coords' has no patch_size"):
        ex.extract_dir(empty, "tiny_cnn", "none", progress=False)
    with h5py.File(empty / "x.h5", "a") as f:
        f["coords"].attrs["patch_size"] = 32
        f["coords"].attrs["patch_size_level0"] = 64
        f["coords"].attrs["slide_path"] = str(tmp_path / "gone.tif")
    with pytest.raises(ex.ExtractionFailed, match="cannot find the slide 'x'"):
        ex.extract_dir(empty, "tiny_cnn", "none", num_workers=0, progress=False)
    assert sorted(p.name for p in empty.iterdir()) == ["failed.csv", "x.h5"]


def _features(path):
    with h5py.File(path) as f:
        return f["features"][()] if "features" in f else None


def _cohort_copy(cohort, tmp_path, names=("s01", "s02", "s03")):
    """Tiles (without features) and slides of a few cohort slides, in their own folders."""
    tiles, slides = tmp_path / "tiles", tmp_path / "slides"
    tiles.mkdir()
    slides.mkdir()
    for n in names:
        shutil.copy(cohort.tiles_dir / f"{n}.h5", tiles / f"{n}.h5")
        with h5py.File(tiles / f"{n}.h5", "a") as f:
            del f["features"]
        shutil.copy(cohort.slides_dir / f"{n}.tif", slides / f"{n}.tif")
    return tiles, slides


def test_batched_reads_equal_one_read_per_patch(cohort):
    """One region read per row run gives exactly the pixels of one read per patch:
    level-0 and level-1 reads, adjacent, overlapping, gapped and off-grid patches."""
    slide = cohort.slides_dir / "s02.tif"
    coords = np.array([[0, 0], [64, 0], [128, 0], [160, 0], [321, 0], [448, 0],  # adjacent, overlap, off-grid, gap
                       [0, 64], [64, 64], [5, 130], [900, 900], [1000, 1000]], np.int64)  # last: past the edge
    rng = np.random.default_rng(0)
    idx = rng.permutation(len(coords))  # batch order differs from grid order
    for size0, patch, inp in ((64, 32, None), (64, 64, None), (64, 32, 40)):
        ds = ex.PatchDataset(slide, coords, size0, patch, inp)
        batch = ds.read_batch(idx)
        for j, i in enumerate(idx):
            np.testing.assert_array_equal(batch[j], ds[int(i)].permute(1, 2, 0).numpy())


def test_unreadable_slide_is_recorded_and_the_rest_go_on(cohort, tmp_path, capsys):
    tiles, slides = _cohort_copy(cohort, tmp_path)
    good = (slides / "s02.tif").read_bytes()
    (slides / "s02.tif").write_bytes(good[: len(good) // 3])  # truncated: unreadable
    out = tmp_path / "feats"
    with pytest.raises(ex.ExtractionFailed) as e:  # in a DataLoader worker, as a real run
        ex.extract_dir(tiles, "tiny_cnn", "none", out_dir=out, slides_dir=slides, num_workers=1, progress=False)
    assert "failed.csv: 1 of 3 slide(s)" in str(e.value) and "\n" not in str(e.value)
    rows = (out / "failed.csv").read_text().splitlines()
    assert rows[0] == "slide,reason" and len(rows) == 2 and rows[1].startswith("s02,")
    assert "s02.tif" in rows[1]  # the reason names the slide file
    assert sorted(p.name for p in out.iterdir()) == ["failed.csv", "s01.h5", "s03.h5"]
    for n in ("s01", "s03"):  # the others are complete and equal the reference features
        np.testing.assert_allclose(_features(out / f"{n}.h5"), _features(cohort.tiles_dir / f"{n}.h5"),
                                   rtol=1e-5, atol=1e-6)
    assert e.value.summary["failed"][0]["slide"] == "s02" and len(e.value.summary["written"]) == 2
    # the command line: one line naming failed.csv, exit status 2, no traceback
    from milkit.cli import main

    rc = main(["extract", str(tiles), "--encoder", "tiny_cnn", "--weights", "none", "--out", str(out),
               "--slides", str(slides), "--workers", "0", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "failed.csv" in err and "Traceback" not in err
    # fixed slide: the rerun writes it, skips the others and drops the stale failed.csv
    (slides / "s02.tif").write_bytes(good)
    r = ex.extract_dir(tiles, "tiny_cnn", "none", out_dir=out, slides_dir=slides, num_workers=0, progress=False)
    assert [Path(p).name for p in r["written"]] == ["s02.h5"] and len(r["skipped"]) == 2
    assert not (out / "failed.csv").exists()


def test_stale_temp_files_removed_and_file_mode_kept(cohort, tmp_path):
    tiles, slides = _cohort_copy(cohort, tmp_path, ("s01", "s02"))
    ranks = ex.shard_assignment([len(ex.read_patch_file(tiles / f"{n}.h5").coords) for n in ("s01", "s02")], 2)
    mine, other = ("s01", "s02") if ranks[0] == 0 else ("s02", "s01")
    stale = tiles / f".{mine}.h5.k2j_x9q1.tmp"  # what io.atomic_path names a temp file
    foreign = tiles / f".{other}.h5.a8b7c6d5.tmp"  # another rank's slide: never touched
    user = [tiles / ".notes.tmp", tiles / f".{mine}.h5.tmp", tiles / f"{mine}.h5.k2j_x9q1.tmp"]
    for q in [stale, foreign, *user]:
        q.write_bytes(b"partial")
    os.chmod(tiles / f"{mine}.h5", 0o640)
    ex.extract_dir(tiles, "tiny_cnn", "none", num_workers=0, progress=False, environ={"RANK": "0", "WORLD_SIZE": "2"})
    assert not stale.exists() and foreign.exists() and all(q.exists() for q in user)
    assert _features(tiles / f"{mine}.h5") is not None
    assert stat.S_IMODE((tiles / f"{mine}.h5").stat().st_mode) == 0o640  # in place: the h5's mode is kept
    old = os.umask(0o027)
    try:  # a new file in another folder follows the umask
        out = tmp_path / "feats"
        ex.extract_dir(tiles, "tiny_cnn", "none", out_dir=out, num_workers=0, progress=False)
    finally:
        os.umask(old)
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.glob("*.h5")} == {0o640}


_RANK_SCRIPT = """
import json, sys
from milkit.slide.extract import extract_dir
r = extract_dir(sys.argv[1], "tiny_cnn", "none", out_dir=sys.argv[2], num_workers=0, progress=False)
print(json.dumps(r))
"""


def test_two_ranks_write_each_slide_once(cohort, tmp_path):
    """torchrun-style sharding: two concurrent processes with RANK/WORLD_SIZE."""
    names = ("s01", "s02", "s03", "s04", "s05")
    tiles, _ = _cohort_copy(cohort, tmp_path, names)
    out = tmp_path / "feats"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(tiles), str(out)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in (0, 1)]
    summaries = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, stderr[-2000:]
        summaries.append(json.loads(stdout.strip().splitlines()[-1]))
    assert [s["rank"] for s in summaries] == [0, 1] and all(s["world_size"] == 2 for s in summaries)
    written = [Path(p).name for s in summaries for p in s["written"]]
    assert sorted(written) == [f"{n}.h5" for n in names]  # every slide once, by one rank
    assert all(s["written"] for s in summaries)  # both ranks did work
    assert sorted(p.name for p in out.iterdir()) == sorted(written)  # no temp files, no failed.csv
    for n in names:
        np.testing.assert_allclose(_features(out / f"{n}.h5"), _features(cohort.tiles_dir / f"{n}.h5"),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("encoder, workers", [("tiny_cnn", 1), ("resnet18", 0)])
def test_batched_channels_last_features_equal_the_plain_loop(cohort, encoder, workers, monkeypatch):
    """encode_patches (batched region reads, workers, channels_last, inference_mode, CPU forward
    in chunks) gives the features of the one-patch-at-a-time contiguous no_grad loop (issue 15:
    outputs unchanged)."""
    from milkit.benchmarks.extract import _plain_extract

    monkeypatch.setattr(ex, "CPU_CHUNK_PER_THREAD", 2)  # batches of 3 → forward chunks of 2 + 1
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)

    slide = cohort.slides_dir / "s02.tif"
    coords = np.array([[0, 0], [64, 0], [128, 0], [0, 64], [64, 64], [300, 200], [900, 900]], np.int64)
    enc = ex.build_patch_encoder(encoder, "none")
    if enc.input_size is not None:  # ResNet-18 pools globally: 64 px runs the same layers, 12× cheaper
        enc = dataclasses.replace(enc, input_size=64)
    ds = ex.PatchDataset(slide, coords, 64, 64, enc.input_size)
    got = ex.encode_patches(enc, ds, torch.device("cpu"), batch_size=3, num_workers=workers)
    ref = _plain_extract(slide, coords, 64, 64, enc, torch.device("cpu"))
    assert got.shape == (len(coords), enc.dim) and got.dtype == np.float32
    assert np.abs(ref).max() > 1e-3  # features that are not all zero
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_features_of_another_encoder_are_refused_unless_overwrite(cohort, tmp_path):
    tiles = tmp_path / "tiles"
    tiles.mkdir()
    for n in ("s01.h5", "s02.h5"):
        shutil.copy(cohort.tiles_dir / n, tiles / n)
    with h5py.File(tiles / "s02.h5", "a") as f:
        f["features"].attrs["encoder"] = "uni:hub"  # hours of foundation-model features
    before = {n: (tiles / n).read_bytes() for n in ("s01.h5", "s02.h5")}
    with pytest.raises(ValueError, match=r"s02\.h5: holds features of encoder 'uni:hub' \(1 file\(s\)\); extracting "
                                         r"'tiny_cnn:none' would replace them: pass --overwrite, or --out DIR"):
        ex.extract_dir(tiles, "tiny_cnn", "none", num_workers=0, progress=False)
    assert {n: (tiles / n).read_bytes() for n in before} == before  # nothing written, not even s01's
    for rank in ("0", "1"):  # under torchrun every rank refuses, whichever shard holds the file
        with pytest.raises(ValueError, match=r"s02\.h5: holds features of encoder 'uni:hub'"):
            ex.extract_dir(tiles, "tiny_cnn", "none", num_workers=0, progress=False,
                           environ={"RANK": rank, "WORLD_SIZE": "2"})
    r = ex.extract_dir(tiles, "tiny_cnn", "none", out_dir=tmp_path / "both", num_workers=0, progress=False)
    assert len(r["written"]) == 2  # --out keeps both
    r = ex.extract_dir(tiles, "tiny_cnn", "none", num_workers=0, progress=False, overwrite=True)
    assert [p.name for p in map(Path, r["written"])] == ["s02.h5"] and len(r["skipped"]) == 1
    assert ex.features_encoder(tiles / "s02.h5") == "tiny_cnn:none"
    with h5py.File(tiles / "s02.h5", "a") as f:  # features CLAM or TRIDENT wrote: no encoder recorded
        del f["features"].attrs["encoder"]
    with pytest.raises(ValueError, match=r"s02\.h5: holds features of encoder 'unrecorded'"):
        ex.extract_dir(tiles, "tiny_cnn", "none", num_workers=0, progress=False)


def test_offline_imagenet_weights_are_one_line_saying_what_to_pass(monkeypatch, tmp_path):
    """Without internet, torchvision's own download raised a bare ``<urlopen error …>``, naming neither the
    option, the file nor what to do. Its weights are now fetched through one path (checked hash, weights-only)."""
    import urllib.error

    import torchvision

    from milkit.slide.extract import build_patch_encoder

    def offline(url, **kw):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    for name, arch in (("resnet18", "resnet18"), ("resnet50_trunc", "resnet50")):
        with pytest.raises(OSError) as err:
            build_patch_encoder(name, "imagenet")
        msg = str(err.value)
        assert "\n" not in msg and "--weights imagenet" in msg and "--weights PATH" in msg
        assert torchvision.models.get_model_weights(arch).IMAGENET1K_V1.url in msg and "checkpoints" in msg
    ref = torchvision.models.resnet18(weights=None).state_dict()
    seen = {}

    def cached(url, **kw):
        seen.update(url=url, **kw)
        return ref

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", cached)
    enc = build_patch_encoder("resnet18", "imagenet")
    assert seen["weights_only"] and seen["check_hash"]
    assert torch.equal(enc.model.conv1.weight, ref["conv1.weight"]) and enc.name == "resnet18:imagenet"


def test_a_timm_encoder_that_cannot_be_created_is_one_line(monkeypatch):
    import types

    from milkit.slide.extract import build_patch_encoder

    def create_model(name, **kw):
        raise RuntimeError(f"Unknown model ({name})\nsecond line")

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    with pytest.raises(ValueError) as err:
        build_patch_encoder("timm:vit_nope", "imagenet")
    msg = str(err.value)
    assert "\n" not in msg and "'timm:vit_nope'" in msg and "Unknown model (vit_nope) second line" in msg


def test_extract_finds_a_moved_slide_in_gdc_folders(tmp_path):
    """``--slides DIR`` in GDC's layout (``<uuid>/<slide>.svs``) is searched like ``milkit tile`` searches it."""
    (tmp_path / "gdc" / "0a1b").mkdir(parents=True)
    slide = tmp_path / "gdc" / "0a1b" / "TCGA-A1.svs"
    slide.write_bytes(b"x")
    pf = ex.PatchFile(tmp_path / "tiles" / "TCGA-A1.h5", np.zeros((1, 2), np.int64), 256, 256, None,
                      tmp_path / "gone" / "TCGA-A1.svs", None)
    assert ex.find_slide(pf, tmp_path / "gdc") == slide
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="cannot find the slide 'TCGA-A1'.*--slides DIR"):
        ex.find_slide(pf, tmp_path / "empty")

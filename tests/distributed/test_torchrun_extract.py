"""``torchrun --nproc_per_node 2 -m milkit.cli extract``: the slides are sharded, each is
written once, by one rank, with the features one process writes (slide/extract.py)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from ddp_helpers import env_for, read_trace, run  # noqa: E402

NAMES = ("s0", "s1", "s2")


def _torchrun() -> list[str]:
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "torch.distributed.run"]


def _features(path: Path) -> np.ndarray:
    with h5py.File(path, "r") as f:
        return f["features"][:]


def test_torchrun_extract_writes_every_slide_once(tmp_path) -> None:
    from milkit.slide.extract import extract_dir
    from milkit.slide.synthetic import make_slide
    from milkit.slide.tiling import TilingConfig, tile_slides

    slides = [make_slide(tmp_path / "slides", n, positive=i == 0, seed=i, size=(512, 512 + 128 * i), mpp=0.25).path
              for i, n in enumerate(NAMES)]
    tiles = tmp_path / "tiles"
    tile_slides(slides, tiles, TilingConfig(patch_size=32, target_mpp=0.5, tissue={"thumbnail_size": 128}),
                progress=False)
    ref = tmp_path / "ref"
    shutil.copytree(tiles, ref)
    extract_dir(ref, "tiny_cnn", "none", num_workers=0, progress=False)  # one process, in place
    out = tmp_path / "feats"
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "milkit.cli", "extract", str(tiles),
           "--encoder", "tiny_cnn", "--weights", "none", "--out", str(out), "--workers", "0", "--no-progress",
           "--devices", "cpu", "--batch-size", "64"]
    proc = run(cmd, env_for(out, tmp_path / "trace"), timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("rank ")]
    assert sorted(ln.split(":")[0].split(" on ")[0] for ln in lines) == ["rank 0/2", "rank 1/2"], proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [f"{n}.h5" for n in NAMES]  # no temp file, no failed csv
    # who put each file in place: exactly one rename per slide, both ranks did work
    renames = [(e[0], Path(e[2]).name) for p in read_trace(tmp_path / "trace").values() for e in p["events"]
               if e[1] == "os.rename" and Path(e[2]).parent == out]
    assert sorted(name for _, name in renames) == [f"{n}.h5" for n in NAMES]
    assert {rank for rank, _ in renames} == {"0", "1"}
    for n in NAMES:
        np.testing.assert_allclose(_features(out / f"{n}.h5"), _features(ref / f"{n}.h5"), rtol=1e-5, atol=1e-6)

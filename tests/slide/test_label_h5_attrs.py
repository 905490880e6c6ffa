"""Label h5 files leave an unknown value out instead of writing the string 'None' (issue 13)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from milkit.slide.outputs import SlideScores, read_instances_h5, write_instances_h5


@pytest.mark.parametrize("mpp", [None, 0.25])
def test_unknown_mpp_is_left_out_and_reads_back(tmp_path, mpp):
    s = SlideScores(slide_id="s", coords=np.array([[0, 0], [64, 0]]), scores=np.array([0.1, 0.9]),
                    labels=np.array([0, 1]), threshold=0.5, score_kind="probability", size_level0=64,
                    stride_level0=64, level0_size=(128, 64), mpp=mpp, bag_prob=0.9)
    p = tmp_path / "instances.h5"
    write_instances_h5(p, s)
    with h5py.File(p) as f:
        attrs = {k: v for obj in (f, *f.values()) for k, v in obj.attrs.items()}
    assert "None" not in {v.decode() if isinstance(v, bytes) else v for v in attrs.values() if isinstance(v, (str, bytes))}
    assert ("mpp" in attrs) == (mpp is not None)
    assert read_instances_h5(p).mpp == mpp

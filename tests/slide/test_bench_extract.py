"""``milkit benchmark extract``'s tiling rows: timed on their own slide when ``--tiling-size`` is
given, one time per round, and the kept set agreeing with the plain per-patch loop."""

from __future__ import annotations

from milkit.benchmarks.extract import markdown, run_benchmark


def test_tiling_on_its_own_slide(tmp_path):
    res = run_benchmark(256, 64, ["tiny_cnn"], "none", 0, 8, "cpu", 4, 2, tmp_path, tiling_size=384)
    tl = res["tiling"]
    assert tl["slide"] == "384x384 px" and res["grid_patches"] == (384 // 64) ** 2
    assert len(tl["milkit_s_rounds"]) == 2 and min(tl["milkit_s_rounds"]) <= tl["milkit_s"] <= max(tl["milkit_s_rounds"])
    assert tl["kept_jaccard_vs_plain"] >= 0.9  # the thumbnail mask and per-patch thresholds agree
    assert res["extracted_patches"] == 4  # from the extraction slide (256², 16 positions), not the tiling one
    assert "| 384x384 px | 36 |" in markdown(res)

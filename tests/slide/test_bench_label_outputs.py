"""``milkit benchmark label-outputs``: the synthetic slide and the CLI's result file."""

from __future__ import annotations

import json

import numpy as np

from milkit.benchmarks.label_outputs import synthetic_slide
from milkit.cli import main


def test_synthetic_slide_has_tissue_lesions_and_level0_geometry():
    s = synthetic_slide(16384, 8192, 256, 0.25, seed=0)
    assert len(s.coords) == 32 * 16 and s.coords.max(0).tolist() < [16384, 8192]  # half of each side: 1/4 tissue
    assert np.all(s.coords % 256 == 0) and 0 < s.labels.sum() < len(s.labels)
    assert np.array_equal(s.labels, (s.probability >= 0.5).astype(int))


def test_cli_writes_the_table_and_a_refused_option_is_one_line(tmp_path, capsys):
    assert main(["benchmark", "label-outputs", "--width", "8192", "--height", "4096", "--rounds", "1",
                 "--out", str(tmp_path)]) in (0, None)
    res = json.loads((tmp_path / "label_outputs.json").read_text())
    assert res["n_patches"] > 0 and res["probability_tif_s"] > 0 and res["sizes_mib"]["probability.tif"] > 0
    assert main(["benchmark", "label-outputs", "--tissue", "2", "--out", str(tmp_path / "x")]) == 2
    assert "--tissue" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_label_files_names_every_file_write_slide_outputs_writes(tmp_path):
    from milkit.slide.outputs import LABEL_FILES, write_slide_outputs

    s = synthetic_slide(4096, 4096, 256, 0.5, seed=1)
    paths = write_slide_outputs(tmp_path, s, np.full((64, 64, 3), 240, np.uint8), 64.0)
    assert sorted(p.name for p in paths) == sorted(LABEL_FILES) == sorted(p.name for p in (tmp_path / "bench").iterdir())

"""Every IKD / segmentation benchmark config of this area validates; the benchmark table runs."""

from pathlib import Path

import pytest
from rich.console import Console

from milkit.benchmarks import segmentation as bench
from milkit.config import load_experiment

ROOT = Path(__file__).resolve().parents[2] / "configs"
MINE = sorted((ROOT / "ikd").glob("*.yaml")) + [ROOT / "segmentation_benchmark" / f"{n}.yaml"
                                                 for n in ("ikd", "ikd_mask", "unet", "all_ones")]


@pytest.mark.parametrize("path", MINE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_config_validates(path):
    exp = load_experiment(path)
    assert exp.method.name in ("ikd", "segmentation_baseline")


def test_ikd_paper_defaults():
    m = load_experiment(ROOT / "ikd" / "camelyon16.yaml")
    assert (m.method.a, m.method.check_every, m.method.blur_sigma, m.method.backbone) == (0.25, 30, 3.0, "vgg16")
    assert (m.trainer.lr, m.trainer.weight_decay, m.trainer.batch_size) == (5e-5, 5e-4, 16)


def test_benchmark_table_on_all_ones(tmp_path):
    data = {"synthetic": {**bench.SYNTHETIC, "image_size": 16, "n_train": 4, "n_val": 4, "n_test": 4}}
    res = bench.run(tmp_path, [ROOT / "segmentation_benchmark" / "all_ones.yaml"], [0, 1], data, [],
                    Console(file=open(tmp_path / "log.txt", "w")))
    row = res["synthetic"]["all_ones:all_ones"]
    assert row["f1_neg"] == [0.0, 0.0]
    md = (tmp_path / "segmentation.md").read_text()
    assert "all_ones:all_ones" in md and "F1−" in md


def test_benchmark_first_seed_runs_only_the_named_seeds(tmp_path, capsys):
    """`--first-seed 1 --seeds 1` trains seed 1 only (completing an interrupted seed); bad values exit 2."""
    from milkit.cli import main

    out = tmp_path / "seg"
    assert main(["benchmark", "segmentation", "--out", str(out), "--only", "all_ones", "--seeds", "1",
                 "--first-seed", "1", "--image-size", "16"]) == 0
    runs = out / "runs" / "synthetic" / "all_ones"
    assert sorted(p.name for p in runs.iterdir()) == ["seed1"]
    assert "Seeds: 1;" in (out / "segmentation.md").read_text()
    capsys.readouterr()
    assert main(["benchmark", "segmentation", "--out", str(out), "--only", "all_ones", "--first-seed", "-1"]) == 2
    assert "--first-seed" in capsys.readouterr().err

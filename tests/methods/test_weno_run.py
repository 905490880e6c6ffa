"""Short end-to-end run: WENO's student scores instances better than plain ABMIL's attention."""

from __future__ import annotations

import pytest

from milkit.config import build_experiment
from milkit.workflow import evaluate_run, label_run, train_run

DATA = {
    "kind": "positive_ratio_bags",
    "source": "digits",
    "positive_ratio": 0.5,  # many positives per bag: where attention alone localises poorly (Table 1)
    "bag_size": 20,
    "n_train_bags": 30,
    "n_val_bags": 20,
    "n_test_bags": 30,
    "image_size": 16,
}
ENCODER = {"name": "lenet5", "image_size": 16, "out_dim": 128}
TRAINER = {"max_epochs": 12, "optimizer": "adam", "lr": 5e-4, "progress_bar": False, "monitor": "val/auroc_minus_bce"}


@pytest.mark.slow
def test_weno_student_beats_abmil_attention(tmp_path) -> None:
    abmil = build_experiment(
        {"seed": 0, "data": DATA, "method": {"name": "mil", "encoder": ENCODER}, "trainer": TRAINER}
    )
    weno = build_experiment(
        {
            "seed": 0,
            "data": DATA,
            "method": {"name": "weno", "encoder": ENCODER, "hpm_warmup_epochs": 8, "student_batch_size": 32},
            "trainer": TRAINER,
        }
    )
    m_abmil = train_run(abmil, tmp_path / "abmil")
    m_weno = train_run(weno, tmp_path / "weno")
    base = m_abmil["mil"]["test"]["instance_auroc"]
    student = m_weno["student"]["test"]["instance_auroc"]
    assert student >= 0.85, m_weno
    assert student >= base + 0.05, (student, base)
    assert m_weno["student"]["test"]["bag_auroc"] >= 0.8
    assert "teacher" in m_weno and m_weno["teacher"]["test"]["bag_auroc"] is not None
    # the run directory alone rebuilds both labelers with the same numbers
    again = evaluate_run(tmp_path / "weno")
    assert again["student"]["test"]["instance_auroc"] == pytest.approx(student, abs=1e-9)
    paths = label_run(tmp_path / "weno", None, None, "test", None)
    assert any(p.name == "instance_labels_student.csv" for p in paths)


def test_hpm_threshold_grid_picks_one_on_validation(tmp_path) -> None:
    import json

    from milkit.workflow import load_labelers

    exp = build_experiment(
        {
            "seed": 1,
            "data": {"kind": "positive_ratio_bags", "positive_ratio": 0.3, "bag_size": 10, "n_train_bags": 8,
                     "n_val_bags": 6, "n_test_bags": 6, "representation": "flat", "image_size": 8},
            "method": {"name": "weno", "encoder": {"name": "linear", "in_dim": 64, "out_dim": 16},
                       "hpm_warmup_epochs": 1, "hpm_threshold_grid": [0.3, 0.7], "student_batch_size": 16},
            "trainer": {"max_epochs": 2, "progress_bar": False},
        }
    )
    m = train_run(exp, tmp_path / "grid")
    grid = json.loads((tmp_path / "grid" / "stages" / "student" / "hpm_grid.json").read_text())
    assert grid["chosen"] in (0.3, 0.7) and len(grid["runs"]) == 2
    best = max(grid["runs"], key=lambda r: r["val_bag_auroc"])  # first of equals, as the method
    assert grid["chosen"] == best["hpm_threshold"]
    for t in (0.3, 0.7):
        assert (tmp_path / "grid" / "stages" / f"student_hpm{t:g}" / "model.pt").is_file()
    _, labelers, _ = load_labelers(tmp_path / "grid")
    assert set(labelers) == {"student", "teacher"} and m["student"]["test"]["n_bags"] == 6

"""D2L benchmark naming and Fig. 2 columns (issue 12): digit-bags unless MNIST is given; test beside val."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from milkit.benchmarks import mnist_bags


def test_fig2_reports_test_beside_validation_and_names_digit_bags(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_train_run(exp, out, overwrite=False):
        calls.append(exp)
        vat = exp.method.teacher.lambda_n > 0
        val, test = (0.9, 0.8) if vat else (0.7, 0.6)
        stage = {"val": {"bag_auroc": val}, "test": {"bag_auroc": test, "instance_accuracy": 0.5,
                                                    "instance_f1": 0.5, "instance_auroc": 0.5}}
        return {"teacher": stage, "abmil": stage, "student": stage}

    monkeypatch.setattr(mnist_bags, "train_run", fake_train_run)
    res = mnist_bags.run(tmp_path, [10], [4], 1, 1, 4, 4, None, 10, 4, Console(file=open("/dev/null", "w")))
    md = (tmp_path / "mnist_bags.md").read_text() if (tmp_path / "mnist_bags.md").exists() else \
        next(Path(tmp_path).glob("*.md")).read_text()
    assert md.startswith("# digit-bags") and "MNIST-bags (" not in md.splitlines()[0]
    assert "| test without VAT | test with VAT |" in md.replace("  ", " ") or "test with VAT" in md
    cell = res["fig2"]["K4_N10"]
    assert cell["vat_test"] == [0.8] and cell["no_vat_test"] == [0.6] and cell["vat"] == [0.9]
    assert res["settings"]["dataset"] == "digit-bags"
    assert mnist_bags.dataset_name(Path("mnist.npz")) == "MNIST-bags"


def test_table_only_skips_fig2(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_train_run(exp, out, overwrite=False):
        calls.append((exp.data.n_train, exp.method.train_student, exp.seed))
        stage = {"val": {"bag_auroc": 0.9}, "test": {"bag_auroc": 0.8, "instance_accuracy": 0.7,
                                                    "instance_f1": 0.6, "instance_auroc": 0.75}}
        return {"teacher": stage, "abmil": stage, "student": stage}

    monkeypatch.setattr(mnist_bags, "train_run", fake_train_run)
    res = mnist_bags.run(tmp_path, [10, 20], [4], 2, 1, 4, 4, None, 20, 4, Console(file=open("/dev/null", "w")),
                         fig2=False, first_seed=3)
    assert calls == [(20, True, 3), (20, True, 4)]  # one Tables I–II run per seed 3, 4; no Fig. 2 teacher runs
    md = next(Path(tmp_path).glob("*.md")).read_text()
    assert "Fig. 2" not in md and "Tables I–II style (N = 20, K = 4)" in md
    assert res["fig2"] == {} and res["table"]["per_stage"]["student"]["instance_auroc"] == [0.75, 0.75]

"""The Sm benchmarks' bookkeeping (the benchmarks themselves are not tests)."""

import math

import pytest

from milkit.benchmarks.sm_spatial import SPATIAL_MODELS, experiment_dict, spatial_table, summarise
from milkit.benchmarks.speed import MILKIT_MODELS, check_goals, run_speed, speed_table
from milkit.config import build_experiment


def test_speed_table_reports_errors_and_ratios():
    ok = {"fwd_bwd_s": 0.2, "infer_s": 0.1, "peak_rss_mb": 600.0, "graph_s": 0.01}
    tm = {"fwd_bwd_s": 0.8, "infer_s": 0.1, "peak_rss_mb": 700.0, "graph_s": 0.01}
    rows = [{"model": "smap_early", "n": 10, "milkit": ok, "torchmil": tm},
            {"model": "smtap", "n": 10, "milkit": {"error": "timeout > 1 s"}, "torchmil": tm},
            {"model": "clam_mb", "n": 10, "milkit": ok}]
    table = speed_table(rows, with_torchmil=True)
    assert "| 0.250 |" in table  # 0.2 / 0.8
    assert "timeout" in table and "n/a" in table
    assert "torchmil" not in speed_table(rows, with_torchmil=False)


def test_unknown_speed_model_is_named():
    with pytest.raises(ValueError, match="nope"):
        run_speed(["nope"], [10], 8, 1, 1, 10.0, 10, torchmil=False)
    assert {"abmil", "smap_early", "smtap", "clam_sb", "dsmil", "transmil", "dtfd"} <= set(MILKIT_MODELS)


def test_speed_child_times_a_small_bag_until_its_time_budget():
    """One real measurement in a subprocess: short steps repeat past ``repeats`` until
    ``min_time`` is spent, so that the median of a millisecond step is stable."""
    res = run_speed(["abmil"], [64], 16, 1, 2, 120.0, 10, torchmil=False, progress=lambda r: None, min_time=0.05)
    m = res["results"][0]["milkit"]
    assert "error" not in m, m
    assert m["fwd_bwd_s"] > 0 and m["infer_s"] > 0 and m["peak_rss_mb"] > 0
    n_fb, n_inf = m["timed"]
    assert n_fb >= 2 and n_inf >= 2
    steps = m["fwd_bwd_all_s"]
    assert len(steps) == n_fb and m["fwd_bwd_s"] == sorted(steps)[n_fb // 2]  # the median of the timed steps
    assert res["gemm_gflops_before"] > 0 and res["gemm_gflops_after"] > 0  # the absolute goals' context
    assert sum(steps) >= 0.05  # the loop ran until the min_time budget was spent (not just `repeats` = 2 steps)


def test_absolute_goal_miss_names_the_machine_gemm_rate_and_is_not_scaled():
    slow = {"fwd_bwd_s": 0.2, "infer_s": 0.1, "peak_rss_mb": 1.0, "graph_s": 0.01}
    rows = [{"model": "smap_early", "n": 10_000, "milkit": slow}]
    miss, no_torchmil = check_goals(rows, gemm_gflops=121.0)
    assert "0.200 s > 0.15 s" in miss and "GEMM 121 GFLOP/s" in miss and "~250" in miss
    assert "no torchmil measurement" in no_torchmil
    assert check_goals(rows)[0] == "smap_early N=10000: fwd+bwd 0.200 s > 0.15 s"
    fast = {**slow, "fwd_bwd_s": 0.1}
    assert [m for m in check_goals([{"model": "smap_early", "n": 10_000, "milkit": fast}], gemm_gflops=50.0)
            if "s >" in m] == []


def test_spatial_summary_and_experiments_validate():
    runs = {"smap_early": [{"bag_auroc": 0.9, "bag_f1": 0.8, "instance_auroc": 0.7, "instance_f1": 0.5,
                            "dirichlet_energy": 0.02},
                           {"bag_auroc": 0.7, "bag_f1": 0.6, "instance_auroc": 0.9, "instance_f1": None,
                            "dirichlet_energy": 0.04}]}
    s = summarise(runs)["smap_early"]
    assert s["bag_auroc"][0] == pytest.approx(0.8) and s["bag_auroc"][1] == pytest.approx(0.1)
    assert s["instance_f1"][0] == pytest.approx(0.5) and not math.isnan(s["dirichlet_energy"][0])
    assert "0.800 ± 0.100" in spatial_table(summarise(runs))
    for name, model in SPATIAL_MODELS.items():
        exp = build_experiment(experiment_dict(model, 0, {"n_train": 4}, 2, 1e-3, 2))
        assert exp.method.model.name == model["name"], name


def test_spatial_first_seed_runs_the_named_seeds(tmp_path, monkeypatch):
    """`--first-seed 3 --seeds 2` trains seeds 3 and 4 (resuming a stopped benchmark) and records it."""
    import json

    from milkit.benchmarks import sm_spatial
    from milkit.cli import main

    seen = []

    def fake_run_one(raw, run_dir):
        seen.append((raw["seed"], run_dir.name, raw["method"]["model"].get("sm_mid_tanh")))
        return {"bag_auroc": 0.9, "bag_f1": 0.8, "instance_auroc": 0.7, "instance_f1": 0.5, "dirichlet_energy": 0.03,
                "label_energy": 0.02, "train_seconds": 1.0}

    monkeypatch.setattr(sm_spatial, "run_one", fake_run_one)
    assert main(["benchmark", "spatial", "--out", str(tmp_path), "--models", "smap_mid_before", "--seeds", "2",
                 "--first-seed", "3"]) == 0
    assert seen == [(3, "seed3", "before"), (4, "seed4", "before")]
    settings = json.loads((tmp_path / "spatial.json").read_text())["settings"]
    assert (settings["first_seed"], settings["seeds_done"]) == (3, 2)


def test_speed_times_the_pseudo_label_default_it_labels_with():
    """The `pseudo_label` speed row is the recipe's labelling model: one instance model per default
    feature α, their scores averaged (not the single-scale model of the old default)."""
    import torch

    from milkit.benchmarks.speed import _build_milkit
    from milkit.methods.pseudo_label import PseudoLabelConfig, ScaleMeanMIL

    m = _build_milkit("pseudo_label", 8)
    assert isinstance(m, ScaleMeanMIL)
    got = [round(float(k.sm_feat.alpha), 6) for k in m.members]
    assert got == PseudoLabelConfig().feature_alpha_grid == [0.8, 0.65]
    x = torch.randn(1, 5, 8)
    out = m(x)
    want = torch.stack([k(x).instance_scores for k in m.eval().members]).mean(0)
    assert torch.allclose(m.eval()(x).instance_scores, want)
    assert out.instance_scores.shape == (1, 5)


def test_speed_repeats_below_one_is_one_line_and_writes_nothing(tmp_path, capsys):
    from milkit.cli import main

    out = tmp_path / "sp"
    rc = main(["benchmark", "speed", "--sizes", "1000", "--models", "abmil", "--no-torchmil", "--out", str(out),
               "--repeats", "0"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "--repeats must be at least 1, got 0" in err and "Traceback" not in err
    assert not out.exists()

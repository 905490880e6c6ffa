"""report.html: metrics, ROC curves, histograms and training curves of a run directory."""

import base64

import numpy as np

from milkit.report import ScoreSet, histogram_figure, read_training_log, render_report, write_report


def _scores(seed: int = 0) -> ScoreSet:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    return ScoreSet(bag_true=np.array([0, 1, 0, 1]), bag_prob=np.array([0.1, 0.9, 0.4, 0.6]),
                    instance_true=y, instance_score=y + rng.normal(0, 0.5, 200), threshold=0.5)


def test_report_holds_metrics_plots_and_training_curves(tmp_path):
    log = tmp_path / "stages" / "mil" / "logs" / "metrics.csv"
    log.parent.mkdir(parents=True)
    log.write_text("epoch,step,train/loss,val/bag_auroc\n0,4,0.69,\n0,4,,0.75\n1,9,0.5,\n1,9,,0.875\n")
    metrics = {"mil": {"threshold": {"threshold": 0.5, "source": "validation:youden_product"},
                       "val": {"bag_auroc": 0.75, "instance_auroc": 0.8}, "test": {"bag_auroc": 1.0, "n_bags": 4}},
               "_run": {"method": "mil", "train_seconds": 1.5}}
    path = write_report(tmp_path, metrics, {"mil": {"val": _scores(0), "test": _scores(1)}})
    page = path.read_text()
    assert path.name == "report.html" and page.startswith("<!doctype html>")
    assert "stage: mil" in page and "validation:youden_product" in page
    assert "<td>0.75</td>" in page and "<td>1</td>" in page  # val and test columns
    imgs = page.count("data:image/png;base64,")
    assert imgs == 4  # ROC, two histograms, training curves
    first = page.split("data:image/png;base64,")[1].split('"')[0]
    assert base64.b64decode(first)[:8] == b"\x89PNG\r\n\x1a\n"
    assert read_training_log(log) == {"train/loss": [(0, 0.69), (1, 0.5)], "val/bag_auroc": [(0, 0.75), (1, 0.875)]}


def test_report_without_instance_labels_or_logs(tmp_path):
    sc = ScoreSet(bag_true=np.array([0, 1]), bag_prob=np.array([0.2, 0.7]))
    assert histogram_figure(sc, "test") is None
    page = render_report(tmp_path, {"mil": {"test": {"bag_auroc": 1.0, "instance": "not computable"}}},
                         {"mil": {"test": sc}})
    assert page.count("data:image/png;base64,") == 1  # the bag ROC only
    assert "<td>instance</td><td>not computable</td>" in page  # why a metric is missing is shown
    one_class = ScoreSet(bag_true=np.array([1, 1]), bag_prob=np.array([0.2, 0.7]))
    assert "base64," not in render_report(tmp_path, {}, {})  # no stages, no plots
    assert render_report(tmp_path, {"s": {"test": {}}}, {"s": {"test": one_class}}).count("base64,") == 1


def test_report_escapes_names(tmp_path):
    page = render_report(tmp_path, {"<b>x</b>": {"test": {"bag_auroc": 0.5}}}, {})
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;" in page


def test_report_shows_the_verdict_rule_reliability_and_seed_spread(tmp_path):
    from milkit.trust.verdict import assess

    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 10)
    patch_y = np.concatenate([np.r_[np.zeros(9, int), [int(v)]] for v in y])
    patch_s = patch_y * 2.0 + rng.normal(0, 1, len(patch_y))
    trust = assess(y, y * 0.8 + 0.1, patch_s.reshape(20, 10).max(1), patch_true=patch_y, patch_score=patch_s,
                   patch_prob=1 / (1 + np.exp(-patch_s)), patch_group=np.repeat(np.arange(20), 10),
                   member_scores=[patch_s, patch_s + rng.normal(0, 0.1, len(patch_s))], n_boot=200)
    seeds = [{"seed": k, "val": {"bag_auroc": 0.8 + k / 100}, "test": {"bag_auroc": 0.7, "instance_auroc": 0.6 + k / 10,
                                                                         "instance_f1": 0.5}} for k in range(2)]
    metrics = {"mil": {"trust": trust, "calibration": [{"source": "validation patch labels"}],
                       "threshold": {"threshold": 0.4, "source": "validation:f1", "criterion": "f1",
                                     "applies_to": "probability"},
                       "val": {"bag_auroc": 0.9}, "test": {"bag_auroc": 0.75, "instance_auroc": 0.71},
                       "seeds": seeds,
                       "seed_spread": {"test": {"instance_auroc": {"mean": 0.65, "sd": 0.0707}}}}}
    page = render_report(tmp_path, metrics, {})
    assert f"verdict: {trust['verdict'].upper()}" in page and html_escape(trust["rule"]) in page
    assert "validation patch labels" in page and "criterion f1" in page and "on the probability" in page
    assert "seeds (2 replicas" in page and "0.65 ± 0.0707" in page and "<b>0.71</b>" in page
    assert page.count("data:image/png;base64,") == 1  # the reliability diagram


def html_escape(s: str) -> str:
    import html

    return html.escape(s)

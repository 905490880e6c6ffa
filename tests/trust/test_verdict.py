"""The trust verdict (milkit.trust.verdict): random scores → "do not use"; an inverted model is
never "trustworthy"; a good, stable one is; the bootstrap intervals behave."""

import numpy as np
import pytest

from milkit.metrics.classification import bootstrap_auroc
from milkit.trust.verdict import DO_NOT_USE, TRUSTWORTHY, UNCERTAIN, assess, verdict_line

N_SLIDES, N_PATCH, WITNESS = 40, 60, 0.08


def _cohort(seed: int):
    """Validation slides (half positive), patch labels with 8 % witnesses in positive slides."""
    rng = np.random.default_rng(seed)
    slide_y = np.array([0, 1] * (N_SLIDES // 2))
    patch_y = [(rng.uniform(size=N_PATCH) < WITNESS).astype(int) * y for y in slide_y]
    for i, y in enumerate(slide_y):
        if y and not patch_y[i].any():
            patch_y[i][0] = 1
    return rng, slide_y, patch_y


def _assess(rng, slide_y, patch_y, patch_scores, slide_prob, with_patch_labels, k_seeds=1, jitter=0.0):
    """Run :func:`assess` on per-slide patch scores; replicas = the scores plus small noise."""
    members = [np.concatenate(patch_scores) + jitter * rng.normal(size=N_SLIDES * N_PATCH) for _ in range(k_seeds)]
    return assess(slide_y, slide_prob, np.array([s.max() for s in patch_scores]),
                  patch_true=np.concatenate(patch_y) if with_patch_labels else None,
                  patch_score=np.concatenate(patch_scores), patch_prob=None,
                  patch_group=np.repeat(np.arange(N_SLIDES), N_PATCH), member_scores=members, n_boot=300)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_patch_labels", [True, False])
def test_random_scores_get_do_not_use(seed, with_patch_labels):
    rng, slide_y, patch_y = _cohort(seed)
    scores = [rng.normal(size=N_PATCH) for _ in slide_y]
    t = _assess(rng, slide_y, patch_y, scores, rng.uniform(size=N_SLIDES), with_patch_labels, k_seeds=3, jitter=1.0)
    assert t["verdict"] == DO_NOT_USE, t["rule"]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("with_patch_labels", [True, False])
@pytest.mark.parametrize("k_seeds", [1, 3])
def test_inverted_model_is_never_trustworthy(seed, with_patch_labels, k_seeds):
    """Slide head perfect, replicas in full agreement — but positive patches score lowest."""
    rng, slide_y, patch_y = _cohort(seed)
    scores = [-3.0 * y + rng.normal(size=N_PATCH) for y in patch_y]
    good_slides = slide_y * 0.8 + 0.1 + rng.uniform(-0.05, 0.05, N_SLIDES)
    t = _assess(rng, slide_y, patch_y, scores, good_slides, with_patch_labels, k_seeds=k_seeds, jitter=0.01)
    assert t["verdict"] != TRUSTWORTHY, t
    if with_patch_labels:
        assert t["verdict"] == DO_NOT_USE and t["patch_auroc"]["ci95"][1] < 0.5


@pytest.mark.parametrize("with_patch_labels", [True, False])
def test_a_good_stable_model_is_trustworthy(with_patch_labels):
    rng, slide_y, patch_y = _cohort(0)
    scores = [3.0 * y + rng.normal(size=N_PATCH) for y in patch_y]
    slide_prob = slide_y * 0.8 + 0.1 + rng.uniform(-0.05, 0.05, N_SLIDES)
    t = _assess(rng, slide_y, patch_y, scores, slide_prob, with_patch_labels, k_seeds=3, jitter=0.1)
    assert t["verdict"] == TRUSTWORTHY, t["rule"]
    assert t["seed_agreement"]["rho"] > 0.9 and t["slide_auroc"]["ci95"][0] > 0.9
    line = verdict_line("mil", t)
    assert line.startswith("verdict mil: TRUSTWORTHY") and "slide AUROC" in line


def test_one_seed_without_patch_labels_is_uncertain():
    rng, slide_y, patch_y = _cohort(0)
    scores = [3.0 * y + rng.normal(size=N_PATCH) for y in patch_y]
    slide_prob = slide_y * 0.8 + 0.1
    t = _assess(rng, slide_y, patch_y, scores, slide_prob, False, k_seeds=1)
    assert t["verdict"] == UNCERTAIN and "one seed" in t["rule"]
    assert t["seed_agreement"]["rho"] is None and "unavailable" in t["seed_agreement"]["note"]


def test_disagreeing_seeds_are_uncertain():
    rng, slide_y, patch_y = _cohort(0)
    scores = [3.0 * y + rng.normal(size=N_PATCH) for y in patch_y]
    t = _assess(rng, slide_y, patch_y, scores, slide_y * 0.8 + 0.1, False, k_seeds=3, jitter=20.0)
    assert t["verdict"] == UNCERTAIN and "seed agreement" in t["rule"]


def test_bootstrap_interval_behaviour():
    y = np.array([0, 0, 0, 1, 1, 1])
    perfect = bootstrap_auroc(y, np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9]), n_boot=200)
    assert perfect["auroc"] == 1.0 and perfect["low"] == 1.0 and perfect["high"] == 1.0
    rng = np.random.default_rng(0)
    yy = rng.integers(0, 2, 400)
    ss = yy + rng.normal(0, 1, 400)
    a = bootstrap_auroc(yy, ss, n_boot=400)
    assert a["low"] < a["auroc"] < a["high"] and a["n_boot_used"] == 400
    # duplicating every patch 5× inside its group: patch resampling narrows the interval, group resampling does not
    y5, s5, g5 = np.repeat(yy, 5), np.repeat(ss, 5), np.repeat(np.arange(400), 5)
    naive = bootstrap_auroc(y5, s5, n_boot=400)
    grouped = bootstrap_auroc(y5, s5, groups=g5, n_boot=400)
    assert naive["high"] - naive["low"] < 0.7 * (a["high"] - a["low"])
    assert grouped["high"] - grouped["low"] == pytest.approx(a["high"] - a["low"], rel=0.25)
    one = bootstrap_auroc(np.ones(5), np.arange(5.0))
    assert np.isnan(one["auroc"]) and np.isnan(one["low"])


def test_too_few_validation_slides_are_never_trustworthy():
    """Two validation slides give a bootstrap interval of [1, 1]; that is not evidence."""
    y = np.array([0, 1] * 4)
    patch_y = np.concatenate([np.r_[np.zeros(9, int), [v]] for v in y])
    s = patch_y * 5.0
    t = assess(y, y.astype(float), s.reshape(8, 10).max(1), patch_true=patch_y, patch_score=s,
               patch_group=np.repeat(np.arange(8), 10), member_scores=[s, s + 0.01], n_boot=200)
    assert t["slide_auroc"]["ci95"] == [1.0, 1.0]
    assert t["verdict"] == UNCERTAIN and "too few" in t["rule"]


def test_label_free_threshold_notice_names_the_stages_without_patch_labels():
    from milkit.trust.verdict import label_free_threshold_notice

    with_labels = {"threshold": {"threshold": 0.31, "source": "validation:f1", "criterion": "f1"}}
    without = {"threshold": {"threshold": 0.5, "source": "default:0.5 (no validation instance labels)",
                             "criterion": "none (no validation instance labels)"}}
    assert label_free_threshold_notice({"mil": with_labels, "_run": {"primary_stage": "mil"}}) is None
    line = label_free_threshold_notice({"mil": without, "pseudo_label": without, "abmil": with_labels})
    assert line.startswith("milkit: mil, pseudo_label: no validation patch labels") and "\n" not in line
    assert "data.annotations_dir" in line


def test_label_warns_before_labelling_with_a_do_not_use_stage():
    from milkit.trust.verdict import do_not_use_warning

    bad = {"mil": {"trust": {"verdict": "do not use", "rule": "validation slide AUROC 95% CI includes 0.5"}}}
    assert do_not_use_warning(bad, "mil").startswith("stage mil's verdict is DO NOT USE (validation slide AUROC 95% CI")
    assert do_not_use_warning({"mil": {"trust": {"verdict": "uncertain"}}}, "mil") is None
    assert do_not_use_warning({}, "mil") is None and do_not_use_warning({"_run": {}}, "_run") is None


def test_few_slides_notice_points_to_cross_validation_only_when_the_rule_fired():
    from milkit.trust.verdict import FEW_SLIDES_RULE, MIN_SLIDES_PER_CLASS, few_slides_notice

    y = np.array([0, 1] * 2)  # four validation slides
    s = np.repeat(y, 10) * 5.0 + np.tile(np.arange(10), 4) * 0.01
    t = assess(y, y.astype(float), s.reshape(4, 10).max(1), n_boot=200)
    assert FEW_SLIDES_RULE in t["fired"] and t["n_slides_per_class"] == {"positive": 2, "negative": 2}
    line = few_slides_notice({"mil": {"trust": t}, "_run": {}}, "`milkit train x.yaml --out r-cv --folds 5`")
    assert line.startswith("milkit: mil: the verdict read 4 validation slides (2 positive, 2 negative), fewer than "
                           f"{MIN_SLIDES_PER_CLASS} of a class") and "--folds 5" in line and "\n" not in line
    many = np.array([0, 1] * MIN_SLIDES_PER_CLASS)
    t2 = assess(many, many.astype(float), many * 5.0, n_boot=200)
    assert FEW_SLIDES_RULE not in t2["fired"] and few_slides_notice({"mil": {"trust": t2}}, "x") is None

"""hard_bags (issue 11 §1): witness rates, contiguous lesions, disjoint source pools, seeds, calibration."""

import numpy as np
import pytest
from scipy import ndimage

from milkit.config import ConfigError, build_experiment
from milkit.data.hard_bags import HardBagsConfig, HardBagsGenerator, linear_probe_auroc

SMALL = dict(n_train=12, n_val=4, n_test=6, min_side=10, max_side=12)


def _grid_labels(bag):
    h, w = bag.meta["grid"]
    g = np.zeros((h, w), dtype=int)
    c = bag.coords.numpy() // bag.meta["patch_size"]
    g[c[:, 1], c[:, 0]] = bag.instance_labels.numpy()
    return g


@pytest.mark.parametrize("level", ["easy", "medium", "hard"])
def test_witness_rate_lesions_and_graph(level):
    cfg = HardBagsConfig(level=level, **SMALL)
    splits = cfg.build(0)
    lo, hi = cfg.rates
    rates = []
    for ds in (splits.train, splits.val, splits.test):
        for bag in ds:
            assert bag.instances.shape[1] == 512 and bag.adj is not None and bag.adj.num_nodes == len(bag)
            y = bag.instance_labels.numpy()
            if bag.label == 0:
                assert y.sum() == 0  # a negative slide has no positive patch
                continue
            assert y.sum() >= 1
            # drawn in [lo, hi], rounded to whole patches; a lesion never outgrows its tissue island
            assert y.mean() <= hi + 1.5 / len(bag) + 1e-9
            rates.append(y.mean())
            _, n_components = ndimage.label(_grid_labels(bag))  # 4-connectivity
            assert 1 <= n_components <= cfg.max_lesions  # lesions are contiguous
    assert lo - 0.01 <= np.mean(rates) <= hi


def test_source_pools_are_disjoint_and_data_fixed_by_generator_seed():
    cfg = HardBagsConfig(**SMALL)
    pools = HardBagsGenerator(cfg, 0).pools
    assert not set(pools["train"]) & set(pools["test"]) and not set(pools["val"]) & set(pools["test"])
    a, b = cfg.build(0), cfg.build(7)  # the experiment seed does not change the data (generator_seed 0)
    assert all(np.array_equal(x.instances, y.instances) for x, y in zip(a.train, b.train))
    free = HardBagsConfig(generator_seed=None, **SMALL)
    c, d = free.build(0), free.build(7)
    assert not np.array_equal(c.train[0].instances[:5], d.train[0].instances[:5])


def test_bad_witness_rate_names_the_key():
    raw = {"data": {"kind": "hard_bags", "witness_rate": [0.1, 0.05]}, "method": {"name": "pseudo_label"}}
    with pytest.raises(ConfigError, match="witness_rate"):
        build_experiment(raw)


def test_hardest_level_is_calibrated_for_the_linear_probe():
    # issue 11 §1: a supervised linear probe on true patch labels reaches 0.90–0.95 patch AUROC
    auc = linear_probe_auroc(HardBagsConfig(level="hard").build(0))
    assert 0.90 <= auc <= 0.95, auc


# -- level hard-confounded: the hard level + a label-correlated slide stain shift (train/validation only)

CONF = dict(n_train=20, n_val=10, n_test=20, min_side=8, max_side=9)


def _signs_and_labels(ds):
    return np.array([b.meta["confounder"] for b in ds]), np.array(ds.labels)


def test_confounder_follows_the_label_in_train_and_validation_only():
    splits = HardBagsConfig(level="hard-confounded", **CONF).build(0)
    # 10 slides a class in train and test, 5 in validation: c = 2y − 1 for round(0.8·10) = 8 (train),
    # round(0.8·5) = 4 (validation) and round(0.5·10) = 5 (test) of each class. With both classes
    # equal in size, corr(c, 2y − 1) = mean(c·(2y − 1)) = agree − disagree: 0.6 / 0.6 / 0.0.
    for ds, agree, corr in ((splits.train, 16, 0.6), (splits.val, 8, 0.6), (splits.test, 10, 0.0)):
        c, y = _signs_and_labels(ds)
        assert set(c) == {-1, 1}
        assert int((c == 2 * y - 1).sum()) == agree
        assert np.corrcoef(c, 2 * y - 1)[0, 1] == pytest.approx(corr)
    c, y = _signs_and_labels(splits.test)
    for cls in (0, 1):  # in test, half of each class has either sign: independent of the label
        assert (c[y == cls] == 1).sum() == (y == cls).sum() // 2


def test_confounded_level_is_the_hard_level_plus_a_stain_shift_and_deterministic():
    conf, hard = HardBagsConfig(level="hard-confounded", **CONF), HardBagsConfig(level="hard", **CONF)
    a, b, h = conf.build(0), conf.build(3), hard.build(0)
    for x, y, z in zip(a.test, b.test, h.test):
        assert np.array_equal(x.instances, y.instances)  # deterministic (generator seed 0)
        assert x.bag_id == z.bag_id and x.label == z.label  # same slides, lesions and coordinates as 'hard'
        assert np.array_equal(x.instance_labels, z.instance_labels) and np.array_equal(x.coords, z.coords)
        assert not np.array_equal(x.instances, z.instances)  # ... but shifted stain
        assert z.meta["confounder"] == 0
    off = HardBagsConfig(level="hard-confounded", confounder_strength=0.0, **CONF).build(0)
    assert all(np.allclose(x.instances, z.instances, atol=1e-5) for x, z in zip(off.train, h.train))
    assert HardBagsConfig(level="hard").confounding is None and HardBagsConfig(level="hard-confounded").confounding == 0.8


def test_the_confounder_is_a_shortcut_visible_in_slide_mean_features():
    # what an attention model could fit: the mean feature of a slide separates the two signs
    # (direction learnt on train, scored on the disjoint test pool), far better than chance
    from milkit.metrics.classification import auroc

    splits = HardBagsConfig(level="hard-confounded", **CONF).build(0)
    mean = lambda ds: np.stack([b.instances.numpy().mean(0) for b in ds])  # noqa: E731
    ctr, _ = _signs_and_labels(splits.train)
    cte, _ = _signs_and_labels(splits.test)
    mtr, mte = mean(splits.train), mean(splits.test)
    direction = mtr[ctr == 1].mean(0) - mtr[ctr == -1].mean(0)
    assert auroc((cte == 1).astype(int), mte @ direction) >= 0.85


def test_confounded_level_on_the_cli(monkeypatch, tmp_path, capsys):
    import milkit.benchmarks.hard_bags as hb
    from milkit.cli import main

    seen = {}

    def fake_run(out, levels, rows, seeds, s, resume=True, progress=print):
        seen.update(levels=levels, rows=rows, seeds=seeds)
        return {"settings": s, "levels": [], "cells": {}, "probe": {}, "wall_s": 0.0}

    monkeypatch.setattr(hb, "run", fake_run)
    assert main(["benchmark", "hard-bags", "--out", str(tmp_path), "--levels", "hard-confounded",
                 "--rows", "ABMIL", "--seeds", "0,1"]) == 0
    assert seen == {"levels": ["hard-confounded"], "rows": ["ABMIL"], "seeds": [0, 1]}
    capsys.readouterr()
    assert main(["benchmark", "hard-bags", "--out", str(tmp_path), "--levels", "hard-confused"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--levels" in err and "hard-confused" in err and "hard-confounded" in err


def test_bad_level_in_a_config_names_the_key():
    with pytest.raises(ConfigError, match="level"):
        build_experiment({"data": {"kind": "hard_bags", "level": "hard-confused"}, "method": {"name": "pseudo_label"}})


def test_sides_option_reaches_the_data_config(monkeypatch, tmp_path, capsys):
    # --sides MIN,MAX (issue 11: realistic bag sizes) sets data.min_side/max_side of every run and of the probe
    import milkit.benchmarks.hard_bags as hb
    from milkit.cli import main

    seen = {}

    def fake_run(out, levels, rows, seeds, s, resume=True, progress=print):
        seen["s"] = s
        return {"settings": s, "levels": [], "cells": {}, "probe": {}, "wall_s": 0.0}

    monkeypatch.setattr(hb, "run", fake_run)
    assert main(["benchmark", "hard-bags", "--out", str(tmp_path), "--levels", "hard", "--sides", "40,60"]) == 0
    assert seen["s"]["sides"] == [40, 60]
    raw, _ = hb.experiment("ABMIL", "hard", 0, seen["s"])
    data = build_experiment(raw).data
    assert (data.min_side, data.max_side, data.level) == (40, 60, "hard")
    bag = HardBagsConfig(level="hard", n_train=2, n_val=2, n_test=2, min_side=40, max_side=41).build(0).train[0]
    assert 40 * 40 * 0.7 <= len(bag) <= 41 * 41  # sides 40-41, 15 % of cells without tissue
    assert main(["benchmark", "hard-bags", "--out", str(tmp_path), "--levels", "hard"]) == 0
    assert "sides" not in seen["s"]  # the default grid: settings as before, so old results resume
    assert hb.experiment("ABMIL", "hard", 0, seen["s"])[0]["data"].keys() == {"kind", "level", "generator_seed"}
    for bad in ("60,40", "40", "a,b", "2,3"):
        capsys.readouterr()
        assert main(["benchmark", "hard-bags", "--out", str(tmp_path), "--sides", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "--sides" in err and bad in err


# -- level hard-mimic: the hard level + strong contiguous benign look-alike foci, more frequent in positive slides

MIM = dict(n_train=20, n_val=20, n_test=20, min_side=8, max_side=9)


@pytest.fixture(scope="module")
def mimic_splits():
    return HardBagsConfig(level="hard-mimic", **MIM).build(0)


def test_hard_level_unchanged_by_the_new_levels():
    # per-bag sums of the `hard` level as generated before hard-confounded / hard-mimic existed (commit e64603a)
    sp = HardBagsConfig(level="hard", n_train=4, n_val=2, n_test=4, min_side=8, max_side=9).build(0)
    want = {"train": [(0, 54, 0, 6418.4501), (1, 60, 2, 7652.6833), (1, 74, 2, 12099.8794), (0, 70, 0, 8783.6496)],
            "test": [(1, 52, 1, 5473.1635), (1, 61, 2, 7308.3015), (0, 62, 0, 9582.1842), (0, 58, 0, 9640.0783)]}
    for name, rows in want.items():
        got = [(b.label, len(b), int(b.instance_labels.sum()), float(b.instances.double().sum()))
               for b in getattr(sp, name)]
        for g, w in zip(got, rows):
            assert g[:3] == w[:3] and g[3] == pytest.approx(w[3], rel=1e-6)
        assert all("mimic" not in b.meta for b in getattr(sp, name))


def test_mimic_foci_frequency_per_class_and_split(mimic_splits):
    cfg, splits = HardBagsConfig(level="hard-mimic", **MIM), mimic_splits
    assert cfg.focal_mimics == (0.9, 0.4) and HardBagsConfig(level="hard").focal_mimics is None
    # every split: 10 positive and 10 negative slides; foci in round(0.9·10) = 9 and round(0.4·10) = 4 of them
    for ds in (splits.train, splits.val, splits.test):
        y = np.array(ds.labels)
        has = np.array([bool(b.meta["mimic"].any()) for b in ds])
        assert (y == 1).sum() == 10 and has[y == 1].sum() == 9 and has[y == 0].sum() == 4
        for bag in ds:
            m = bag.meta["mimic"].numpy()
            if m.any():  # 4–8 % of the slide's patches, rounded to whole patches (at least one)
                assert max(1, round(0.04 * len(bag))) <= m.sum() <= max(1, round(0.08 * len(bag)))
    # so presence alone ranks the test slides at AUROC (9·6 + ½·(9·4 + 1·6)) / 100 = 0.75, by hand
    from milkit.metrics.classification import auroc

    y = np.array(splits.test.labels)
    has = np.array([float(b.meta["mimic"].any()) for b in splits.test])
    assert auroc(y, has) == pytest.approx(0.75)


def test_mimic_foci_are_contiguous_unlabelled_and_off_the_lesions(mimic_splits):
    splits = mimic_splits
    for bag in list(splits.train) + list(splits.test):
        m = bag.meta["mimic"].numpy()
        y = bag.instance_labels.numpy()
        assert not (m & (y == 1)).any()  # never on a lesion patch; a look-alike carries label 0
        if not m.any():
            continue
        h, w = bag.meta["grid"]
        g = np.zeros((h, w), dtype=int)
        c = bag.coords.numpy() // bag.meta["patch_size"]
        g[c[:, 1], c[:, 0]] = m
        _, n_components = ndimage.label(g)  # 4-connectivity: 1–3 grown foci (touching foci merge)
        assert 1 <= n_components <= 3


def test_mimic_level_is_the_hard_level_plus_foci_only(mimic_splits):
    mim, hard = mimic_splits, HardBagsConfig(level="hard", **MIM).build(0)
    n_changed = 0
    for x, z in zip(list(mim.train) + list(mim.test), list(hard.train) + list(hard.test)):
        assert x.bag_id == z.bag_id and x.label == z.label
        assert np.array_equal(x.instance_labels, z.instance_labels) and np.array_equal(x.coords, z.coords)
        m = x.meta["mimic"].numpy()
        # a patch's feature depends on its own pixels only: every patch outside the foci is bit-identical
        assert np.array_equal(x.instances.numpy()[~m], z.instances.numpy()[~m])
        if m.any():
            assert not np.allclose(x.instances.numpy()[m], z.instances.numpy()[m])
            n_changed += 1
    assert n_changed == 26  # (9 + 4) slides with foci in each of train and test


def test_mimic_pattern_is_a_look_alike_and_easier_than_the_lesion(mimic_splits):
    from sklearn.linear_model import LogisticRegression

    from milkit.data.hard_bags import lesion_textures, mimic_texture
    from milkit.metrics.classification import auroc

    les = lesion_textures(3, 1234)
    m = mimic_texture(les, 0.5, 1234)
    u = les.mean(0) / np.linalg.norm(les.mean(0))
    assert np.linalg.norm(m) == pytest.approx(1.0, abs=1e-5) and float(m @ u) == pytest.approx(0.5, abs=1e-5)
    assert abs(m.reshape(8, 8).mean()) < 1e-5  # zero-mean like the lesion textures: no brightness cue

    # in the features a look-alike patch is easy to tell from normal tissue: a linear classifier on
    # train patches (lesions left out) ranks the test split's look-alikes above its normal patches
    def stack(ds):
        x = np.concatenate([b.instances.numpy() for b in ds])
        y = np.concatenate([b.instance_labels.numpy() for b in ds])
        mm = np.concatenate([b.meta["mimic"].numpy() for b in ds])
        return x[y == 0], mm[y == 0]

    (xtr, mtr), (xte, mte) = stack(mimic_splits.train), stack(mimic_splits.test)
    scale = xtr.std(0) + 1e-6
    clf = LogisticRegression(max_iter=2000).fit(xtr / scale, mtr)
    assert auroc(mte.astype(int), clf.decision_function(xte / scale)) >= 0.97


def test_bad_mimic_settings_name_the_key():
    base = {"kind": "hard_bags", "level": "hard-mimic"}
    for key, bad in (("focal_mimic_slides", [0.9, 1.4]), ("focal_mimic_fraction", [0.08, 0.04])):
        with pytest.raises(ConfigError, match=key):
            build_experiment({"data": {**base, key: bad}, "method": {"name": "pseudo_label"}})


def test_mimic_level_on_the_cli(level_on_the_cli):
    levels, data = level_on_the_cli("hard-mimic")
    assert levels == ["hard-mimic"] and data.focal_mimics == (0.9, 0.4)

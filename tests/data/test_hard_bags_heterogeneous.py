"""Level ``hard-heterogeneous`` of ``hard_bags`` (issue 11, cause 3): the hard level's slides with every
lesion its own texture, cosine ρ with its shared texture; the other levels unchanged."""

import hashlib

import numpy as np
import pytest

from milkit.config import ConfigError, build_experiment
from milkit.data.hard_bags import HardBagsConfig, HardBagsGenerator, lesion_pattern, lesion_textures, smooth_pattern

SMALL = dict(n_train=20, n_val=20, n_test=20, min_side=8, max_side=9)
#: per level, small config (n 4 / 2 / 4, sides 8–9, generator seed 0), computed with the main branch's generator
#: (07afcda, before this level existed; `git archive 07afcda src`, 1 thread): sha256 (first 16 hex) of every bag's
#: labels and coords, exact; and four sums of the features (all, squares, first 8 dims, every third patch), equal
#: within rel 1e-7 — the BLAS's summation order moves them by ~1e-9 between thread counts, any change to the
#: generator by far more (a hash of rounded features flipped between 1 and 2 threads)
MAIN_FINGERPRINTS = {
    "easy": ("27fe999866619fa0", [93036.885031, 91119.913776, 1751.973502, 30870.216743]),
    "medium": ("4dbd2dea83bfcd53", [77517.932164, 64713.774313, 1417.315799, 25814.752952]),
    "hard": ("1f08cab530a9b612", [82783.263556, 69679.625867, 1525.249373, 27834.316342]),
    "hard-confounded": ("1f08cab530a9b612", [99077.942262, 100087.782203, 2072.167046, 33544.107948]),
    "hard-mimic": ("1f08cab530a9b612", [84936.497765, 74474.916317, 1614.49785, 28350.989422]),
}


def _fingerprint(sp) -> tuple[str, list[float]]:
    h, sums = hashlib.sha256(), []
    for ds in (sp.train, sp.val, sp.test):
        for b in ds:
            h.update(b.instance_labels.numpy().astype(np.int64).tobytes())
            h.update(b.coords.numpy().astype(np.int64).tobytes())
            f = b.instances.numpy().astype(np.float64)
            sums.append([f.sum(), (f**2).sum(), f[:, :8].sum(), f[::3].sum()])
    return h.hexdigest()[:16], np.array(sums).sum(0).tolist()


@pytest.fixture(scope="module")
def both():
    cfg = HardBagsConfig(level="hard-heterogeneous", **SMALL)
    gen = HardBagsGenerator(cfg, 0)
    het = [gen.split(name, 20) for name in ("train", "val", "test")]
    hard = HardBagsConfig(level="hard", signal=cfg.strength, **SMALL).build(0)
    return gen, het, [hard.train, hard.val, hard.test]


def test_other_levels_identical_to_the_main_branch():
    for level, want in MAIN_FINGERPRINTS.items():
        sp = HardBagsConfig(level=level, n_train=4, n_val=2, n_test=4, min_side=8, max_side=9).build(0)
        digest, sums = _fingerprint(sp)
        assert digest == want[0], level
        assert sums == pytest.approx(want[1], rel=1e-7), level


def test_level_settings():
    cfg = HardBagsConfig(level="hard-heterogeneous")
    assert cfg.similarity == 0.5 and cfg.strength == 5.75 and cfg.mimic_base == 3.0
    assert cfg.rates == HardBagsConfig(level="hard").rates
    hard = HardBagsConfig(level="hard")
    assert hard.similarity is None and hard.mimic_base == hard.strength == 3.0
    assert HardBagsConfig(level="hard", lesion_similarity=0.3).similarity == 0.3


def test_heterogeneous_is_the_hard_level_except_on_lesion_patches(both):
    _, het, hard = both
    # the hard level at the signal 3.0 it ships with: its non-lesion patches (tissue, stain, noise, faint
    # mimics at 3.0·U(0, 0.8)) are the heterogeneous level's, bit for bit
    hard3 = HardBagsConfig(level="hard", **SMALL).build(0)
    n_pos = 0
    for ds_h, ds_3 in zip(het, (hard3.train, hard3.val, hard3.test)):
        for x, z in zip(ds_h, ds_3):
            assert x.bag_id == z.bag_id and x.label == z.label
            assert np.array_equal(x.instance_labels, z.instance_labels) and np.array_equal(x.coords, z.coords)
            neg = x.instance_labels.numpy() == 0
            assert np.array_equal(x.instances.numpy()[neg], z.instances.numpy()[neg])
            if x.label:
                n_pos += 1
                assert not np.allclose(x.instances.numpy()[~neg], z.instances.numpy()[~neg])
    assert n_pos == 30
    # against the hard level at the same lesion signal the lesion patches still differ (their texture)
    for ds_h, ds_s in zip(het, hard):
        for x, z in zip(ds_h, ds_s):
            pos = x.instance_labels.numpy() == 1
            if pos.any():
                assert not np.allclose(x.instances.numpy()[pos], z.instances.numpy()[pos])


def test_lesion_textures_have_cosine_rho_and_differ_between_lesions(both):
    gen, het, _ = both
    shared = lesion_textures(3, 1234)
    log = gen.lesion_log
    pos_ids = {b.bag_id for ds in het for b in ds if b.label}
    assert {bid for bid, _, _ in log} == pos_ids  # every positive slide's lesions, nobody else's
    assert 30 <= len(log) <= 60  # 1–2 lesions a positive slide
    own = np.stack([p for _, _, p in log]).astype(np.float64)
    for _, tex, p in log:
        assert np.linalg.norm(p) == pytest.approx(1.0, abs=1e-5)
        assert float(p @ shared[tex]) == pytest.approx(0.5, abs=1e-5)
        assert abs(p.mean()) < 1e-5  # zero-mean like the shared textures: no brightness cue
    cos = own @ own.T
    np.fill_diagonal(cos, 0)
    assert cos.max() < 0.9  # every lesion, in every split, its own pattern
    splits = {bid.split("_")[0] for bid, _, _ in log}
    assert splits == {"train", "val", "test"}


def test_lesion_pattern_formula():
    rng = np.random.default_rng(3)
    t = lesion_textures(1, 5)[0]
    assert np.allclose(lesion_pattern(t, 1.0, rng), t, atol=1e-6)
    p0 = lesion_pattern(t, 0.0, rng)
    assert abs(float(p0 @ t)) < 1e-6 and np.linalg.norm(p0) == pytest.approx(1.0, abs=1e-6)
    # the same family as lesion_textures: its first pattern is smooth_pattern of its stream
    assert np.allclose(smooth_pattern(np.random.default_rng(5 + 1)), t, atol=1e-6)
    for rho in (0.2, 0.5, 0.8):
        assert float(lesion_pattern(t, rho, rng) @ t) == pytest.approx(rho, abs=1e-6)


def test_bad_lesion_similarity_is_a_one_line_error_naming_the_key():
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="lesion_similarity") as err:
            build_experiment({"data": {"kind": "hard_bags", "level": "hard-heterogeneous", "lesion_similarity": bad},
                              "method": {"name": "pseudo_label"}})
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError, match="lesion_similarity"):
            HardBagsConfig(level="hard", lesion_similarity=bad)


def test_probe_calibration_of_the_level():
    from milkit.data.hard_bags import linear_probe_auroc

    # the calibrated ceiling (module doc: signal 5.75 → 0.923), the benchmark's data
    assert linear_probe_auroc(HardBagsConfig(level="hard-heterogeneous").build(0)) == pytest.approx(0.9226, abs=0.003)


def test_heterogeneous_level_on_the_cli(level_on_the_cli):
    import milkit.benchmarks.hard_bags as hb

    levels, data = level_on_the_cli("hard-heterogeneous")
    assert levels == ["hard-heterogeneous"] and data.similarity == 0.5
    # the registered hard-confounded rule keeps the five levels it was registered with
    assert all("hard-heterogeneous" not in levels for _, levels, _ in hb.CONFOUNDER_RULE)

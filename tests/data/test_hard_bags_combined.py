"""Level ``hard-combined`` of ``hard_bags`` (issue 11): the hard level's slides with the confounder of
``hard-confounded``, the look-alike foci of ``hard-mimic`` and the per-lesion textures of
``hard-heterogeneous`` at once, each at its own level's absolute setting."""

import numpy as np
import pytest

from milkit.data.hard_bags import HardBagsConfig, HardBagsGenerator, lesion_textures

SMALL = dict(n_train=20, n_val=20, n_test=20, min_side=8, max_side=9)
SPLITS = ("train", "val", "test")


def _splits(level: str, **kw):
    sp = HardBagsConfig(level=level, **SMALL, **kw).build(0)
    return [sp.train, sp.val, sp.test]


@pytest.fixture(scope="module")
def levels():
    gen = HardBagsGenerator(HardBagsConfig(level="hard-combined", **SMALL), 0)
    combined = [gen.split(name, 20) for name in SPLITS]
    return gen, combined, _splits("hard-confounded"), _splits("hard-mimic")


def test_level_settings():
    cfg = HardBagsConfig(level="hard-combined")
    assert cfg.strength == 7.0 and cfg.mimic_base == 3.0 and cfg.similarity == 0.5
    assert cfg.confounding == 0.8 and cfg.focal_mimics == (0.9, 0.4)
    assert cfg.rates == HardBagsConfig(level="hard").rates
    # hard-mimic's foci still scale with its own lesion signal (its mimic base is its signal)
    assert HardBagsConfig(level="hard-mimic", signal=4.0).mimic_base == 4.0


def test_combined_is_confounded_outside_lesions_and_foci_and_mimic_on_foci(levels):
    _, comb, conf, mimic = levels
    n_foci = n_conf = 0
    for ds_c, ds_f, ds_m in zip(comb, conf, mimic):
        for x, f, m in zip(ds_c, ds_f, ds_m):
            assert x.bag_id == f.bag_id == m.bag_id and x.label == f.label
            assert np.array_equal(x.instance_labels, f.instance_labels) and np.array_equal(x.coords, f.coords)
            assert x.meta["confounder"] == f.meta["confounder"] != 0  # hard-confounded's signs
            foci = x.meta["mimic"].numpy()
            assert np.array_equal(foci, m.meta["mimic"].numpy())  # hard-mimic's foci
            n_foci += int(foci.any())
            n_conf += int(x.meta["confounder"] == 2 * x.label - 1)
            plain = (x.instance_labels.numpy() == 0) & ~foci
            assert np.array_equal(x.instances.numpy()[plain], f.instances.numpy()[plain])
            if foci.any():
                assert not np.allclose(x.instances.numpy()[foci], f.instances.numpy()[foci])
            les = x.instance_labels.numpy() == 1
            if les.any():  # own textures at signal 7.0, not hard-confounded's shared ones at 3.0
                assert not np.allclose(x.instances.numpy()[les], f.instances.numpy()[les])
    # foci in 0.9 of the positive and 0.4 of the negative slides of every split (10 + 10 each)
    assert n_foci == 3 * (9 + 4)
    # the confounder follows the label in 80 % of train / validation and half of test slides
    assert n_conf == 16 + 16 + 10


def test_foci_amplitude_is_hard_mimics(levels):
    """The look-alike added to a focus patch is hard-mimic's (base 3.0), not scaled by the lesion signal 7.0:
    with the stain and the confounder switched off, a focus patch of both levels is the same patch."""
    off = dict(stain=0.0, confounder_strength=0.0, pixel_noise=0.0)
    comb, mimic = _splits("hard-combined", **off), _splits("hard-mimic", **off)
    n = 0
    for ds_c, ds_m in zip(comb, mimic):
        for x, m in zip(ds_c, ds_m):
            foci = x.meta["mimic"].numpy()
            n += int(foci.sum())
            assert np.array_equal(x.instances.numpy()[foci], m.instances.numpy()[foci])
    assert n > 0


def test_every_lesion_has_its_own_texture(levels):
    gen, comb, _, _ = levels
    shared = lesion_textures(3, 1234)
    assert {bid for bid, _, _ in gen.lesion_log} == {b.bag_id for ds in comb for b in ds if b.label}
    for _, tex, p in gen.lesion_log:
        assert float(p @ shared[tex]) == pytest.approx(0.5, abs=1e-5)


def test_probe_calibration_of_the_level():
    from milkit.data.hard_bags import linear_probe_auroc

    # the calibrated ceiling (module doc: signal 7.0 → 0.901, inside the 0.90–0.95), the benchmark's data
    assert linear_probe_auroc(HardBagsConfig(level="hard-combined").build(0)) == pytest.approx(0.9010, abs=0.003)


def test_combined_level_on_the_cli(level_on_the_cli):
    import milkit.benchmarks.hard_bags as hb

    levels, data = level_on_the_cli("hard-combined")
    assert levels == ["hard-combined"]
    assert data.strength == 7.0 and data.confounding == 0.8 and data.focal_mimics == (0.9, 0.4)
    assert all("hard-combined" not in levels for _, levels, _ in hb.CONFOUNDER_RULE)

"""``data.group_column``: slides of one site (scanner, centre…) stay in one split, so that validation and
test hold sites the model did not train on (a site shortcut shared by train and validation is invisible
to any verdict computed on validation: docs/benchmarks.md, hard-combined)."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from milkit.config import ConfigError, build_experiment
from milkit.data.features import FeatureBagsConfig

SITES = "ABCDEFGH"


def _cohort(tmp_path, n_per_site=4, sites=SITES, extra=None, header="slide_id,label,case_id,site"):
    feats = tmp_path / "f"
    feats.mkdir(parents=True, exist_ok=True)
    rows = []
    for si, site in enumerate(sites):
        for k in range(n_per_site):
            sid = f"{site}{k}"
            with h5py.File(feats / f"{sid}.h5", "w") as f:
                f.create_dataset("features", data=np.full((3, 4), si + k, dtype=np.float32))
                f.create_dataset("coords", data=np.zeros((3, 2), dtype=np.int64))
            rows.append(f"{sid},{k % 2},{sid},{site}")  # every site holds both classes
    rows += extra or []
    csv = tmp_path / "labels.csv"
    csv.write_text(header + "\n" + "\n".join(rows) + "\n")
    return feats, csv


def _sites(ds):
    return {ds.table.rows[i].group for i in ds.indices}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fractions_split_keeps_every_site_in_one_split(tmp_path, seed):
    feats, csv = _cohort(tmp_path)
    sp = FeatureBagsConfig(features_dir=feats, labels_csv=csv, group_column="site").build(seed)
    tr, va, te = (_sites(d) for d in (sp.train, sp.val, sp.test))
    assert tr and va and te
    assert not (tr & va) and not (tr & te) and not (va & te)
    assert tr | va | te == set(SITES)
    # without the option the case grouping alone mixes sites across splits (the default is unchanged)
    plain = FeatureBagsConfig(features_dir=feats, labels_csv=csv).build(seed)
    assert plain.train.table.rows[0].group is None
    sites_of = lambda d: {d.table.rows[i].slide_id[0] for i in d.indices}  # noqa: E731
    assert sites_of(plain.train) & sites_of(plain.val) or sites_of(plain.train) & sites_of(plain.test)


def test_kfold_split_keeps_sites_apart(tmp_path):
    feats, csv = _cohort(tmp_path)
    for fold in range(4):
        sp = FeatureBagsConfig(features_dir=feats, labels_csv=csv, group_column="site", split_mode="kfold",
                               folds=4, fold=fold, val_fraction=0.2).build(0)
        tr, va, te = (_sites(d) for d in (sp.train, sp.val, sp.test))
        assert not (tr & va) and not (tr & te) and not (va & te) and va and te


def test_carved_validation_is_whole_sites(tmp_path):
    feats, csv = _cohort(tmp_path, header="slide_id,label,case_id,site,split")
    lines = csv.read_text().splitlines()
    rows = [f"{r},{'test' if r.split(',')[3] in 'GH' else 'train'}" for r in lines[1:]]
    csv.write_text(lines[0] + "\n" + "\n".join(rows) + "\n")
    sp = FeatureBagsConfig(features_dir=feats, labels_csv=csv, group_column="site", val_fraction=0.2).build(0)
    assert _sites(sp.test) == {"G", "H"}
    assert _sites(sp.val) and not (_sites(sp.val) & _sites(sp.train))


def test_csv_split_that_straddles_a_site_is_a_one_line_error(tmp_path):
    feats, csv = _cohort(tmp_path, sites="AB", header="slide_id,label,case_id,site,split")
    lines = csv.read_text().splitlines()
    splits = ["train", "train", "val", "test", "train", "val", "test", "test"]
    csv.write_text(lines[0] + "\n" + "\n".join(f"{r},{s}" for r, s in zip(lines[1:], splits)) + "\n")
    with pytest.raises(ValueError, match=r"site \(data.group_column\) 'A' has slides in both train and val") as e:
        FeatureBagsConfig(features_dir=feats, labels_csv=csv, group_column="site").build(0)
    assert "\n" not in str(e.value) and "labels.csv" in str(e.value)
    # the same CSV without the option is accepted (the case grouping alone holds)
    FeatureBagsConfig(features_dir=feats, labels_csv=csv).build(0)


def test_bad_group_column_inputs_are_one_line_errors_naming_file_and_key(tmp_path):
    feats, csv = _cohort(tmp_path, sites="ABCD")
    with pytest.raises(ValueError, match=r"labels.csv: no group column 'centre' \(data.group_column\)"):
        FeatureBagsConfig(features_dir=feats, labels_csv=csv, group_column="centre").build(0)
    csv.write_text(csv.read_text() + "Z9,1,Z9,\n")
    (feats / "Z9.h5").write_bytes((feats / "A0.h5").read_bytes())
    with pytest.raises(ValueError, match=r"line 18: empty 'site' \(data.group_column\) for slide 'Z9'"):
        FeatureBagsConfig(features_dir=feats, labels_csv=csv, group_column="site").build(0)


def test_a_case_in_two_sites_and_too_few_sites_are_named(tmp_path):
    feats, csv = _cohort(tmp_path, sites="ABCD")
    text = csv.read_text().replace("B1,1,B1,B", "B1,1,A0,B")  # patient A0's second slide scanned at site B
    csv.write_text(text)
    with pytest.raises(ValueError, match=r"case 'A0' has slides in site 'A' and 'B'"):
        FeatureBagsConfig(features_dir=feats, labels_csv=csv, group_column="site").build(0)
    feats2, csv2 = _cohort(tmp_path / "two", sites="AB")
    with pytest.raises(ValueError, match=r"data.group_column 'site': its 2 groups are too few for a (val|test) split"):
        FeatureBagsConfig(features_dir=feats2, labels_csv=csv2, group_column="site").build(0)


def test_group_column_through_the_config_is_a_config_error(tmp_path):
    feats, csv = _cohort(tmp_path, sites="ABCD")
    raw = {"data": {"kind": "feature_bags", "features_dir": str(feats), "labels_csv": str(csv),
                    "group_column": "centre"}, "method": {"name": "mil", "model": {"name": "abmil"}}}
    exp = build_experiment(raw)  # the key is valid; the CSV is read when the data are built
    assert exp.data.group_column == "centre"
    with pytest.raises(ValueError, match="no group column 'centre'"):
        exp.data.build(0)
    with pytest.raises(ConfigError, match="group_column"):
        build_experiment({**raw, "data": {**raw["data"], "group_column": 3}})

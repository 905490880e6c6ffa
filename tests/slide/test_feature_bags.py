"""Feature bags (milkit/TRIDENT, CLAM h5/pt, torchmil layouts), labels CSV, splits."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from milkit.config import ConfigError, build_experiment
from milkit.data.features import FeatureBagsConfig, read_h5_features, read_labels_csv
from milkit.data.splits import kfold_splits, stratified_group_split


def _write_h5(path, n=6, d=4, coords_n=None, attrs=True, coords_dtype=np.int64):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=rng.normal(size=(n, d)).astype(np.float32))
        xs = np.arange(coords_n if coords_n is not None else n) * 256
        c = f.create_dataset("coords", data=np.stack([xs, np.zeros_like(xs)], 1).astype(coords_dtype))
        if attrs:
            c.attrs["patch_size"] = 256
            c.attrs["patch_size_level0"] = 256


def _labels(path, rows, header="slide_id,label"):
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return path


def test_cohort_bags_have_level0_coords_graph_and_annotation_labels(cohort):
    cfg = FeatureBagsConfig(features_dir=cohort.tiles_dir, labels_csv=cohort.labels_csv,
                            annotations_dir=cohort.ann_dir, graph=True)
    splits = cfg.build(seed=0)
    assert [len(splits.train), len(splits.val), len(splits.test)] == [6, 2, 2]
    bag = splits.train[0]
    assert bag.bag_id == "s00" and bag.label == 1
    assert bag.instances.dtype == torch.float32 and bag.instances.shape[1] == 32
    assert bag.coords.shape == (len(bag), 2) and int(bag.coords[:, 0].min()) % 64 == 0
    assert 0 < int(bag.instance_labels.sum()) < len(bag)  # lesion patches from the ASAP XML
    assert int(splits.train[1].instance_labels.sum()) == 0  # negative slide, no annotation
    assert bag.adj.num_nodes == len(bag) and bag.adj.num_edges > 0
    assert splits.train.labels == [1, 0, 1, 0, 1, 0]


def test_h5_coords_feature_length_mismatch_is_named(tmp_path):
    _write_h5(tmp_path / "bad.h5", n=6, coords_n=5)
    with pytest.raises(ValueError, match=r"bad\.h5: 6 feature rows but 5 coords"):
        read_h5_features(tmp_path / "bad.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"junk\.h5: not a readable HDF5"):
        read_h5_features(tmp_path / "junk.h5")


def test_check_h5_features_refuses_what_reading_refuses_without_reading_the_data(tmp_path):
    from milkit.data.features import check_h5_features

    _write_h5(tmp_path / "ok.h5")
    check_h5_features(tmp_path / "ok.h5", whole_slide=True)
    _write_h5(tmp_path / "bad.h5", n=6, coords_n=5)
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    _write_h5(tmp_path / "noattrs.h5", attrs=False)
    with h5py.File(tmp_path / "nofeat.h5", "w") as f:
        f.create_dataset("coords", data=np.zeros((3, 2), np.int64))
    for name, msg in (("bad", r"6 feature rows but 5 coords"), ("junk", "not a readable HDF5"),
                      ("nofeat", "no 'features' dataset")):
        with pytest.raises(ValueError, match=msg):
            read_h5_features(tmp_path / f"{name}.h5")
        with pytest.raises(ValueError, match=rf"{name}\.h5: {msg}"):
            check_h5_features(tmp_path / f"{name}.h5")
    check_h5_features(tmp_path / "noattrs.h5", whole_slide=True)  # CLAM: the size is the grid's step ...
    _write_h5(tmp_path / "one.h5", n=1, attrs=False)
    check_h5_features(tmp_path / "one.h5")
    with pytest.raises(ValueError, match="one.h5: whole-slide outputs need a patch_size_level0 attribute"):
        check_h5_features(tmp_path / "one.h5", whole_slide=True)  # ... which one patch does not have


def test_labels_naming_missing_slides_is_named(tmp_path):
    feats = tmp_path / "feats"
    feats.mkdir()
    _write_h5(feats / "a.h5")
    csv = _labels(tmp_path / "labels.csv", ["a,1", "ghost,0", "phantom,1"])
    cfg = FeatureBagsConfig(features_dir=feats, labels_csv=csv)
    with pytest.raises(ValueError, match=r"labels\.csv: 2 labelled slide\(s\) have no feature file.*ghost, phantom"):
        cfg.build(0)


TCGA = ["TCGA-3C-AALI-01Z-00-DX1.F6E9A5DF-D8FB-45CF-B4BD-C6B76294C291",
        "TCGA-3C-AALI-01Z-00-DX2.CF4496E0-AB52-4F3E-BDF5-C34833B91B7C"]  # one patient's two diagnostic slides


def test_tcga_slide_ids_keep_the_part_after_their_dot(tmp_path):
    """TCGA slide ids hold a dot; only a slide or feature file extension is dropped from a CSV cell. Before, the
    UUID after the dot was cut off as if it were an extension: two slides differing only after it became one id,
    and no file matched it."""
    rows = read_labels_csv(_labels(tmp_path / "l.csv", [f"{TCGA[0]},1", f"{TCGA[1]}.svs,0", "a.b.h5,1", "v2.1,0"]))
    assert [r.slide_id for r in rows] == [TCGA[0], TCGA[1], "a.b", "v2.1"]
    feats = tmp_path / "f"
    feats.mkdir()
    for i in range(8):
        _write_h5(feats / f"{TCGA[0][:-2]}{i:02d}.h5")
    csv = _labels(tmp_path / "l2.csv", [f"{TCGA[0][:-2]}{i:02d},{i % 2}" for i in range(8)])
    sp = FeatureBagsConfig(features_dir=feats, labels_csv=csv).build(0)
    assert len(sp.train) + len(sp.val) + len(sp.test) == 8


def test_labels_csv_aliases_and_errors(tmp_path):
    rows = read_labels_csv(_labels(tmp_path / "l.csv", ["s1.svs,1,p1", "s2.ndpi,0,p1"], "wsi,label,patient"))
    assert [(r.slide_id, r.label, r.case_id) for r in rows] == [("s1", 1, "p1"), ("s2", 0, "p1")]
    with pytest.raises(ValueError, match=r"l2\.csv: line 3: label 'maybe'"):
        read_labels_csv(_labels(tmp_path / "l2.csv", ["a,1", "b,maybe"]))
    with pytest.raises(ValueError, match="no slide column"):
        read_labels_csv(_labels(tmp_path / "l3.csv", ["a,1"], "name,label"))
    with pytest.raises(ValueError, match="listed twice"):
        read_labels_csv(_labels(tmp_path / "l4.csv", ["a,1", "a,0"]))
    with pytest.raises(FileNotFoundError, match="nofile.csv"):
        read_labels_csv(tmp_path / "nofile.csv")


def test_label_map_reads_clam_label_names_and_drops_null(tmp_path):
    """CLAM's dataset CSVs (case_id,slide_id,label with label_dict names, ignore list) through data.label_map."""
    csv = _labels(tmp_path / "clam.csv", ["p1,a,tumor_tissue", "p1,b,normal_tissue", "p2,c,itc"],
                  "case_id,slide_id,label")
    with pytest.raises(ValueError, match=r"clam\.csv: line 2: label 'tumor_tissue' is not binary.*data\.label_map"):
        read_labels_csv(csv)
    rows = read_labels_csv(csv, label_map={"normal_tissue": 0, "tumor_tissue": 1, "itc": None})
    assert [(r.slide_id, r.label, r.case_id) for r in rows] == [("a", 1, "p1"), ("b", 0, "p1")]
    with pytest.raises(ValueError, match=r"clam\.csv: line 4: label 'itc' is not in data\.label_map"):
        read_labels_csv(csv, label_map={"normal_tissue": 0, "tumor_tissue": 1})
    with pytest.raises(ValueError, match="every slide's label is mapped to null"):
        read_labels_csv(csv, label_map={"normal_tissue": None, "tumor_tissue": None, "itc": None})
    feats = tmp_path / "feats"
    feats.mkdir()
    for sid in "ab":  # no feature file for the dropped slide c: it is not asked for
        _write_h5(feats / f"{sid}.h5")
    table_cfg = FeatureBagsConfig(features_dir=feats, labels_csv=csv, split_mode="fractions",
                                  label_map={"normal_tissue": 0, "tumor_tissue": 1, "itc": None})
    from milkit.data.features import FeatureTable
    assert [r.label for r in FeatureTable.from_config(table_cfg).rows] == [1, 0]
    for bad, msg in (({"x": 2}, "label_map values must be 0, 1 or null"), ({}, "label_map is empty")):
        with pytest.raises(ConfigError, match=rf"data\.label_map.*{msg}|{msg}"):
            build_experiment({"data": {"kind": "feature_bags", "features_dir": str(feats), "labels_csv": str(csv),
                                       "label_map": bad}, "method": {"name": "mil", "model": {"name": "abmil"}}})


def test_config_errors_through_experiment(tmp_path):
    with pytest.raises(ConfigError, match="data.bogus"):
        build_experiment({"data": {"kind": "feature_bags", "features_dir": str(tmp_path), "bogus": 1},
                          "method": {"name": "mil"}})


def test_clam_h5_and_pt_layouts(tmp_path):
    root = tmp_path / "clam"
    (root / "h5_files").mkdir(parents=True)
    (root / "pt_files").mkdir()
    for i in range(4):
        _write_h5(root / "h5_files" / f"c{i}.h5", n=3 + i, attrs=False, coords_dtype=np.int32)
        with h5py.File(root / "h5_files" / f"c{i}.h5") as f:
            torch.save(torch.from_numpy(f["features"][()]), root / "pt_files" / f"c{i}.pt")
    csv = _labels(tmp_path / "l.csv", ["c0,1,train", "c1,0,train", "c2,1,val", "c3,0,test"], "slide_id,label,split")
    h5 = FeatureBagsConfig(features_dir=root, labels_csv=csv).build(0)
    assert h5.train[0].coords.dtype == torch.int64 and len(h5.train[0]) == 3
    pt = FeatureBagsConfig(features_dir=root / "pt_files", labels_csv=csv, layout="clam_pt").build(0)
    torch.testing.assert_close(pt.train[1].instances, h5.train[1].instances)
    torch.testing.assert_close(pt.train[1].coords, h5.train[1].coords)  # coords from h5_files/


def test_torchmil_layout_grid_coords_to_level0(tmp_path):
    root = tmp_path / "tm"
    for sub in ("features", "labels", "patch_labels", "coords"):
        (root / sub).mkdir(parents=True)
    names = ["b0", "b1", "b2", "b3"]
    for i, n in enumerate(names):
        np.save(root / "features" / f"{n}.npy", np.full((3, 2), i, np.float32))
        inst = np.array([0, i % 2, 0])
        np.save(root / "patch_labels" / f"{n}.npy", inst)
        np.save(root / "labels" / f"{n}.npy", np.array(inst.max()))
        np.save(root / "coords" / f"{n}.npy", np.array([[0, 0], [1, 0], [1, 1]]))
    (root / "splits.csv").write_text("bag_name,split\nb0,train\nb1,train\nb2,val\nb3,test\n")
    s = FeatureBagsConfig(features_dir=root, patch_size_level0=512).build(0)
    b1 = s.train[1]
    assert b1.bag_id == "b1" and b1.label == 1 and b1.instance_labels.tolist() == [0, 1, 0]
    assert b1.coords.tolist() == [[0, 0], [512, 0], [512, 512]]
    np.save(root / "coords" / "b3.npy", np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"b3\.npy: 2 coords but 3 feature rows"):
        _ = s.test[0]


def test_split_column_may_not_straddle_cases(tmp_path):
    feats = tmp_path / "f"
    feats.mkdir()
    for n in "abcd":
        _write_h5(feats / f"{n}.h5")
    csv = _labels(tmp_path / "l.csv", ["a,1,p1,train", "b,0,p1,test", "c,1,p2,val", "d,0,p3,test"],
                  "slide_id,label,case_id,split")
    with pytest.raises(ValueError, match="case 'p1' has slides in both train and test"):
        FeatureBagsConfig(features_dir=feats, labels_csv=csv).build(0)


def test_stratified_group_split_fractions_groups_and_seed():
    y = np.array([1] * 40 + [0] * 60)
    groups = np.repeat(np.arange(50), 2)  # two slides per case, same label
    parts = stratified_group_split(y, groups, (0.7, 0.1, 0.2), seed=0)
    assert sorted(np.concatenate(parts).tolist()) == list(range(100))
    case_sets = [set(groups[p]) for p in parts]
    assert not (case_sets[0] & case_sets[1] or case_sets[0] & case_sets[2] or case_sets[1] & case_sets[2])
    assert [len(p) for p in parts] == [70, 10, 20]
    assert [int(y[p].sum()) for p in parts] == [28, 4, 8]  # 70/10/20 of the 40 positives
    again = stratified_group_split(y, groups, (0.7, 0.1, 0.2), seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = stratified_group_split(y, groups, (0.7, 0.1, 0.2), seed=1)
    assert not np.array_equal(parts[2], other[2])
    # tiny cohort: every split still gets one case of each class
    small = stratified_group_split([1, 1, 1, 0, 0, 0], None, (0.7, 0.1, 0.2), seed=0)
    assert all(set(np.array([1, 1, 1, 0, 0, 0])[p]) == {0, 1} for p in small)
    with pytest.raises(ValueError, match="sum to 1"):
        stratified_group_split(y, groups, (0.5, 0.1, 0.1))


def test_kfold_tests_partition_and_respect_cases():
    y = np.array([1, 0] * 25)
    groups = np.repeat(np.arange(25), 2)
    folds = kfold_splits(y, groups, k=5, seed=0, val_fraction=0.1)
    assert len(folds) == 5
    tests = np.concatenate([f[2] for f in folds])
    assert sorted(tests.tolist()) == list(range(50))
    for tr, va, te in folds:
        assert len(set(groups[tr]) & set(groups[te])) == 0 and len(set(groups[va]) & set(groups[te])) == 0
        assert len(set(groups[tr]) & set(groups[va])) == 0
        assert len(tr) + len(va) + len(te) == 50 and len(va) > 0
    with pytest.raises(ValueError, match="at least 5 cases"):
        kfold_splits([0, 1, 0], None, k=5)


def test_provenance_reads_the_attributes_and_skips_what_is_not_recorded(tmp_path):
    from milkit.data.features import file_provenance, provenance

    _write_h5(tmp_path / "a.h5")
    _write_h5(tmp_path / "b.h5", attrs=False)  # CLAM h5_files: nothing recorded
    with h5py.File(tmp_path / "a.h5", "a") as f:
        f.attrs["encoder"] = "resnet50_trunc:imagenet"
        f["coords"].attrs["target_mpp"] = 0.5
    assert file_provenance(tmp_path / "a.h5") == {"encoder": "resnet50_trunc:imagenet", "target_mpp": 0.5,
                                                 "patch_size": 256}
    assert file_provenance(tmp_path / "b.h5") == {"encoder": None, "target_mpp": None, "patch_size": None}
    assert provenance([tmp_path / "a.h5", tmp_path / "b.h5"]) == {
        "encoder": ["resnet50_trunc:imagenet"], "target_mpp": [0.5], "patch_size": [256]}


def test_a_positive_slide_without_annotation_has_unknown_patch_labels(cohort, tmp_path, caplog):
    import logging
    import shutil

    few = tmp_path / "few"
    shutil.copytree(cohort.ann_dir, few)
    (few / "s00.xml").unlink()
    cfg = FeatureBagsConfig(features_dir=cohort.tiles_dir, labels_csv=cohort.labels_csv, annotations_dir=few)
    with caplog.at_level(logging.INFO, logger="milkit"):
        splits = cfg.build(seed=0)
    assert "1 positive slide(s) have no annotation" in caplog.text and "(s00)" in caplog.text
    s00, s01, s02 = (splits.train[i] for i in range(3))
    assert s00.bag_id == "s00" and s00.label == 1 and s00.instance_labels is None  # unknown, not negative
    assert s01.label == 0 and int(s01.instance_labels.sum()) == 0  # negative, no annotation: all negative
    assert s02.label == 1 and int(s02.instance_labels.sum()) > 0


def test_a_negative_slide_with_a_tumour_annotation_is_warned_about(cohort, tmp_path, caplog):
    import logging
    import shutil

    ann = tmp_path / "ann"
    shutil.copytree(cohort.ann_dir, ann)
    shutil.copy(ann / "s00.xml", ann / "s01.xml")  # s01 is labelled negative; s00's lesion lies on its tissue
    cfg = FeatureBagsConfig(features_dir=cohort.tiles_dir, labels_csv=cohort.labels_csv, annotations_dir=ann)
    splits = cfg.build(seed=0)
    with caplog.at_level(logging.WARNING, logger="milkit"):
        s01 = splits.train[1]
    assert s01.bag_id == "s01" and int(s01.instance_labels.sum()) > 0
    assert "s01.xml: slide 's01' is labelled negative" in caplog.text


def test_a_file_with_review_regions_labels_patches_only_inside_them(cohort, tmp_path):
    import json
    import shutil

    from milkit.slide.annotations import read_asap_xml

    ann = tmp_path / "ann"
    shutil.copytree(cohort.ann_dir, ann)
    lesion = read_asap_xml(ann / "s00.xml")[0].exterior
    (ann / "s00.xml").unlink()
    half = [[0, 0], [512, 0], [512, 1024], [0, 1024], [0, 0]]  # the left half of the 1024-px slide was reviewed
    feats = [{"type": "Feature", "properties": {"classification": {"name": "Review"}},
              "geometry": {"type": "Polygon", "coordinates": [half]}},
             {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
              "geometry": {"type": "Polygon", "coordinates": [lesion.tolist() + [lesion[0].tolist()]]}}]
    (ann / "s00.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    full = FeatureBagsConfig(features_dir=cohort.tiles_dir, labels_csv=cohort.labels_csv,
                             annotations_dir=cohort.ann_dir).build(seed=0).train[0]
    part = FeatureBagsConfig(features_dir=cohort.tiles_dir, labels_csv=cohort.labels_csv,
                             annotations_dir=ann).build(seed=0).train[0]
    left = part.coords[:, 0] + 32 <= 512  # patches (64 px) with at least half their area left of x = 512
    assert part.bag_id == "s00" and left.any() and (~left).any()
    out = part.instance_labels[~left]  # outside: unknown, except the drawn tumour, which counts anywhere
    assert torch.equal(out, torch.where(full.instance_labels[~left] == 1, 1, -1)) and (out == -1).any()
    assert torch.equal(part.instance_labels[left], full.instance_labels[left])


def test_qupath_geojson_of_a_slide_with_bounds_is_shifted_to_level0(cohort, tmp_path):
    """QuPath's coordinates start at the slide's bounds origin (MRXS, cropped scans); the h5 records
    it (bounds_x/y, as milkit tile writes them), so the training labels match the ASAP XML's."""
    import json
    import shutil

    from milkit.slide.annotations import read_asap_xml

    feats, ann = tmp_path / "feats", tmp_path / "ann"
    shutil.copytree(cohort.tiles_dir, feats)
    shutil.copytree(cohort.ann_dir, ann)
    with h5py.File(feats / "s00.h5", "a") as f:
        f["coords"].attrs["bounds_x"], f["coords"].attrs["bounds_y"] = 100, 50
    lesion = read_asap_xml(ann / "s00.xml")[0].exterior - np.array([100, 50])
    (ann / "s00.xml").unlink()
    ring = lesion.tolist() + [lesion[0].tolist()]
    (ann / "s00.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "Polygon", "coordinates": [ring]}}]}))
    want = FeatureBagsConfig(features_dir=cohort.tiles_dir, labels_csv=cohort.labels_csv,
                             annotations_dir=cohort.ann_dir).build(seed=0).train[0]
    got = FeatureBagsConfig(features_dir=feats, labels_csv=cohort.labels_csv, annotations_dir=ann).build(seed=0).train[0]
    assert got.bag_id == "s00" and int(want.instance_labels.sum()) > 0
    assert torch.equal(got.instance_labels, want.instance_labels)


def _ann(path, x0, y0, side):
    pts = [(x0, y0), (x0 + side, y0), (x0 + side, y0 + side), (x0, y0 + side)]
    coords = "".join(f'<Coordinate Order="{i}" X="{x}" Y="{y}"/>' for i, (x, y) in enumerate(pts))
    path.write_text('<?xml version="1.0"?><ASAP_Annotations><Annotations><Annotation Name="A" Type="Polygon" '
                    f'PartOfGroup="Tumor"><Coordinates>{coords}</Coordinates></Annotation></Annotations>'
                    '<AnnotationGroups/></ASAP_Annotations>')


def test_training_annotations_outside_the_slide_or_missing_every_patch_are_named(cohort, tmp_path, caplog):
    """Training and evaluation read the same rule as evaluate --annotations (issue 13's open item): tumour drawn
    wholly outside the slide (a wrong offset) is an error naming the file; tumour that covers no patch warns."""
    import logging
    import shutil

    ann = tmp_path / "ann"
    shutil.copytree(cohort.ann_dir, ann)
    _ann(ann / "s00.xml", 10 ** 6, 10 ** 6, 500)  # far outside the slide
    cfg = FeatureBagsConfig(features_dir=cohort.tiles_dir, labels_csv=cohort.labels_csv, annotations_dir=ann)
    def read_all():
        sp = cfg.build(0)
        return [b for part in (sp.train, sp.val, sp.test) for b in part]

    with pytest.raises(ValueError, match=r"s00\.xml: every tumour polygon lies outside the"):
        read_all()
    _ann(ann / "s00.xml", 0, 0, 8)  # inside, but smaller than any patch's half
    with caplog.at_level(logging.WARNING, logger="milkit"):
        read_all()
    assert "s00.xml: its tumour covers none of slide 's00'" in caplog.text


def test_csvs_as_excel_saves_them(tmp_path):
    """Excel in a locale with a decimal comma saves CSV with ';' between cells, and a byte-order mark with
    "CSV UTF-8"; a hand-written CSV may pad its cells. Before, the labels CSV read one column
    ``slide_id;label;split`` ("no slide column"), and the MPP override CSV with a BOM said it had no slide_id
    column; a row without its mpp cell stopped with an unexpected TypeError."""
    from milkit.slide.reader import read_mpp_csv

    semi = tmp_path / "semi.csv"
    semi.write_bytes("\ufeffslide_id;label;split\r\na;1;train\r\nb;0;val\r\n".encode())
    assert [(r.slide_id, r.label, r.split) for r in read_labels_csv(semi)] == [("a", 1, "train"), ("b", 0, "val")]
    padded = _labels(tmp_path / "pad.csv", [" a , 1 , train", "b, normal ,test"], "slide_id, label , split")
    assert [(r.slide_id, r.label, r.split) for r in read_labels_csv(padded)] == [("a", 1, "train"), ("b", 0, "test")]
    mpp = tmp_path / "mpp.csv"
    mpp.write_bytes("\ufeffslide_id;mpp\nx.svs;0,25\ny;0.5\n".encode())
    assert read_mpp_csv(mpp) == {"x": 0.25, "y": 0.5}
    short = tmp_path / "short.csv"
    short.write_text("slide_id,mpp\nx,0.5\ny\n")
    with pytest.raises(ValueError, match=r"short\.csv: line 3: mpp '' is not a number"):
        read_mpp_csv(short)


def test_a_labels_csv_without_header_line_says_so(tmp_path):
    """Camelyon16's reference.csv (``test_001,Tumor,Macro,Major``) has no header line: its first row was read
    as column names, and the error listed them without saying why."""
    ref = tmp_path / "reference.csv"
    ref.write_text("test_001,Tumor,Macro,Major\ntest_002,Normal,,\n")
    with pytest.raises(ValueError, match=r"reference\.csv: no slide column.*first line looks like data.*slide_id,label"):
        read_labels_csv(ref)
    named = _labels(tmp_path / "named.csv", ["a,1"], "name,label")  # a real header: no such hint
    with pytest.raises(ValueError, match="no slide column") as err:
        read_labels_csv(named)
    assert "looks like data" not in str(err.value)

"""Outputs follow the umask; disk full and unexpected errors are one line; the CLI starts
without torch; splits without val are carved from train; config removal and pruning; BOM
CSVs; h5 attributes."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from cohort import make_cohort  # noqa: E402

from milkit import io  # noqa: E402
from milkit.cli import main  # noqa: E402


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture
def umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_every_io_writer_follows_the_umask(tmp_path, umask, mask, expected):
    umask(mask)
    io.write_text(tmp_path / "a.txt", "x")
    io.write_json(tmp_path / "sub" / "b.json", {"a": 1})
    io.save_state_dict(tmp_path / "c.pt", {})
    io.write_with(tmp_path / "d.h5", lambda t: h5py.File(t, "w").close())
    for name in ("a.txt", "sub/b.json", "c.pt", "d.h5"):
        assert mode(tmp_path / name) == expected, name
    assert mode(tmp_path / "sub") == 0o777 & ~mask
    assert not list(tmp_path.rglob("*.tmp"))


def test_rewrite_in_place_keeps_the_files_mode(tmp_path, umask):
    umask(0o022)
    p = tmp_path / "features.h5"
    io.write_text(p, "old")
    os.chmod(p, 0o664)
    io.write_text(p, "new")
    assert mode(p) == 0o664 and p.read_text() == "new"
    os.chmod(p, 0o600)
    io.write_text(p, "newer")
    assert mode(p) == 0o600


def test_cli_outputs_follow_the_umask(tmp_path, umask):
    umask(0o027)
    assert main(["configs", "--copy", "slides/abmil_features.yaml", "--to", str(tmp_path)]) == 0
    assert mode(tmp_path / "abmil_features.yaml") == 0o640


def test_disk_full_is_one_line_naming_the_file_and_leaves_no_run(tmp_path, monkeypatch, capsys):
    c = make_cohort(tmp_path)
    real = Path.write_text

    def full(self, *a, **k):
        if self.name.startswith(".config.yaml."):
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "write_text", full)
    capsys.readouterr()
    assert main(["train", str(c["config"]), "--out", str(tmp_path / "run")]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("milkit: ")]
    assert len(err) == 1 and "disk full" in err[0] and str(tmp_path / "run" / "config.yaml") in err[0], err
    assert not (tmp_path / "run").exists()


def test_unexpected_error_is_one_line_exit_1_and_debug_shows_it(tmp_path, monkeypatch, capsys):
    c = make_cohort(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr("milkit.workflow.train_run", boom)
    capsys.readouterr()
    assert main(["train", str(c["config"]), "--out", str(tmp_path / "run")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "RuntimeError: kaboom" in err[0] and "MILKIT_DEBUG=1" in err[0]
    monkeypatch.setenv("MILKIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="kaboom"):
        main(["train", str(c["config"]), "--out", str(tmp_path / "run")])


def test_help_configs_and_tile_help_do_not_import_torch():
    code = (
        "import sys\n"
        "from milkit.cli import main\n"
        "assert 'torch' not in sys.modules, 'import milkit.cli'\n"
        "for argv in (['--help'], ['configs'], ['tile', '--help'], ['train', '--help']):\n"
        "    assert main(argv) == 0, argv\n"
        "    assert 'torch' not in sys.modules, argv\n"
        "    assert 'lightning' not in sys.modules, argv\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_train_and_test_only_csv_carves_val_from_train(tmp_path, caplog):
    from milkit.config import build_experiment

    splits = ["train"] * 16 + ["test"] * 4
    c = make_cohort(tmp_path, splits=splits)
    rows = ["slide_id,label,split,case_id"] + [f"s{i:02d},{i % 2},{s},p{i // 2 if s == 'train' else i}"
                                              for i, s in enumerate(splits)]
    c["labels"].write_text("\n".join(rows) + "\n")  # train cases hold two slides each
    raw = yaml.safe_load(c["config"].read_text())
    raw["data"]["val_fraction"] = 0.25
    exp = build_experiment(raw)
    with caplog.at_level("WARNING", logger="milkit"):
        ds = exp.data.build(exp.seed)
    assert "no val split" in caplog.text and "labels.csv" in caplog.text
    assert len(ds.test) == 4 and len(ds.train) + len(ds.val) == 16 and len(ds.val) >= 2
    assert set(ds.val.labels) == {0, 1}  # stratified
    cases = lambda d: {d.table.rows[i].case_id for i in d.indices}  # noqa: E731
    assert not cases(ds.val) & cases(ds.train)  # grouped by case
    assert exp.to_dict()["data"]["val_from_train"] is True  # recorded in the resolved config
    again = build_experiment(exp.to_dict()).data.build(exp.seed)
    assert again.val.bag_ids == ds.val.bag_ids and again.train.bag_ids == ds.train.bag_ids


def test_resolved_config_drops_irrelevant_encoder_fields_and_records_in_dim(tmp_path):
    c = make_cohort(tmp_path)
    assert main(["train", str(c["config"]), "--out", str(tmp_path / "run"), "--set", "trainer.max_epochs=1"]) == 0
    enc = yaml.safe_load((tmp_path / "run/config.yaml").read_text())["method"]["encoder"]
    assert enc["in_dim"] == 8 and "in_channels" not in enc and "image_size" not in enc


def test_set_null_removes_a_key_so_a_model_can_be_switched():
    from milkit.config import apply_overrides, build_experiment

    raw = {"data": {"kind": "digit_bags"}, "method": {"name": "mil", "model": {"name": "abmil", "gated": True}}}
    with pytest.raises(ValueError, match=r"method\.model\.gated' does not exist .*--set method\.model\.gated=null"):
        build_experiment(apply_overrides(raw, ["method.model.name=maxpool"]))
    exp = build_experiment(apply_overrides(raw, ["method.model.name=maxpool", "method.model.gated=null"]))
    assert exp.method.model.name == "maxpool"
    d = exp.to_dict()["method"]["encoder"]
    assert d["name"] == "lenet5" and "in_dim" not in d and d["image_size"] == 28  # a CNN keeps its image fields


def test_utf8_bom_labels_csv_is_accepted(tmp_path):
    from milkit.data.features import read_labels_csv

    p = tmp_path / "labels.csv"
    p.write_bytes("\ufeffslide_id,label,split\r\na.svs,1,train\r\nb,0,test\r\n".encode("utf-8"))
    rows = read_labels_csv(p)
    assert [(r.slide_id, r.label, r.split) for r in rows] == [("a", 1, "train"), ("b", 0, "test")]


def test_h5_has_patch_level_and_no_none_strings(tmp_path):
    from milkit.slide.synthetic import make_slide
    from milkit.slide.tiling import TilingConfig, tile_slide

    s = make_slide(tmp_path, "nompp", False, seed=1, size=(512, 512), mpp=None)
    h5 = tile_slide(s.path, tmp_path / "t", TilingConfig(patch_size=32, downsample=2, tissue={"thumbnail_size": 128}))
    with h5py.File(h5) as f:
        a = dict(f["coords"].attrs)
    assert a["patch_level"] == 1 and a["downsample"] == 2  # the 2× level of the pyramid
    assert "mpp" not in a and "target_mpp" not in a
    assert not [k for k, v in a.items() if isinstance(v, (str, bytes)) and v in ("None", b"None")]


def test_tile_removes_its_stale_temp_files_only(tmp_path):
    from milkit.slide.synthetic import make_slide
    from milkit.slide.tiling import STALE_TMP_S, TilingConfig, tile_slides

    s = make_slide(tmp_path / "slides", "a", False, seed=0, size=(256, 256), mpp=0.25)
    out = tmp_path / "tiles"
    out.mkdir()
    old, fresh, mine = out / ".a.h5.x1y2z3.tmp", out / ".b.h5.q9w8e7.tmp", out / "notes.tmp"
    for p in (old, fresh, mine):
        p.write_bytes(b"partial")
    t = os.stat(old).st_mtime - STALE_TMP_S - 5
    os.utime(old, (t, t))
    os.utime(mine, (t, t))
    tile_slides([s.path], out, TilingConfig(patch_size=32, tissue={"thumbnail_size": 128}), progress=False)
    assert not old.exists() and fresh.exists() and mine.exists()  # a live writer's and the user's files stay
    assert (out / "a.h5").is_file()


def test_notices_go_to_the_current_stderr(monkeypatch):
    import io as _io
    import logging

    from milkit.cli import _log_notices

    first = _io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    _log_notices()
    first.close()  # e.g. an earlier test's captured stream
    second = _io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("milkit.test").info("carved")
    assert second.getvalue() == "milkit: carved\n"


def test_train_on_few_validation_slides_points_to_folds_before_the_verdict(tmp_path, capsys):
    """Two validation slides cannot check anything: `milkit train` says to cross-validate (the command to run),
    on stderr, before the verdict lines that end its output; a --folds run does not repeat it."""
    c = make_cohort(tmp_path, max_epochs=1)
    capsys.readouterr()
    assert main(["train", str(c["config"]), "--out", str(tmp_path / "run")]) == 0
    cap = capsys.readouterr()
    notice = [ln for ln in cap.err.splitlines() if "too few to check. With few slides, cross-validate" in ln]
    assert len(notice) == 1, cap.err
    assert f"milkit train {c['config']} --out {tmp_path / 'run'}-cv --folds 5" in notice[0]
    assert "2 validation slides (1 positive, 1 negative)" in notice[0]
    assert cap.out.strip().splitlines()[-1].startswith("verdict mil: ")
    assert main(["train", str(c["config"]), "--out", str(tmp_path / "cv"), "--folds", "3"]) == 0
    assert "cross-validate instead" not in capsys.readouterr().err


def test_relative_data_paths_are_recorded_absolute_so_the_run_works_from_any_folder(tmp_path, monkeypatch):
    c = make_cohort(tmp_path / "proj", max_epochs=1)
    raw = yaml.safe_load(c["config"].read_text())
    raw["data"].update(features_dir="feats", labels_csv="labels.csv")  # relative to the project folder
    c["config"].write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(tmp_path / "proj")
    assert main(["train", "exp.yaml", "--out", "run"]) == 0
    data = yaml.safe_load((tmp_path / "proj" / "run" / "config.yaml").read_text())["data"]
    assert data["features_dir"] == str(tmp_path / "proj" / "feats") and data["labels_csv"] == str(c["labels"])
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["evaluate", str(tmp_path / "proj" / "run")]) == 0
    assert main(["label", str(tmp_path / "proj" / "run"), "--split", "test"]) == 0
    # a run written with relative paths (before they were recorded absolute) still resumes from its folder
    monkeypatch.chdir(tmp_path / "proj")
    cfg = tmp_path / "proj" / "run" / "config.yaml"
    old = yaml.safe_load(cfg.read_text())
    old["data"].update(features_dir="feats", labels_csv="labels.csv")
    cfg.write_text(yaml.safe_dump(old, sort_keys=False))
    assert main(["train", "exp.yaml", "--out", "run", "--resume"]) == 0


def test_a_run_whose_data_moved_is_evaluated_and_labelled_with_data(tmp_path, capsys):
    """A run copied from the cluster to a laptop names data paths that are not there. Before, `milkit evaluate
    RUN` only said the folder did not exist, and evaluate had no way to be given the new paths."""
    c = make_cohort(tmp_path / "proj", max_epochs=1)
    run = tmp_path / "run"
    assert main(["train", str(c["config"]), "--out", str(run)]) == 0
    before = json.loads((run / "metrics.json").read_text())
    c["feats"].rename(tmp_path / "moved")
    capsys.readouterr()
    for argv in (["evaluate", str(run)], ["label", str(run), "--split", "test"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and str(c["feats"]) in err[0] and "--data DATA.yaml" in err[0], err
    data = tmp_path / "data.yaml"
    data.write_text(yaml.safe_dump({"data": {"kind": "feature_bags", "features_dir": str(tmp_path / "moved"),
                                             "labels_csv": str(c["labels"])}}))
    assert main(["evaluate", str(run), "--annotations", str(tmp_path), "--data", str(data)]) == 2
    assert main(["evaluate", str(run), "--data", str(data)]) == 0
    after = json.loads((run / "metrics.json").read_text())
    assert after["_run"]["evaluated_data"] == str(data)
    for stage in ("mil",):  # the same bags at a new path: the same numbers
        assert after[stage]["test"] == pytest.approx(before[stage]["test"])
    assert main(["label", str(run), "--split", "test", "--data", str(data)]) == 0

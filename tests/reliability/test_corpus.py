"""The reliability corpus: one bad input per case, run through the real CLI (in-process).

Every case asserts the exit status, that stderr holds exactly one ``error:`` line (no
traceback) naming the file, key or option, and that nothing on disk changed (no partial
run directory, no half-written or temporary file). A new case is one line of CASES:

    C("id", <action>, <exit status>, "text the message must name", ...)

where an action (``train(...)``, ``tile(...)``, ``run_cmd(...)``, ``cmd(...)``) applies its
edits to a fresh copy of the tiny cohort (cohort.py) and returns the command line.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from cohort import bag_features, make_cohort, write_h5  # noqa: E402

from milkit.cli import main  # noqa: E402


# -- the world a case runs in ---------------------------------------------------------
@dataclass
class Ctx:
    root: Path
    cfg: Path
    feats: Path
    labels: Path
    out: Path
    run: Path  # a finished run (copy)
    slides: Path  # small slides: ok.tif (MPP), nompp.tif, blank0.tif


Edit = Callable[[Ctx], None]


def edit_yaml(fn: Callable[[dict], None]) -> Edit:
    def e(ctx: Ctx) -> None:
        raw = yaml.safe_load(ctx.cfg.read_text())
        fn(raw)
        ctx.cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    return e


def set_key(dotted: str, value) -> Edit:
    def fn(raw: dict) -> None:
        *parents, last = dotted.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return edit_yaml(fn)


def drop_key(dotted: str) -> Edit:
    def fn(raw: dict) -> None:
        *parents, last = dotted.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node.pop(last)
    return edit_yaml(fn)


def write(rel: str, text: str | bytes) -> Edit:
    """Write a file (relative to the cohort root; ``{run}`` = the finished run)."""
    def e(ctx: Ctx) -> None:
        p = Path(rel.format(run=ctx.run, root=ctx.root))
        p = p if p.is_absolute() else ctx.root / p
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    return e


def h5(slide: str, feats: np.ndarray | None = None, coords: np.ndarray | None = None, raw: bytes | None = None,
       no_features: bool = False) -> Edit:
    """Replace feats/<slide>.h5."""
    def e(ctx: Ctx) -> None:
        p = ctx.feats / f"{slide}.h5"
        if raw is not None:
            p.write_bytes(raw)
        elif no_features:
            with h5py.File(p, "w") as f:
                f.create_dataset("coords", data=np.zeros((3, 2), np.int64))
        else:
            write_h5(p, feats, coords)
    return e


def annotation(name: str, text: str) -> Edit:
    """``ann/<name>`` holding ``text``, and ``data.annotations_dir`` pointing at ``ann/``."""
    def e(ctx: Ctx) -> None:
        write(f"ann/{name}", text)(ctx)
        set_key("data.annotations_dir", str(ctx.root / "ann"))(ctx)
    return e


def labels(*rows: str, header: str = "slide_id,label,split", encoding: str = "utf-8") -> Edit:
    def e(ctx: Ctx) -> None:
        ctx.labels.write_bytes(("\n".join((header, *rows)) + "\n").encode(encoding) if header or rows else b"")
    return e


def rows(splits: list[str], labels_: list[int] | None = None) -> list[str]:
    labs = labels_ if labels_ is not None else [i % 2 for i in range(len(splits))]
    return [f"s{i:02d},{labs[i]},{s}" for i, s in enumerate(splits)]


def train(*edits: Edit, args: tuple[str, ...] = ()) -> Callable[[Ctx], list[str]]:
    def a(ctx: Ctx) -> list[str]:
        for e in edits:
            e(ctx)
        return ["train", str(ctx.cfg), "--out", str(ctx.out), *[x.format(run=ctx.run, root=ctx.root) for x in args]]
    return a


def cmd(*argv: str, edits: tuple[Edit, ...] = ()) -> Callable[[Ctx], list[str]]:
    """Any command line; ``{run}``, ``{root}``, ``{slides}``, ``{out}``, ``{cfg}`` are filled in."""
    def a(ctx: Ctx) -> list[str]:
        for e in edits:
            e(ctx)
        return [x.format(run=ctx.run, root=ctx.root, slides=ctx.slides, out=ctx.out, cfg=ctx.cfg) for x in argv]
    return a


def tile(slide: str, *opts: str) -> Callable[[Ctx], list[str]]:
    return cmd("tile", f"{{slides}}/{slide}", "--out", "{root}/tiles", "--no-progress", *opts)


def in_run(rel: str, text: str | bytes) -> Edit:
    return write("{run}/" + rel, text)


def weights(stage: str, state: dict | bytes) -> Edit:
    def e(ctx: Ctx) -> None:
        import torch

        p = ctx.run / "stages" / stage / "model.pt"
        p.write_bytes(state) if isinstance(state, bytes) else torch.save(state, p)
    return e


def _into_subfolder(name: str) -> Edit:
    """Every feature file moved one folder down, as TRIDENT writes them (``<job>/features_<encoder>/``)."""
    def e(ctx: Ctx) -> None:
        (ctx.feats / name).mkdir()
        for p in ctx.feats.glob("*.h5"):
            p.rename(ctx.feats / name / p.name)
    return e


def nan_feats(n: int = 6) -> np.ndarray:
    x = bag_features(3, 1, n)
    x[2, 5] = np.nan
    return x


#: six patches, two of them at one position
DUP_COORDS = np.array([[0, 0], [256, 0], [512, 0], [0, 256], [256, 256], [0, 0]], np.int64)


def inf_feats() -> np.ndarray:
    x = bag_features(3, 1)
    x[0, 0] = np.inf
    return x


def _wrong_shape_state() -> dict:
    import torch

    return {"model.encoder.0.weight": torch.zeros(3, 3)}


@dataclass
class C:
    id: str
    action: Callable[[Ctx], list[str]]
    code: int
    names: tuple[str, ...]

    def __init__(self, id: str, action, code: int, *names: str):
        self.id, self.action, self.code, self.names = id, action, code, names


SPLIT_TT = ["train"] * 10 + ["test"] * 2  # Camelyon16's official split: train and test only
ALL_POS_TRAIN = [1 if s == "train" else i % 2 for i, s in enumerate(["train"] * 8 + ["val"] * 2 + ["test"] * 2)]

CASES = [
    # -- config --------------------------------------------------------------------------
    C("config_missing", cmd("train", "{root}/nope.yaml", "--out", "{out}"), 2, "nope.yaml", "does not exist"),
    C("config_is_folder", cmd("train", "{root}/feats", "--out", "{out}"), 2, "feats", "folder"),
    C("config_bad_yaml", train(write("exp.yaml", "seed: [0\ndata: {")), 2, "exp.yaml", "YAML"),
    C("config_not_mapping", train(write("exp.yaml", "- a\n- b\n")), 2, "exp.yaml", "mapping"),
    C("config_not_utf8", train(write("exp.yaml", b"seed: 0\n# \xff\xfe\n")), 2, "exp.yaml", "UTF-8"),
    C("config_unknown_section", train(set_key("sed", 1)), 2, "'sed'", "did you mean 'seed'"),
    C("config_typo_data_key", train(set_key("data.feature_dir", "x")), 2, "data.feature_dir", "data.features_dir"),
    C("config_typo_trainer_key", train(set_key("trainer.max_epoch", 3)), 2, "trainer.max_epoch", "trainer.max_epochs"),
    C("config_typo_encoder_key", train(set_key("method.encoder.out_dims", 3)), 2, "method.encoder.out_dims",
      "method.encoder.out_dim"),
    C("config_zero_epochs", train(set_key("trainer.max_epochs", 0)), 2, "trainer.max_epochs"),
    C("config_negative_lr", train(args=("--set", "trainer.lr=-1")), 2, "trainer.lr"),
    C("config_bad_optimizer", train(set_key("trainer.optimizer", "adamm")), 2, "trainer.optimizer"),
    # Lightning's own check came after the run directory was made, as an "unexpected" exception (exit 1)
    C("config_accelerator_mps", train(set_key("trainer.accelerator", "mps")), 2, "trainer.accelerator", "mps",
      "float64", "embedding_bag", "exp.yaml"),
    C("config_accelerator_unknown", train(set_key("trainer.accelerator", "tpu")), 2, "trainer.accelerator", "'tpu'"),
    C("config_precision_unknown", train(set_key("trainer.precision", "bogus")), 2, "trainer.precision", "'bogus'"),
    C("config_precision_64", train(args=("--set", "trainer.precision=64-true")), 2, "trainer.precision", "64-true",
      "float32 features"),
    C("config_unknown_method", train(set_key("method.name", "milz")), 2, "milz", "exp.yaml"),
    C("config_unknown_model", train(set_key("method.model.name", "abmilx")), 2, "abmilx"),
    C("config_unknown_dataset", train(set_key("data.kind", "featurebags")), 2, "featurebags"),
    C("config_no_data_kind", train(drop_key("data.kind")), 2, "data.kind"),
    C("config_no_method_name", train(drop_key("method.name")), 2, "method.name"),
    C("config_model_switch_keeps_key", train(args=("--set", "method.model.name=maxpool")), 2,
      "method.model.attention_hidden", "=null"),
    C("config_set_no_equals", train(args=("--set", "trainer.lr")), 2, "trainer.lr", "key=value"),
    C("config_set_not_section", train(args=("--set", "trainer.lr.x=1")), 2, "'lr' is not a section"),
    C("config_set_bad_yaml", train(args=("--set", "trainer.lr=[1")), 2, "trainer.lr"),
    C("config_fractions_sum", train(set_key("data.fractions", [0.5, 0.5, 0.5]), set_key("data.split_mode", "fractions")),
      2, "data", "fractions"),
    C("config_fold_too_big", train(set_key("data.fold", 7)), 2, "fold 7"),
    C("config_in_dim_mismatch", train(set_key("method.encoder.in_dim", 4)), 2, "method.encoder.in_dim", "4", "D = 8",
      "s00.h5"),
    C("config_overwrite_and_resume", train(args=("--overwrite", "--resume")), 2, "--overwrite", "--resume"),
    # -- feature files ---------------------------------------------------------------------
    C("feats_dir_missing", train(set_key("data.features_dir", "/nonexistent/feats")), 2, "/nonexistent/feats"),
    # relative paths are read from the current folder, not the config's: the message says where it looked
    C("feats_dir_relative_missing", train(set_key("data.features_dir", "nofeats_rel")), 2, "nofeats_rel",
      "data.features_dir", "current folder"),
    C("feats_missing_slide_file", train(lambda c: (c.feats / "s05.h5").unlink()), 2, "labels.csv", "s05"),
    C("feats_folder_empty", train(lambda c: [p.unlink() for p in c.feats.glob("*.h5")]), 2, "labels.csv", "no feature file"),
    C("feats_junk_h5", train(h5("s04", raw=b"not an hdf5 file")), 2, "s04.h5", "HDF5"),
    C("feats_no_features_dataset", train(h5("s04", no_features=True)), 2, "s04.h5", "'features'"),
    C("feats_1d", train(h5("s04", np.zeros(6, np.float32))), 2, "s04.h5", "(N, D)"),
    C("feats_coords_n3", train(h5("s04", bag_features(4, 0), np.zeros((6, 3), np.int64))), 2, "s04.h5", "(N, 2)"),
    C("feats_coords_length", train(h5("s04", bag_features(4, 0), np.zeros((5, 2), np.int64))), 2, "s04.h5",
      "6 feature rows but 5 coords"),
    C("feats_nan", train(h5("s03", nan_feats())), 2, "s03.h5", "NaN"),
    C("feats_inf", train(h5("s03", inf_feats())), 2, "s03.h5", "Inf"),
    C("feats_duplicate_coords", train(h5("s03", bag_features(3, 1), DUP_COORDS), set_key("data.graph", True)), 2, "s03.h5",
      "duplicate coords"),
    C("feats_in_a_trident_subfolder", train(_into_subfolder("features_uni_v1")), 2, "no feature file", "features_uni_v1/",
      "data.features_dir"),
    C("feats_nan_in_test_split", train(h5("s11", nan_feats())), 2, "s11.h5", "NaN"),
    C("feats_other_dim", train(h5("s06", bag_features(6, 0, d=5))), 2, "s06.h5", "D = 5", "D = 8"),
    C("feats_empty_positive_bag", train(h5("s01", np.zeros((0, 8), np.float32), np.zeros((0, 2), np.int64))), 2,
      "s01.h5", "'s01'", "positive"),
    C("feats_annotations_dir_missing", train(set_key("data.annotations_dir", "/nonexistent/ann")), 2, "/nonexistent/ann"),
    C("feats_unknown_layout", train(set_key("data.layout", "trident")), 2, "data.layout"),
    C("ann_broken_xml", train(annotation("s00.xml", "<ASAP_Annotations><Annotations>\n")), 2, "s00.xml", "ASAP XML"),
    C("ann_bad_geojson", train(annotation("s02.geojson", '{"type": "FeatureCollection", "features": [{"type": '
                                          '"Feature", "geometry": {"type": "Polygon", "coordinates": "x"}}]}')), 2,
      "s02.geojson"),
    C("ann_bad_json", train(annotation("s04.json", "{not json")), 2, "s04.json"),
    # -- label CSVs -------------------------------------------------------------------------
    C("csv_missing", train(set_key("data.labels_csv", "/nonexistent/labels.csv")), 2, "/nonexistent/labels.csv"),
    C("csv_no_slide_column", train(labels("s00,1", header="name,label")), 2, "labels.csv", "slide column"),
    C("csv_no_label_column", train(labels("s00,1", header="slide_id,target")), 2, "labels.csv", "label column"),
    C("csv_label_not_binary", train(labels(*rows(["train"] * 3), "s03,2,train")), 2, "labels.csv", "line 5", "'2'"),
    C("csv_duplicate_slide", train(labels(*rows(["train"] * 3), "s01,1,test")), 2, "labels.csv", "'s01'", "twice"),
    C("csv_bad_split_name", train(labels(*rows(["train"] * 3), "s03,1,dev")), 2, "labels.csv", "'dev'"),
    C("csv_empty_slide_id", train(labels(*rows(["train"] * 3), ",1,train")), 2, "labels.csv", "empty slide id"),
    C("csv_header_only", train(labels()), 2, "labels.csv", "no rows"),
    C("csv_empty_file", train(labels(header="")), 2, "labels.csv", "no rows"),
    C("csv_not_utf8", train(labels("s00,1,train", "sé,0,train", encoding="latin-1")), 2, "labels.csv", "UTF-8"),
    C("csv_label_column_option", train(set_key("data.label_column", "tumour")), 2, "labels.csv", "'tumour'"),
    C("csv_label_not_in_map", train(set_key("data.label_map", {"0": 0, "x": 1})), 2, "labels.csv", "label '1'",
      "data.label_map"),
    C("label_map_bad_value", train(set_key("data.label_map", {"tumor_tissue": 2})), 2, "data.label_map", "0, 1 or null"),
    C("split_train_test_no_val_fraction", train(labels(*rows(SPLIT_TT)), set_key("data.val_fraction", 0.0)), 2,
      "labels.csv", "val split", "val_fraction"),
    C("split_test_empty", train(labels(*rows(["train"] * 8 + ["val"] * 4)), ), 2, "labels.csv", "test split"),
    C("split_train_empty", train(labels(*rows(["val"] * 6 + ["test"] * 6))), 2, "labels.csv", "train split"),
    C("split_one_class_train", train(labels(*rows(["train"] * 8 + ["val"] * 2 + ["test"] * 2, ALL_POS_TRAIN))), 2,
      "exp.yaml", "train split", "label 1"),
    C("split_case_straddles", train(labels("s00,0,train,p1", "s01,1,test,p1", header="slide_id,label,split,case_id")), 2,
      "labels.csv", "'p1'"),
    C("split_csv_mode_missing_value", train(labels(*rows(["train"] * 3), "s03,1,"), set_key("data.split_mode", "csv")),
      2, "labels.csv", "'s03'"),
    C("split_kfold_too_few_cases", train(set_key("data.split_mode", "kfold"), set_key("data.folds", 20)), 2,
      "labels.csv", "data.folds", "20 folds"),
    # -- slides (milkit tile) -------------------------------------------------------------------
    C("tile_patch_size_zero", tile("ok.tif", "--patch-size", "0"), 2, "--patch-size"),
    C("tile_patch_size_text", tile("ok.tif", "--patch-size", "abc"), 2, "--patch-size"),
    C("tile_tissue_method", tile("ok.tif", "--tissue-method", "bogus"), 2, "--tissue-method", "bogus"),
    C("tile_tissue_threshold", tile("ok.tif", "--tissue-threshold", "300"), 2, "--tissue-threshold"),
    C("tile_tissue_fraction", tile("ok.tif", "--tissue-fraction", "1.5"), 2, "--tissue-fraction"),
    C("tile_overlap", tile("ok.tif", "--overlap", "300"), 2, "--overlap", "--patch-size"),
    C("tile_two_resolutions", tile("ok.tif", "--target-mpp", "0.5", "--downsample", "2"), 2, "--target-mpp",
      "--downsample"),
    C("tile_no_out", cmd("tile", "{slides}/ok.tif"), 2, "--out"),
    C("tile_slide_missing", tile("ghost.svs"), 2, "ghost.svs", "does not exist"),
    C("tile_folder_without_slides", cmd("tile", "{root}/feats", "--out", "{root}/tiles"), 2, "feats", "no slide files"),
    C("tile_not_a_slide", tile("junk.svs"), 2, "junk.svs"),
    C("tile_no_mpp", tile("nompp.tif"), 2, "nompp.tif", "--mpp"),
    C("tile_finer_than_level0", tile("ok.tif", "--target-mpp", "0.05"), 2, "ok.tif", "finer than level 0"),
    C("tile_blank_level0", tile("blank0.tif", "--downsample", "1", "--patch-size", "64"), 2, "blank0.tif", "blank"),
    C("tile_mpp_csv_missing", tile("ok.tif", "--mpp-csv", "{root}/nope.csv"), 2, "nope.csv"),
    C("tile_mpp_csv_bad", cmd("tile", "{slides}/ok.tif", "--out", "{root}/tiles", "--mpp-csv", "{root}/mpp.csv",
                              edits=(write("mpp.csv", "slide_id,mpp\nok,abc\n"),)), 2, "mpp.csv", "line 2"),
    C("tile_mpp_negative", tile("ok.tif", "--mpp", "-1"), 2, "ok.tif", "positive"),
    # -- run directories (label / evaluate) ---------------------------------------------------
    C("run_not_a_run", cmd("label", "{root}/feats"), 2, "feats", "config.yaml"),
    C("run_missing", cmd("evaluate", "{root}/norun"), 2, "norun", "does not exist"),
    C("run_config_corrupt", cmd("label", "{run}", edits=(in_run("config.yaml", "seed: [\n"),)), 2, "config.yaml", "YAML"),
    C("run_config_unknown_key", cmd("label", "{run}", edits=(in_run("config.yaml", "seed: 0\nbogus: 1\n"),)), 2,
      "config.yaml", "'bogus'"),
    C("run_metrics_corrupt", cmd("evaluate", "{run}", edits=(in_run("metrics.json", "{not json"),)), 2, "metrics.json",
      "JSON"),
    C("run_threshold_corrupt", cmd("evaluate", "{run}", edits=(in_run("stages/mil/threshold.json", "{oops"),)), 2,
      "threshold.json", "JSON"),
    C("run_weights_garbage", cmd("label", "{run}", edits=(weights("mil", b"garbage"),)), 2, "model.pt"),
    C("run_weights_wrong_shape", cmd("label", "{run}", edits=(weights("mil", _wrong_shape_state()),)), 2, "model.pt",
      "do not fit"),
    C("run_weights_missing", cmd("label", "{run}", edits=(lambda c: (c.run / "stages/mil/model.pt").unlink(),)), 2,
      "model.pt"),
    C("run_label_bad_split", cmd("label", "{run}", "--split", "dev"), 2, "'dev'"),
    C("run_label_bad_stage", cmd("label", "{run}", "--stage", "teacher"), 2, "'teacher'"),
    C("run_annotations_missing", cmd("evaluate", "{run}", "--annotations", "{root}/noann"), 2, "noann"),
    C("run_label_features_missing", cmd("label", "{run}", "--features", "{root}/nofeats"), 2, "nofeats", "--features"),
    C("run_label_overwrite_without_slides", cmd("label", "{run}", "--overwrite"), 2, "--overwrite", "--slides"),
    C("run_label_review_fraction_without_slides", cmd("label", "{run}", "--review-fraction", "0.1"), 2, "--review-fraction", "--slides"),
    C("run_label_features_empty", cmd("label", "{run}", "--features", "{slides}"), 2, "no <slide>.h5"),
    C("run_label_features_with_data", cmd("label", "{run}", "--features", "{root}/feats", "--data", "{cfg}"), 2,
      "--data", "--features"),
    C("run_label_features_unextracted", cmd("label", "{run}", "--features", "{root}/feats", edits=(
        write("feats/zz.h5", b""), lambda c: _coords_only(c.feats / "zz.h5"))), 2, "zz.h5", "'features'"),
    # a file of another encoder's size sorted after good ones: refused before the good ones are labelled
    C("run_label_features_other_dim", cmd("label", "{run}", "--features", "{root}/feats", edits=(
        lambda c: write_h5(c.feats / "zz.h5", bag_features(99, 1, d=3)),)), 2, "zz.h5", "D = 3", "D = 8"),
    C("run_label_features_nan", cmd("label", "{run}", "--features", "{root}/feats", edits=(
        lambda c: write_h5(c.feats / "zz.h5", nan_feats()),)), 2, "zz.h5", "NaN"),
    C("run_label_features_duplicate_coords", cmd("label", "{run}", "--features", "{root}/feats", edits=(
        lambda c: write_h5(c.feats / "zz.h5", bag_features(99, 1), DUP_COORDS),)), 2, "zz.h5", "more than once"),
    C("run_label_features_in_a_trident_subfolder", cmd("label", "{run}", "--features", "{root}/feats", edits=(
        _into_subfolder("features_uni_v1"),)), 2, "no <slide>.h5", "features_uni_v1/", "--features"),
    C("train_folds_no_kfold", cmd("train", "{cfg}", "--out", "{out}", "--folds", "3", edits=(
        set_key("data", {"kind": "spatial_bags"}),)), 2, "--folds", "'spatial_bags'"),
    C("train_folds_out_is_run", cmd("train", "{cfg}", "--out", "{run}", "--folds", "3"), 2, "single milkit run"),
    # -- output folders -------------------------------------------------------------------------
    C("out_foreign_folder", train(write("run/metrics.json", '{"mine": 1}\n')), 2, "run", "not a milkit run"),
    C("out_foreign_overwrite", train(write("run/notes.txt", "mine\n"), args=("--overwrite",)), 2, "run", "not a milkit run"),
    C("out_is_file", train(write("run", "a file\n")), 2, "run", "is a file"),
    C("out_finished_run", cmd("train", "{cfg}", "--out", "{run}"), 2, "--overwrite", "finished"),
    C("out_unfinished_run", cmd("train", "{cfg}", "--out", "{run}",
                                edits=(lambda c: (c.run / "metrics.json").unlink(),)), 2, "--resume"),
    C("out_resume_other_config", cmd("train", "{cfg}", "--out", "{run}", "--resume", "--set", "trainer.lr=0.5"), 2,
      "config.yaml", "trainer.lr"),
    C("out_resume_broken_last_ckpt", cmd("train", "{cfg}", "--out", "{run}", "--resume", edits=(
        lambda c: (c.run / "metrics.json").unlink(), lambda c: (c.run / "stages/mil/model.pt").unlink(),
        in_run("stages/mil/checkpoints/last.ckpt", b"half a checkpoint"))), 2, "last.ckpt", "--overwrite"),
    C("configs_copy_exists", cmd("configs", "--copy", "slides/abmil_features.yaml", "--to", "{root}/exp.yaml"), 2,
      "exp.yaml", "already exists"),
    C("configs_copy_unknown", cmd("configs", "--copy", "slides/nope.yaml", "--to", "{root}"), 2, "nope.yaml"),
    C("unknown_command", cmd("trian"), 2, "trian"),
    C("unknown_option", cmd("train", "{cfg}", "--out", "{out}", "--epochs", "3"), 2, "--epochs"),
]


def _coords_only(path: Path) -> None:
    """A tiled slide never extracted: coords, no features."""
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("coords", data=np.zeros((2, 2), np.int64))


# -- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """The tiny cohort, a finished run on it, and three small slides."""
    from milkit.slide.synthetic import make_slide, write_pyramid_tiff

    root = tmp_path_factory.mktemp("corpus_base")
    c = make_cohort(root)
    assert main(["train", str(c["config"]), "--out", str(root / "finished")]) == 0
    slides = root / "slides"
    make_slide(slides, "ok", positive=False, seed=0, size=(512, 512), mpp=0.25)
    make_slide(slides, "nompp", positive=False, seed=1, size=(512, 512), mpp=None)
    img = np.full((1024, 1024, 3), 255, np.uint8)
    img[256:768, 256:768] = (180, 60, 150)  # tissue-coloured square
    write_pyramid_tiff(slides / "blank0_src.tif", img, 0.25)
    _blank_level0(slides / "blank0_src.tif", slides / "blank0.tif")
    (slides / "blank0_src.tif").unlink()
    for p in slides.glob("*.xml"):
        p.unlink()
    (slides / "junk.svs").write_bytes(b"this is not a slide")
    return root


def _blank_level0(src: Path, dst: Path) -> None:
    """Copy a pyramidal TIFF with level 0 replaced by white (the lower levels keep the tissue)."""
    import tifffile

    with tifffile.TiffFile(src) as t:
        pages = [(p.asarray(), p.tags["XResolution"].value, p.tags["YResolution"].value) for p in t.pages]
    with tifffile.TiffWriter(dst) as w:
        for i, (arr, xr, yr) in enumerate(pages):
            w.write(np.full_like(arr, 255) if i == 0 else arr, tile=(256, 256), photometric="rgb",
                    compression="jpeg", subfiletype=0 if i == 0 else 1, resolution=(xr, yr),
                    resolutionunit="CENTIMETER", metadata=None)


@pytest.fixture
def ctx(base, tmp_path) -> Ctx:
    root = tmp_path / "w"
    root.mkdir()
    shutil.copytree(base / "feats", root / "feats")
    shutil.copy(base / "labels.csv", root / "labels.csv")
    raw = yaml.safe_load((base / "exp.yaml").read_text())
    raw["data"].update(features_dir=str(root / "feats"), labels_csv=str(root / "labels.csv"))
    (root / "exp.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(base / "finished", root / "finished")
    run_cfg = yaml.safe_load((root / "finished/config.yaml").read_text())
    run_cfg["data"].update(features_dir=str(root / "feats"), labels_csv=str(root / "labels.csv"))
    (root / "finished/config.yaml").write_text(yaml.safe_dump(run_cfg, sort_keys=False))
    return Ctx(root, root / "exp.yaml", root / "feats", root / "labels.csv", root / "run", root / "finished",
               base / "slides")


def snapshot(*roots: Path) -> dict:
    out = {}
    for r in roots:
        for p in sorted(r.rglob("*")):
            st = p.lstat()
            out[str(p)] = (p.is_dir(), st.st_size, st.st_mtime_ns)
    return out


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err


def assert_one_line(err: str, names: tuple[str, ...]) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("milkit: ")]
    assert len(lines) == 1, f"expected one error line, got {len(lines)}:\n{err}"
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in err, err
    for n in names:
        assert n in line, f"{n!r} not named in: {line}"
    return line


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: C, ctx: Ctx, capsys) -> None:
    argv = case.action(ctx)
    before = snapshot(ctx.root, ctx.slides)
    code, err = run_cli(argv, capsys)
    assert code == case.code, err
    line = assert_one_line(err, case.names)
    if os.environ.get("MILKIT_SHOW_CORPUS"):  # print every message (to review their wording)
        sys.__stdout__.write(f"{case.id}: {line.replace(str(ctx.root), '<w>')}\n")
    assert snapshot(ctx.root, ctx.slides) == before, "the failing command changed files on disk"


def test_corpus_is_large_and_ids_unique() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)

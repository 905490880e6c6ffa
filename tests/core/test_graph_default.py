"""`data.graph` for the methods and models that smooth over the patch graph (Sm, Eq. 8): turned on when the config
leaves it out, an error where it is needed and refused, a warning where pseudo_label is asked to go without it."""

from __future__ import annotations

import h5py
import numpy as np
import yaml

from milkit.cli import main

D = 8


def _cohort(root, graph=None, method=None):
    rng = np.random.default_rng(0)
    feats = root / "feats"
    feats.mkdir(exist_ok=True)
    rows = ["slide_id,label"]
    for i in range(16):
        x = rng.normal(size=(16, D)).astype(np.float32)
        if i % 2:
            x[[0, 1, 4, 5], 0] += 3.0  # a 2 × 2 lesion in the corner of a 4 × 4 grid
        with h5py.File(feats / f"s{i:02d}.h5", "w") as f:
            f.create_dataset("features", data=x)
            c = f.create_dataset("coords", data=np.stack([(np.arange(16) % 4) * 64, (np.arange(16) // 4) * 64], 1))
            c.attrs["patch_size_level0"] = 64
        rows.append(f"s{i:02d},{i % 2}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    data = {"kind": "feature_bags", "features_dir": str(feats), "labels_csv": str(root / "labels.csv")}
    if graph is not None:
        data["graph"] = graph
    cfg = {"seed": 0, "data": data,
           "method": method or {"name": "pseudo_label", "mil_epochs": 2, "rounds": 1, "round_epochs": 1},
           "trainer": {"progress_bar": False, "accelerator": "cpu", "devices": 1}}
    (root / "c.yaml").write_text(yaml.safe_dump(cfg))
    return root / "c.yaml"


def test_pseudo_label_gets_the_patch_graph_when_the_config_leaves_it_out(tmp_path, capsys):
    from milkit.run_dir import RunDir

    cfg = _cohort(tmp_path)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 0
    assert "data.graph = true: method.name 'pseudo_label' smooths over the patch graph" in capsys.readouterr().err
    exp = RunDir(tmp_path / "run").read_config()
    assert exp.data.graph is True  # recorded: label and evaluate build the same graph
    bag = exp.data.build(exp.seed).train[0]
    assert bag.adj is not None and bag.adj.num_nodes == 16


def test_pseudo_label_with_graph_false_is_warned_and_smap_refused_before_any_write(tmp_path, capsys):
    cfg = _cohort(tmp_path, graph=False)
    assert main(["train", str(cfg), "--out", str(tmp_path / "plain")]) == 0
    assert "data.graph is false: method.name 'pseudo_label' then smooths over nothing" in capsys.readouterr().err
    cfg = _cohort(tmp_path, graph=False, method={"name": "mil", "model": {"name": "smap"},
                                                  "encoder": {"name": "identity"}})
    assert main(["train", str(cfg), "--out", str(tmp_path / "smap")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'data.graph' is false, but method.model.name 'smap' needs the patch graph" in err[0]
    assert not (tmp_path / "smap").exists()

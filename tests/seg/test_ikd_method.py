"""IKD-MIL: side-output net, role switch rule, and short end-to-end runs."""

import json

import pytest
import torch
import torchvision

from milkit.config import build_experiment
from milkit.methods.ikd import run_rounds
from milkit.models.sideout import SideOutputNet
from milkit.workflow import label_run, load_labelers, train_run

DATA = {"kind": "seg_synthetic", "image_size": 32, "n_train": 32, "n_val": 12, "n_test": 16,
        "min_radius": 0.15, "max_radius": 0.25}
TRAINER = {"max_epochs": 4, "batch_size": 8, "lr": 2e-3, "progress_bar": False, "log_every_n_steps": 1}


def test_sideout_shapes_fusion_and_gradients():
    torch.manual_seed(0)
    net = SideOutputNet("vgg_small", width=4)
    w = net.fusion_weights
    assert torch.allclose(w, torch.tensor([0.3, 0.3, 0.4]), atol=1e-6)
    x = torch.rand(2, 3, 20, 20)
    out = net(x)
    assert len(out.sides) == 3 and all(s.shape == (2, 20, 20) for s in out.sides)
    assert torch.allclose(out.fused, sum(wi * s for wi, s in zip(w, out.sides)))
    assert float(out.fused.min()) >= 0 and float(out.fused.max()) <= 1
    out.fused.mean().backward()
    assert net.fusion_logits.grad is not None and net.heads[0].weight.grad is not None
    fixed = SideOutputNet("vgg_small", width=4, learn_fusion=False)
    assert not fixed.fusion_logits.requires_grad
    with pytest.raises(ValueError, match="images"):
        net(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="unknown side-output backbone"):
        SideOutputNet("alexnet")


def test_pretrained_weights_come_from_a_local_file(tmp_path):
    ref = torchvision.models.resnet18(weights=None)
    path = tmp_path / "r18.pt"
    torch.save(ref.state_dict(), path)
    net = SideOutputNet("resnet18", pretrained_path=str(path))
    assert torch.equal(net.blocks[0][0].weight, ref.conv1.weight)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        SideOutputNet("resnet18", pretrained_path=str(tmp_path / "missing.pt"))


class _Net(torch.nn.Module):
    def __init__(self, name):
        super().__init__()
        self.name = name


def _loop(student_scores, teacher_score=0.5):
    scores = iter(student_scores)
    trained = []

    def train_student(student, teacher, stage, r):
        trained.append((student.name, teacher.name, stage))
        student.value = next(scores)
        return student

    final, stage, hist = run_rounds(_Net("T"), _Net("S"), "teacher_r0", teacher_score, len(student_scores),
                                    train_student, lambda n: n.value)
    return final, stage, hist, trained


def test_role_switch_only_when_student_wins():
    final, stage, hist, trained = _loop([0.4, 0.5, 0.45])
    assert [h.switched for h in hist] == [False, False, False]  # a tie is not a win
    assert final.name == "T" and stage == "teacher_r0"
    assert [t[:2] for t in trained] == [("S", "T")] * 3  # same frozen teacher throughout


def test_roles_swap_after_a_win():
    final, stage, hist, trained = _loop([0.6, 0.55, 0.7])
    assert [h.switched for h in hist] == [True, False, True]
    # after the first win the old teacher T becomes the student of the new teacher S
    assert [t[:2] for t in trained] == [("S", "T"), ("T", "S"), ("T", "S")]
    assert final.name == "T" and stage == "student_r2"
    assert hist[1].teacher_score == pytest.approx(0.6)


def _run(tmp_path, name, method):
    exp = build_experiment({"seed": 0, "data": DATA, "method": method, "trainer": TRAINER})
    return train_run(exp, tmp_path / name)


def test_ikd_short_run_beats_all_ones_on_background_f1(tmp_path):
    ones = _run(tmp_path, "ones", {"name": "segmentation_baseline", "baseline": "all_ones"})["all_ones"]["test"]
    m = _run(tmp_path, "ikd", {"name": "ikd", "backbone": "vgg_small", "width": 8, "teacher_epochs": 4,
                               "check_every": 2, "rounds": 1, "blur_sigma": 1.0})
    assert ones["f1_neg"] == pytest.approx(0.0)
    for stage in ("teacher_r0", "student_r0", "final"):
        assert (tmp_path / "ikd" / "stages" / stage / "net.pt").is_file()
    final = m["final"]["test"]
    assert final["f1_neg"] > ones["f1_neg"] + 0.3
    assert final["f1"] > ones["f1"] + 0.1  # IKD's F1 (F1+ on positives, F1− on negatives)
    assert (tmp_path / "ikd" / "figures" / "final_test.png").is_file()  # evaluate's side-by-side figure
    hist = json.loads((tmp_path / "ikd" / "stages" / "final" / "history.json").read_text())
    assert len(hist["checks"]) == 1 and hist["final_from"] in ("teacher_r0", "student_r0")
    # the run directory alone rebuilds every stage, and label writes masks/maps/overlays/figures
    _, labelers, _ = load_labelers(tmp_path / "ikd")
    assert set(labelers) == {"teacher_r0", "student_r0", "final"}
    paths = label_run(tmp_path / "ikd", tmp_path / "labels", None, "test", None)
    names = {p.parent.name for p in paths}
    assert {"masks", "prob", "overlay", "figures"} <= names
    assert len([p for p in paths if p.parent.name == "masks"]) == DATA["n_test"]


def test_student_loss_uses_a_frozen_teacher_and_mask_targets():
    from milkit.methods.ikd import StudentLoss
    from milkit.methods.seg_base import SegBatch

    torch.manual_seed(0)
    teacher, student = SideOutputNet("vgg_small", width=4), SideOutputNet("vgg_small", width=4)
    batch = SegBatch(images=torch.rand(2, 3, 16, 16), labels=torch.tensor([1.0, 0.0]), bag_ids=["a", "b"])
    before = [p.clone() for p in teacher.parameters()]
    for target in ("soft", "mask"):
        loss, parts = StudentLoss(teacher, 0.25, 1.0, target=target, blur_sigma=1.0)(student, batch)
        loss.backward()
        assert set(parts) == {"kd", "wce"} and torch.isfinite(loss)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters()))
    assert student.heads[0].weight.grad is not None

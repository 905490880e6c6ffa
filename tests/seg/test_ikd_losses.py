"""IKD-MIL losses: Dice with inversion (Eq. 1), fusion KD (Eq. 2), weighted CE (Eq. 3), Eq. 4."""

import math

import pytest
import torch

from milkit.losses.dice import inverted_dice_loss, label_masks, soft_dice_loss
from milkit.losses.ikd import fusion_kd_loss, student_loss, student_targets, teacher_loss, weighted_ce


def test_soft_dice_hand_computed():
    p = torch.tensor([[[0.5, 1.0], [0.0, 0.25]]])
    t = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    # 1 - (2*1.5 + 1) / (1.75 + 2 + 1)
    assert float(soft_dice_loss(p, t)) == pytest.approx(1 - 4.0 / 4.75)
    assert float(soft_dice_loss(p, t, smooth=0.0)) == pytest.approx(1 - 3.0 / 3.75)


def test_inversion_for_negative_images():
    p = torch.tensor([[[0.2, 0.4]], [[0.2, 0.4]]])
    target = label_masks(torch.tensor([1.0, 0.0]), (1, 2))
    assert target[0].tolist() == [[1.0, 1.0]] and target[1].tolist() == [[0.0, 0.0]]
    per = inverted_dice_loss(p, target, torch.tensor([1.0, 0.0]), smooth=0.0, reduction="none")
    # positive: Dice(f, 1) = 2*0.6/(0.6+2); negative: Dice(1-f, 1) = 2*1.4/(1.4+2)
    assert float(per[0]) == pytest.approx(1 - 1.2 / 2.6)
    assert float(per[1]) == pytest.approx(1 - 2.8 / 3.4)
    # without inversion the negative image's Dice against zeros would be 1 whatever f is
    assert float(soft_dice_loss(p[1:], target[1:], smooth=0.0)) == pytest.approx(1.0)


def test_teacher_loss_sums_sides_and_fusion():
    torch.manual_seed(0)
    sides = [torch.rand(2, 3, 3) for _ in range(3)]
    fused = sum(sides) / 3
    y = torch.tensor([1.0, 0.0])
    target = label_masks(y, (3, 3))
    expected = sum(float(inverted_dice_loss(f, target, y)) for f in [fused, *sides])
    assert float(teacher_loss(sides, fused, y)) == pytest.approx(expected)


def test_weighted_ce_hand_computed():
    s = torch.tensor([[0.5, 0.25]])
    t = torch.tensor([[1.0, 0.5]])
    ce = [-1.0 * math.log(0.5), -0.5 * math.log(0.25)]  # both = log 2
    w = [math.exp(-c) for c in ce]
    expected = sum(c * wi for c, wi in zip(ce, w)) / sum(w)
    assert float(weighted_ce(s, t, form="positive")) == pytest.approx(expected)
    s2 = torch.tensor([[0.9, 0.1]])
    t2 = torch.tensor([[1.0, 1.0]])
    ce2 = [-math.log(0.9), -math.log(0.1)]
    w2 = [math.exp(-c) for c in ce2]
    assert float(weighted_ce(s2, t2, form="positive")) == pytest.approx(sum(c * wi for c, wi in zip(ce2, w2)) / sum(w2))


def test_weighted_ce_keeps_soft_targets_and_has_gradient():
    s = torch.tensor([[0.6, 0.3]], requires_grad=True)
    t = torch.tensor([[0.7, 0.2]])
    loss = weighted_ce(s, t, form="positive")
    loss.backward()
    assert s.grad is not None and torch.all(s.grad < 0)  # raising s lowers -t log s
    # soft targets are used as they are (rounding them would change the value)
    assert float(weighted_ce(s.detach(), t)) != pytest.approx(float(weighted_ce(s.detach(), t.round())))


def test_student_targets_and_eq4():
    torch.manual_seed(1)
    teacher = torch.rand(2, 4, 4)
    y = torch.tensor([1.0, 0.0])
    tgt = student_targets(teacher, y)
    assert torch.equal(tgt[0], teacher[0]) and torch.all(tgt[1] == 0)
    sides = [torch.rand(2, 4, 4) for _ in range(3)]
    fused = sum(sides) / 3
    loss, parts = student_loss(sides, fused, teacher, y, a=0.25)
    kd = fusion_kd_loss(sides, fused, tgt, y)
    assert float(loss) == pytest.approx(float(kd) + 0.25 * float(weighted_ce(fused, tgt)))
    assert float(parts["kd"]) == pytest.approx(float(kd))


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="shape"):
        soft_dice_loss(torch.rand(1, 2, 2), torch.rand(1, 3, 3))
    with pytest.raises(ValueError, match="shape"):
        weighted_ce(torch.rand(1, 4), torch.rand(1, 5))


def test_weighted_ce_binary_is_the_default_and_hand_computed():
    s = torch.tensor([[0.5, 0.25]])
    t = torch.tensor([[1.0, 0.5]])
    ce = [-math.log(0.5), -0.5 * math.log(0.25) - 0.5 * math.log(0.75)]
    w = [math.exp(-c) for c in ce]
    assert float(weighted_ce(s, t)) == pytest.approx(sum(c * wi for c, wi in zip(ce, w)) / sum(w))


def test_weighted_ce_default_pushes_background_pixels_down():
    # a teacher background pixel (t = 0): the one-sided CE gives it no gradient at all
    s = torch.tensor([[0.8, 0.9]], requires_grad=True)
    t = torch.tensor([[0.0, 1.0]])
    weighted_ce(s, t).backward()
    assert float(s.grad[0, 0]) > 0  # descent lowers s where the teacher says background
    s2 = s.detach().clone().requires_grad_(True)
    weighted_ce(s2, t, form="positive").backward()
    assert float(s2.grad[0, 0]) == 0.0


def test_weighted_ce_weights_are_detached_so_hard_pixels_move_towards_the_teacher():
    # one easy pixel (ce = 0.105) and one hard one (ce = 3.0): with gradients through
    # softmax(−ce), ∂L/∂ce_hard = w(1 − ce + L) < 0 and descent would lower s_hard further
    s = torch.tensor([[0.9, 0.05]], requires_grad=True)
    t = torch.tensor([[1.0, 1.0]])
    weighted_ce(s, t, form="positive").backward()
    assert float(s.grad[0, 1]) < 0  # descent raises s_hard towards t = 1
    ce = torch.tensor([-math.log(0.9), -math.log(0.05)])
    w = torch.softmax(-ce, 0)
    assert float(s.grad[0, 1]) == pytest.approx(float(w[1]) * (-1 / 0.05), rel=1e-4)
    s2 = s.detach().clone().requires_grad_(True)
    weighted_ce(s2, t, form="positive", detach_weights=False).backward()
    assert float(s2.grad[0, 1]) > 0  # the undetached form pushes the hard pixel away


def test_student_loss_uses_the_two_class_ce_by_default():
    torch.manual_seed(2)
    teacher = torch.rand(1, 4, 4)
    sides = [torch.rand(1, 4, 4) for _ in range(3)]
    fused = sum(sides) / 3
    y = torch.tensor([1.0])
    _, parts = student_loss(sides, fused, teacher, y)
    assert float(parts["wce"]) == pytest.approx(float(weighted_ce(fused, teacher, form="binary")))

import math

import torch

from milkit.losses.distillation import student_terms


def _kl(p, q):
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def _sig(z):
    return 1 / (1 + math.exp(-z))


def test_student_terms_eq5_hand_computed():
    s_bag, t_bag = torch.tensor([0.5]), torch.tensor([2.0])
    s_inst = torch.tensor([[1.0, -1.0, 9.0]])
    t_inst = torch.tensor([[2.0, 0.0, 9.0]])
    mask = torch.tensor([[True, True, False]])
    tau = 2.0
    out = student_terms(s_bag, t_bag, s_inst, t_inst, torch.tensor([1.0]), mask, tau, "sum")
    assert math.isclose(float(out["classification"]), -math.log(_sig(0.5)), rel_tol=1e-5)
    assert math.isclose(float(out["bag_kd"]), _kl(_sig(1.0), _sig(0.25)), rel_tol=1e-5)
    inst = _kl(_sig(1.0), _sig(0.5)) + _kl(_sig(0.0), _sig(-0.5))  # padded third instance ignored
    assert math.isclose(float(out["instance_kd"]), inst, rel_tol=1e-5)
    ent = sum(-(p * math.log(p) + (1 - p) * math.log(1 - p)) for p in (_sig(1.0), _sig(-1.0)))
    assert math.isclose(float(out["instance_entropy"]), ent, rel_tol=1e-5)
    mean = student_terms(s_bag, t_bag, s_inst, t_inst, torch.tensor([1.0]), mask, tau, "mean")
    assert math.isclose(float(mean["instance_kd"]), inst / 2, rel_tol=1e-5)

"""WENO: Eq. 13 pseudo labels, §3.3 hard positive mining, gradients of the alternation, configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from milkit.config import ConfigError, TrainerConfig, build_experiment, load_experiment
from milkit.data.bag import Bag, BagDataset, collate_bags
from milkit.models.base import encode_instances
from milkit.methods.weno import (
    WENOConfig,
    WENOModule,
    WENOStudent,
    build_net,
    hpm_keep_mask,
    pseudo_labels,
)

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "weno").glob("*.yaml"))


def test_pseudo_labels_per_bag_hand_computed() -> None:
    # bag 0 positive: signal 1, 3, 2 -> (0, 1, 0.5) clamped; bag 1 negative -> 0; bag 2 positive constant -> 1-eps
    s = torch.tensor([1.0, 3.0, 2.0, 5.0, -4.0, 0.7, 0.7])
    bag = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    y = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    out = pseudo_labels(s, bag, y, "per_bag", eps=1e-5)
    expected = torch.tensor([1e-5, 1 - 1e-5, 0.5, 0.0, 0.0, 1 - 1e-5, 1 - 1e-5])
    assert torch.allclose(out, expected, atol=1e-7)


def test_pseudo_labels_global_uses_min_max_over_all_instances() -> None:
    s = torch.tensor([1.0, 3.0, 2.0, 5.0, -3.0])
    bag = torch.tensor([0, 0, 0, 1, 1])
    y = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])
    out = pseudo_labels(s, bag, y, "global", eps=1e-5)
    expected = torch.tensor([4 / 8, 6 / 8, 5 / 8, 0.0, 0.0])  # (s - (-3)) / (5 - (-3)) in positive bags
    assert torch.allclose(out, expected)


def test_hpm_drops_exactly_instances_above_threshold() -> None:
    p = torch.tensor([[0.2, 0.8, 0.5, 0.9], [0.9, 0.95, 0.1, 0.0], [0.7, 0.9, 0.99, 0.3]])
    mask = torch.tensor([[True, True, True, True], [True, True, True, True], [True, True, True, False]])
    labels = torch.tensor([1.0, 0.0, 1.0])
    keep = hpm_keep_mask(p, mask, labels, threshold=0.5)
    assert keep.tolist() == [
        [True, False, True, False],  # 0.8 and 0.9 dropped, 0.5 is not > 0.5
        [True, True, True, True],  # negative bags untouched
        [False, False, True, False],  # all real ones exceed: keep the most positive; padding stays out
    ]


def _tiny_bags(n: int = 6, k: int = 5, d: int = 8) -> BagDataset:
    g = torch.Generator().manual_seed(0)
    bags = []
    for i in range(n):
        x = torch.randn(k, d, generator=g)
        lab = torch.zeros(k, dtype=torch.long)
        if i % 2 == 0:
            x[:2] += 3.0
            lab[:2] = 1
        bags.append(Bag(x, int(i % 2 == 0), f"b{i}", instance_labels=lab))
    return BagDataset(bags)


def _cfg(**kw) -> WENOConfig:
    return WENOConfig(encoder={"name": "linear", "in_dim": 8, "out_dim": 16}, **kw)


def _grads(module: torch.nn.Module) -> float:
    return sum(float(p.grad.abs().sum()) for p in module.parameters() if p.grad is not None)


def test_shared_encoder_gets_gradients_from_both_losses() -> None:
    ds = _tiny_bags()
    cfg = _cfg(pseudo_label="paper")
    net = build_net(cfg)
    mod = WENOModule(net, cfg, TrainerConfig(), ds, seed=0)
    batch = collate_bags([ds[0], ds[1]])
    # teacher loss (Eq. 12): encoder and teacher, not the student head
    loss, out, h, keep = mod.teacher_loss(batch)
    loss.backward()
    assert _grads(net.encoder) > 0 and _grads(net.teacher) > 0
    assert _grads(net.student_head) == 0
    net.zero_grad(set_to_none=True)
    # student loss (Eq. 15) on pseudo labels recorded from the teacher pass: encoder and student head only
    mod._record_signal(batch, out, h, keep)
    targets = mod.student_targets()
    rows = torch.arange(10)  # the instances of bags b0, b1
    s_loss = mod.student_loss(net.student_logits_flat(mod._inst_x[rows]), targets[rows])
    s_loss.backward()
    assert _grads(net.encoder) > 0 and _grads(net.student_head) > 0
    assert _grads(net.teacher) == 0
    # the recorded targets are Eq. 13 of the teacher attention a_ij (pseudo_label paper: softmax, per bag)
    expected = pseudo_labels(out.attention[0].detach(), torch.zeros(5, dtype=torch.long), torch.ones(5))
    assert torch.allclose(targets[:5], expected, atol=1e-6)
    assert torch.all(targets[5:10] == 0)  # b1 is negative


def test_unshared_encoder_keeps_the_student_off_the_teacher_encoder() -> None:
    ds = _tiny_bags()
    cfg = _cfg(shared_encoder=False)
    net = build_net(cfg)
    assert net.student_encoder is not None
    loss = WENOModule(net, cfg, TrainerConfig(), ds).student_loss(net.student_logits_flat(ds[0].instances), torch.ones(5) * 0.5)
    loss.backward()
    assert _grads(net.encoder) == 0 and _grads(net.student_encoder) > 0


def test_hpm_signal_covers_dropped_instances() -> None:
    ds = _tiny_bags()
    cfg = _cfg(hpm_warmup_epochs=0, hpm_threshold=0.01, pseudo_label="paper")
    net = build_net(cfg)
    with torch.no_grad():
        net.student_head.bias.fill_(10.0)  # student says "positive" everywhere -> all but one dropped
    mod = WENOModule(net, cfg, TrainerConfig(), ds)
    batch = collate_bags([ds[0]])
    _, out, h, keep = mod.teacher_loss(batch)
    assert int(keep.sum()) == 1
    mod._record_signal(batch, out, h, keep)
    full = net.teacher_forward(h.detach(), batch.mask).attention[0]
    assert torch.allclose(mod._signal[:5], full.detach(), atol=1e-6)


def test_student_labeler_bag_score_is_max_instance_probability() -> None:
    ds = _tiny_bags()
    net = build_net(_cfg()).eval()
    student = WENOStudent(net)
    b = collate_bags([ds[0], Bag(ds[1].instances[:3], 0, "short")])  # padded second bag
    out = student(b.instances, b.mask)
    probs = torch.sigmoid(student.instance_logits(b.instances, b.mask))
    assert torch.allclose(torch.sigmoid(out.bag_logits[0]), probs[0].max())
    assert torch.allclose(torch.sigmoid(out.bag_logits[1]), probs[1, :3].max())  # padding ignored


@pytest.mark.parametrize("teacher", ["meanpool", "maxpool"])
def test_teacher_without_attention_is_a_named_error(teacher: str) -> None:
    with pytest.raises(ValidationError, match="has no attention"):
        WENOConfig(teacher={"name": teacher})
    raw = {"data": {"kind": "positive_ratio_bags"}, "method": {"name": "weno", "teacher": {"name": teacher}}}
    with pytest.raises(ConfigError, match="method.teacher.*has no attention"):
        build_experiment(raw, source="weno.yaml")


def test_bad_hpm_values_are_named_errors() -> None:
    with pytest.raises(ValidationError, match="hpm_threshold"):
        _cfg(hpm_threshold=1.5)
    with pytest.raises(ValidationError, match="hpm_threshold_grid"):
        _cfg(hpm_threshold_grid=[0.5, 1.2])


def test_dsmil_teacher_builds() -> None:
    cfg = _cfg(teacher={"name": "dsmil"})
    net = build_net(cfg)
    ds = _tiny_bags()
    loss, out, _, _ = WENOModule(net, cfg, TrainerConfig(), ds).teacher_loss(collate_bags([ds[0]]))
    assert out.attention is not None and torch.isfinite(loss)


def test_configs_validate() -> None:
    assert len(CONFIGS) >= 3
    for path in CONFIGS:
        exp = load_experiment(path)
        assert exp.method.name in ("weno", "mil")
        assert exp.data.kind in ("positive_ratio_bags", "feature_bags")


def test_sgd_configs_say_momentum_0_and_paper_configs_grid_search_hpm() -> None:
    """Issue 12: released code = plain SGD; §4.3 grid-searches the HPM threshold on validation."""
    import yaml

    for path in CONFIGS:
        raw = yaml.safe_load(path.read_text())
        tr, m = raw["trainer"], raw["method"]
        if tr.get("optimizer", "adam") == "sgd":
            assert tr.get("momentum") == 0, path.name  # explicit, not TrainerConfig's 0.9
            if m["name"] == "weno":
                assert m.get("hpm_threshold_grid"), path.name  # SGD configs are the paper configs
        if "cifar10" in path.name:
            assert m["encoder"]["name"] == "alexnet_cifar_conv" and m["student_hidden"] == [4096, 4096]
            assert m["teacher_trunk"] == [4096, 4096] and m["hpm_warmup_epochs"] == 150  # Fig. 3


def test_pseudo_label_readings_paper_and_code() -> None:
    """paper = softmax a_ij of Eq. 5 normalised per bag; code = pre-softmax logits, global min–max."""
    from milkit.methods.weno import signal_for

    ds = _tiny_bags()
    batch = collate_bags([ds[0], ds[1]])
    paper, code = _cfg(pseudo_label="paper"), _cfg(pseudo_label="code")
    assert (paper.resolved_signal(), paper.resolved_normalisation()) == ("softmax", "per_bag")
    assert (code.resolved_signal(), code.resolved_normalisation()) == ("logits", "global")
    assert _cfg(pseudo_label="code", normalisation="per_bag").resolved_normalisation() == "per_bag"
    net = build_net(paper)
    with torch.no_grad():
        out = net.teacher_forward(net.encoder(batch.instances), batch.mask)
    assert torch.allclose(signal_for(out, batch.mask, "abmil", "softmax"), out.attention, atol=1e-6)
    assert torch.equal(signal_for(out, batch.mask, "abmil", "logits"), out.instance_scores)
    # TransMIL's scores already are softmax weights: kept as they are
    assert torch.equal(signal_for(out, batch.mask, "transmil", "softmax"), out.instance_scores)


def test_hpm_starts_after_epoch_10_as_the_released_code(monkeypatch) -> None:
    """Released code: HPM when epoch > 10 (0-based); milkit's default hpm_warmup_epochs = 11 = first HPM epoch."""
    cfg = _cfg()
    assert cfg.hpm_warmup_epochs == 11
    mod = WENOModule(build_net(cfg), cfg, TrainerConfig(), _tiny_bags())
    active = {}
    for epoch in (10, 11):
        monkeypatch.setattr(WENOModule, "current_epoch", property(lambda self, e=epoch: e))
        active[epoch] = mod.hpm_active()
    assert active == {10: False, 11: True}


def test_released_alexnet_split_shares_conv_features_only() -> None:
    """Released CIFAR code: shared conv features; teacher FC 4096–4096; student MLP 4096–4096 → 1."""
    cfg = WENOConfig(encoder={"name": "alexnet_cifar_conv", "in_channels": 3, "image_size": 32},
                     teacher={"name": "abmil", "gated": False}, teacher_trunk=[4096, 4096], student_hidden=[4096, 4096])
    net = build_net(cfg)
    assert not any(isinstance(m, torch.nn.Linear) for m in net.encoder.modules())  # conv part only
    trunk = [m for m in net.teacher_trunk.modules() if isinstance(m, torch.nn.Linear)]
    head = [m for m in net.student_head.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in trunk] == [(1728, 4096), (4096, 4096)]
    assert [(m.in_features, m.out_features) for m in head] == [(1728, 4096), (4096, 4096), (4096, 1)]
    x = torch.rand(1, 3, 3, 32, 32)
    mask = torch.ones(1, 3, dtype=torch.bool)
    h = encode_instances(net.encoder, x, mask)
    assert net.teacher_forward(h, mask).bag_logits.shape == (1,) and net.student_logits(x, mask, h).shape == (1, 3)

import math

import torch

from milkit.losses.vat_mil import (
    n_noise_instances,
    noise_bag,
    perturbed_bag,
    random_subbag_mask,
    vat_mil_terms,
)


def test_noise_bag_appends_uniform_instances_in_range():
    x = torch.zeros(2, 4, 1, 3, 3)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    g = torch.Generator().manual_seed(0)
    xn, mn = noise_bag(x, mask, 3, -1.0, 2.0, g)
    assert xn.shape == (2, 7, 1, 3, 3)
    assert torch.equal(mn[:, :4], mask) and mn[:, 4:].all()
    noise = xn[:, 4:]
    assert noise.min() >= -1.0 and noise.max() <= 2.0 and noise.std() > 0.5
    assert n_noise_instances(10, 0.2) == 2 and n_noise_instances(2, 0.2) == 1


def test_perturbation_has_norm_delta_per_instance_and_spares_padding():
    x = torch.randn(1, 5, 4)
    mask = torch.tensor([[1, 1, 1, 1, 0]], dtype=torch.bool)
    w = torch.tensor([1.0, -2.0, 0.5, 3.0])

    def bag_fn(xx, m):
        return ((xx @ w) * m).sum(1)

    for mode in ("adversarial", "random"):
        xd = perturbed_bag(bag_fn, x, mask, bag_fn(x, mask), delta=0.7, mode=mode)
        d = xd - x
        assert torch.allclose(d[0, :4].norm(dim=-1), torch.full((4,), 0.7), atol=1e-5)
        assert torch.all(d[0, 4] == 0)
    # adversarial direction of a linear bag function is ±w for every instance
    xd = perturbed_bag(bag_fn, x, mask, bag_fn(x, mask), delta=1.0, mode="adversarial")
    cos = torch.nn.functional.cosine_similarity(xd[0, :4] - x[0, :4], w.expand(4, 4), dim=-1)
    assert torch.allclose(cos.abs(), torch.ones(4), atol=1e-3)


def test_random_subbag_mask_keeps_half_at_least_one():
    mask = torch.tensor([[1] * 10, [1] * 3 + [0] * 7, [1] + [0] * 9], dtype=torch.bool)
    sub = random_subbag_mask(mask, 0.5, torch.Generator().manual_seed(1))
    assert sub.sum(1).tolist() == [5, 2, 1]
    assert not (sub & ~mask).any()


def test_vat_terms_hand_computed_for_constant_model():
    c = 1.5

    def bag_fn(xx, m, adj=None):
        return torch.full((xx.shape[0],), c) + 0.0 * xx.flatten(1).sum(1)

    x = torch.rand(2, 6, 3)
    mask = torch.ones(2, 6, dtype=torch.bool)
    y = torch.tensor([1.0, 0.0])
    terms = vat_mil_terms(lambda xx, m: xx, bag_fn, x, mask, y, noise_fraction=0.2, data_range=(0.0, 1.0), delta=1.0,
                          perturbation="random", xi=1e-6, power_iterations=1, subbag_fraction=0.5,
                          subbag_realisations=3, use={"noise": True, "perturbation": True, "entropy": True})
    p = 1 / (1 + math.exp(-c))
    h = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    bce = 0.5 * (-math.log(p) - math.log(1 - p))
    assert math.isclose(float(terms["classification"]), bce, rel_tol=1e-5)
    # BCE(T(X), T(X')) with T(X') = T(X) is the entropy of T(X)
    for k in ("noise", "perturbation", "entropy"):
        assert math.isclose(float(terms[k]), h, rel_tol=1e-5), k


def test_vat_terms_switch_off_and_gradients_flow():
    lin = torch.nn.Linear(3, 1)

    def bag_fn(xx, m, adj=None):
        s = lin(xx).squeeze(-1) * m
        return s.sum(1) / m.sum(1)

    x = torch.rand(1, 5, 3)
    mask = torch.ones(1, 5, dtype=torch.bool)
    terms = vat_mil_terms(lambda xx, m: xx, bag_fn, x, mask, torch.tensor([1.0]), noise_fraction=0.2, data_range=(0.0, 1.0),
                          delta=0.5, perturbation="adversarial", xi=1e-6, power_iterations=1,
                          subbag_fraction=0.5, subbag_realisations=1,
                          use={"noise": False, "perturbation": True, "entropy": True})
    assert set(terms) == {"classification", "perturbation", "entropy"}
    sum(terms.values()).backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_split_model_path_equals_whole_model_path():
    """Encoding once (encode/head) gives the same four terms as calling the whole model each time."""
    from milkit.methods.distill_to_label import split_model
    from milkit.models.factory import build_mil_model, model_config
    from milkit.nn.encoders import EncoderConfig

    model = build_mil_model(model_config({"name": "abmil"}), EncoderConfig(name="linear", in_dim=4, out_dim=8))
    x = torch.rand(2, 6, 4)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    kw = dict(noise_fraction=0.2, data_range=(0.0, 1.0), delta=0.5, perturbation="random", xi=1e-6,
              power_iterations=1, subbag_fraction=0.5, subbag_realisations=2,
              use={"noise": True, "perturbation": True, "entropy": True})
    enc, head = split_model(model)
    a = vat_mil_terms(enc, head, x, mask, torch.tensor([1.0, 0.0]), generator=torch.Generator().manual_seed(3), **kw)
    b = vat_mil_terms(lambda xx, m: xx, lambda xx, m, adj=None: model(xx, m).bag_logits, x, mask, torch.tensor([1.0, 0.0]),
                      generator=torch.Generator().manual_seed(3), **kw)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def _linear_bag(w):
    def bag_fn(xx, m, adj=None):
        return ((xx @ w) * m).sum(1)

    return bag_fn


def test_power_step_does_not_underflow_on_large_instances():
    """Issue 12: with ξ = 1e-6 absolute, x + ξd == x in float32 for ‖x‖ ~ 100s, the gradient is 0
    and L_δ vanished; ξ relative to ‖x_k‖ keeps the adversarial direction (±w for a linear bag)."""
    g = torch.Generator().manual_seed(0)
    x = 300.0 * torch.rand(2, 6, 16, generator=g)
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2], dtype=torch.bool)
    w = torch.randn(16, generator=g)

    def fn(xx, m, adj=None):  # bag logit of order 1 on instances of norm ~700
        return ((xx @ w) * m).sum(1) / 1000.0

    xd = perturbed_bag(fn, x, mask, fn(x, mask), delta=1.0, mode="adversarial")  # default ξ
    d = xd - x
    real = d[mask]
    assert torch.allclose(real.norm(dim=-1), torch.ones(len(real)), atol=1e-3)
    cos = torch.nn.functional.cosine_similarity(real, w.expand_as(real), dim=-1)
    assert torch.all(cos.abs() > 0.99)
    assert torch.all(d[~mask] == 0)


def test_zero_gradient_falls_back_to_the_random_direction():
    def const(xx, m, adj=None):
        return torch.full((xx.shape[0],), 0.3) + 0.0 * xx.flatten(1).sum(1)

    x = torch.rand(1, 4, 5)
    mask = torch.ones(1, 4, dtype=torch.bool)
    xd = perturbed_bag(const, x, mask, const(x, mask), delta=0.5, mode="adversarial")
    assert torch.allclose((xd - x)[0].norm(dim=-1), torch.full((4,), 0.5), atol=1e-5)


def test_ball_radius_draws_within_the_norm_ball():
    """§III-B 'random perturbation within the norm ball': ‖Δx_k‖ ~ U(0, δ)."""
    x = torch.rand(1, 200, 3)
    mask = torch.ones(1, 200, dtype=torch.bool)
    fn = _linear_bag(torch.ones(3))
    xd = perturbed_bag(fn, x, mask, fn(x, mask), delta=2.0, mode="random", radius="ball",
                       generator=torch.Generator().manual_seed(0))
    r = (xd - x)[0].norm(dim=-1)
    assert float(r.max()) <= 2.0 + 1e-5 and float(r.min()) < 0.2 and abs(float(r.mean()) - 1.0) < 0.15


def test_noise_count_is_per_bag_not_the_smallest_bag():
    seen = []

    def head(h, m, adj=None):
        seen.append(m.sum(1).tolist())
        return (h.sum(-1) * m).sum(1)

    x = torch.rand(2, 10, 3)
    mask = torch.tensor([[1] * 10, [1] * 5 + [0] * 5], dtype=torch.bool)
    vat_mil_terms(lambda xx, m: xx, head, x, mask, torch.tensor([1.0, 0.0]), noise_fraction=0.2,
                  data_range=(0.0, 1.0), delta=1.0, perturbation="random", xi=1e-3, power_iterations=1,
                  subbag_fraction=0.5, subbag_realisations=1, use={"noise": True, "perturbation": False, "entropy": False})
    assert seen[1] == [12, 6]  # K + max(1, round(0.2·K)) per bag: 10 + 2 and 5 + 1
    xn, mn = noise_bag(x[:, :0], mask[:, :0], torch.tensor([2, 1]), 0.0, 1.0)
    assert mn.tolist() == [[True, True], [True, False]] and torch.all(xn[1, 1] == 0)

import pytest
import torch

from milkit.data.bag import Bag, collate_bags


def _bag(n, i=0, d=3):
    return Bag(torch.randn(n, d), label=i % 2, bag_id=f"b{i}", instance_labels=torch.arange(n) % 2,
               coords=torch.arange(2 * n).view(n, 2))


def test_collate_pads_with_mask_and_keeps_values():
    bags = [_bag(2, 0), _bag(5, 1), _bag(3, 2)]
    b = collate_bags(bags)
    assert b.instances.shape == (3, 5, 3)
    assert b.mask.sum(1).tolist() == [2, 5, 3]
    assert b.sizes.tolist() == [2, 5, 3]
    assert torch.equal(b.instances[0, :2], bags[0].instances)
    assert torch.all(b.instances[0, 2:] == 0)
    assert b.instance_labels[0, 2:].tolist() == [-1, -1, -1]
    assert torch.equal(b.coords[2, :3], bags[2].coords)
    assert b.labels.tolist() == [0.0, 1.0, 0.0]


def test_bag_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="instance labels"):
        Bag(torch.randn(3, 2), 1, "x", instance_labels=torch.zeros(2))
    with pytest.raises(ValueError, match="coords"):
        Bag(torch.randn(3, 2), 1, "x", coords=torch.zeros(4, 2))


def test_collate_rejects_mixed_instance_shapes():
    with pytest.raises(ValueError, match="expected"):
        collate_bags([Bag(torch.randn(2, 3), 0, "a"), Bag(torch.randn(2, 4), 0, "b")])

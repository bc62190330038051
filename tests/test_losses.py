import math

import torch

from training.losses import dice_loss, nel_loss, one_hot_targets, sigmoid_focal_loss


def test_focal_matches_hand_example():
    # one pixel, two classes, target class 0
    logits = torch.tensor([0.0, 2.0]).view(1, 2, 1, 1)
    targets = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    weight = torch.ones(1, 1, 1)
    p0, p1 = 0.5, 1 / (1 + math.exp(-2))
    pos = 0.25 * (1 - p0) ** 2 * -math.log(p0)
    neg = 0.75 * p1**2 * -math.log(1 - p1)
    assert abs(float(sigmoid_focal_loss(logits, targets, weight)) - (pos + neg) / 2) < 1e-6


def test_dice_matches_hand_example():
    logits = torch.tensor([[0.0, 0.0]]).view(1, 1, 1, 2)  # p = 0.5 on two pixels
    targets = torch.tensor([[1.0, 0.0]]).view(1, 1, 1, 2)
    weight = torch.ones(1, 1, 2)
    expected = 1 - (2 * 0.5 + 1) / (1.0 + 1.0 + 1)
    assert abs(float(dice_loss(logits, targets, weight)) - expected) < 1e-6


def test_one_hot_ignores_ignore_index():
    labels = torch.tensor([[[0, 255], [1, 1]]])
    t, ignored = one_hot_targets(labels, 2, 255)
    assert t[0, :, 0, 1].sum() == 0 and ignored[0, 0, 1]
    assert t[0, 1, 1, 0] == 1


def test_ignore_as_negative_changes_the_loss():
    torch.manual_seed(0)
    logits = torch.randn(1, 3, 4, 4)
    labels = torch.full((1, 4, 4), 255)
    labels[0, :2] = 1
    a = nel_loss(logits, labels, 255, 20.0, 1.0, ignore_as_negative=True)
    b = nel_loss(logits, labels, 255, 20.0, 1.0, ignore_as_negative=False)
    assert a["focal"] > b["focal"]
    valid = torch.zeros(1, 4, 4, dtype=torch.bool)
    valid[0, :2] = True
    c = nel_loss(logits, labels, 255, 20.0, 1.0, ignore_as_negative=True, valid=valid)
    assert torch.allclose(c["focal"], b["focal"])


def test_weights_scale_and_zero_switches_off():
    logits, labels = torch.randn(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long)
    full = nel_loss(logits, labels, 255, 2.0, 1.0)
    off = nel_loss(logits, labels, 255, 0.0, 1.0)
    assert "focal" not in off and torch.allclose(off["dice"], full["dice"])


def test_labels_outside_the_vocabulary_are_rejected():
    import pytest

    with pytest.raises(ValueError, match="outside 0..1"):
        one_hot_targets(torch.tensor([[[0, 2]]]), 2, 255)

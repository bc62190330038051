import math

import torch

from clipteacher.train.losses import dice_loss, nel_loss, one_hot_targets, sigmoid_focal_loss


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


def test_ignore_as_negative_matches_hand_example():
    # two pixels, two seen classes: pixel 0 is class 0, pixel 1 is ignored
    logits = torch.tensor([[0.0, 1.0], [0.0, -1.0]]).view(1, 2, 1, 2)
    labels = torch.tensor([[[0, 255]]])

    def focal(z: float, y: int) -> float:
        p = 1 / (1 + math.exp(-z))
        return 0.25 * (1 - p) ** 2 * -math.log(p) if y else 0.75 * p**2 * -math.log(1 - p)

    labelled = (focal(0.0, 1) + focal(0.0, 0)) / 2  # mean over the two classes
    ignored = (focal(1.0, 0) + focal(-1.0, 0)) / 2  # both classes are negatives
    a = nel_loss(logits, labels, 255, 20.0, 0.0, ignore_as_negative=True)
    b = nel_loss(logits, labels, 255, 20.0, 0.0, ignore_as_negative=False)
    assert abs(float(a["focal"]) - 20 * (labelled + ignored) / 2) < 1e-5
    assert abs(float(b["focal"]) - 20 * labelled) < 1e-5
    # padding (valid False) never counts, even as a negative
    c = nel_loss(logits, labels, 255, 20.0, 0.0, ignore_as_negative=True, valid=torch.tensor([[[True, False]]]))
    assert abs(float(c["focal"]) - 20 * labelled) < 1e-5


def test_weights_scale_and_zero_switches_off():
    logits, labels = torch.randn(1, 2, 3, 3), torch.zeros(1, 3, 3, dtype=torch.long)
    full = nel_loss(logits, labels, 255, 2.0, 1.0)
    off = nel_loss(logits, labels, 255, 0.0, 1.0)
    assert "focal" not in off and torch.allclose(off["dice"], full["dice"])


def test_labels_outside_the_vocabulary_are_rejected():
    import pytest

    with pytest.raises(ValueError, match="outside 0..1"):
        one_hot_targets(torch.tensor([[[0, 2]]]), 2, 255)


def test_dense_distill_loss_matches_hand_example():
    from clipteacher.train.losses import dense_distill_loss

    unit = torch.nn.functional.normalize(torch.randn(1, 3, 2, 2), dim=1)
    dense = torch.zeros(1, 3, 2, 2)
    dense[0, :, 0, 0] = 5 * unit[0, :, 0, 0]  # same direction: 1 - cos = 0 (the norm does not matter)
    dense[0, :, 0, 1] = -unit[0, :, 0, 1]  # opposite: 2
    dense[0, :, 1, 0] = -unit[0, :, 1, 0]  # labelled cell: not counted
    labels = torch.tensor([[[255, 255], [0, 255]]])  # cell (1, 1) is unlabelled but its token is zero: skipped
    loss = dense_distill_loss(unit, dense, labels, torch.ones(1, 2, 2, dtype=torch.bool))
    assert abs(float(loss) - 1.0) < 1e-5  # (0 + 2) / 2


def test_vocab_distill_matches_hand_example():
    # one cell; student points at name 0, teacher at name 1; tau 1: KL = (e - 1) / (e + 1)
    from clipteacher.train.losses import vocab_distill_loss

    unit = torch.tensor([1.0, 0.0]).view(1, 2, 1, 1)
    dense = torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)  # not unit: the loss normalises the teacher token
    text = torch.eye(2)
    expected = (math.e - 1) / (math.e + 1)
    assert abs(float(vocab_distill_loss(unit, dense, text, 1.0)) - expected) < 1e-5
    assert float(vocab_distill_loss(unit, unit * 2, text, 0.05)) < 1e-6  # same direction: no loss


def test_vocab_distill_pools_student_to_teacher_grid_and_skips_padding():
    from clipteacher.train.losses import vocab_distill_loss

    text = torch.eye(2)
    # 2 x 2 student cells averaging to name 0, one teacher token pointing at name 1, and a zero (padding) token
    unit = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [1.0, -0.2]]).T.reshape(1, 2, 1, 2).repeat(1, 1, 2, 2), dim=1)
    dense = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).T.reshape(1, 2, 1, 2)
    expected = (math.e - 1) / (math.e + 1)
    assert abs(float(vocab_distill_loss(unit, dense, text, 1.0)) - expected) < 1e-5
    # every cell padding: a zero loss that still backpropagates
    unit.requires_grad_(True)
    zero = vocab_distill_loss(unit, torch.zeros(1, 2, 1, 2), text, 1.0)
    zero.backward()
    assert float(zero.detach()) == 0.0

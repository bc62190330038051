import numpy as np

from clipteacher.train.metrics import ConfusionMatrix, summarize


def test_confusion_and_summary_match_hand_example():
    classes, unseen = ["a", "b", "c"], ["b"]
    cm = ConfusionMatrix(3)
    label = np.array([[0, 0, 1, 1], [2, 2, 255, 255]])
    pred = np.array([[0, 1, 1, 1], [2, 0, 2, 0]])
    cm.update(pred, label)
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]
    m = summarize(cm.matrix, classes, unseen)
    # IoU a = 1/(1+1+1)=1/3, b = 2/(2+1)=2/3, c = 1/(1+1)=1/2; seen a, c; unseen b
    s, u = (100 / 3 + 50) / 2, 200 / 3
    assert abs(m["mIoU(S)"] - s) < 1e-9
    assert abs(m["mIoU(U)"] - u) < 1e-9
    assert abs(m["pAcc"] - 4 / 6 * 100) < 1e-9
    assert abs(m["hIoU"] - 2 * s * u / (s + u)) < 1e-9  # harmonic (51.28), not arithmetic (54.17)
    assert abs(m["per_class"]["a"] - 100 / 3) < 1e-9


def test_pixels_won_by_a_distractor_are_errors_of_their_class_and_no_class_of_the_means():
    """Column 2 = any name outside the dataset (clipteacher-eval --distractors)."""
    cm = ConfusionMatrix(3)
    label = np.array([0, 0, 0, 0, 1, 1, 255])
    pred = np.array([0, 0, 2, 2, 1, 0, 2])
    cm.update(pred, label)
    m = summarize(cm.matrix, ["a", "b"], [])
    # a: TP 2, FN 2 (both to the distractor), FP 1 -> 2/5; b: TP 1, FN 1 -> 1/2; the distractor enters no mean
    assert abs(m["per_class"]["a"] - 40) < 1e-9 and abs(m["per_class"]["b"] - 50) < 1e-9
    assert abs(m["mIoU"] - 45) < 1e-9 and list(m["per_class"]) == ["a", "b"]
    assert abs(m["pAcc"] - 3 / 6 * 100) < 1e-9 and abs(m["distractor_share"] - 2 / 6 * 100) < 1e-9
    assert "distractor_share" not in summarize(cm.matrix[:2, :2], ["a", "b"], [])


def test_accumulates_over_images_not_per_image_mean():
    cm = ConfusionMatrix(2)
    cm.update(np.array([0, 0, 0, 0]), np.array([0, 0, 0, 1]))
    cm.update(np.array([1]), np.array([1]))
    m = summarize(cm.matrix, ["x", "y"], ["y"])
    assert abs(m["per_class"]["x"] - 75.0) < 1e-9  # 3 / (3 + 1)
    assert abs(m["per_class"]["y"] - 50.0) < 1e-9  # 1 / (1 + 1)
    assert abs(m["hIoU"] - 2 * 75 * 50 / 125) < 1e-9


def test_class_absent_from_ground_truth_is_left_out():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1]), np.array([0, 1]))
    m = summarize(cm.matrix, ["a", "b", "c"], ["b"])
    assert m["per_class"]["c"] is None
    assert m["mIoU(S)"] == 100.0


def test_class_predicted_but_absent_from_ground_truth_counts_as_zero():
    # Ground truth has only a and b; c is predicted on one a pixel (a false positive of an absent class).
    cm = ConfusionMatrix(4)
    cm.update(np.array([0, 0, 2, 1, 1]), np.array([0, 0, 0, 1, 1]))
    classes, unseen = ["a", "b", "c", "d"], ["b", "c"]
    m = summarize(cm.matrix, classes, unseen)
    # a: TP 2, FN 1 -> 2/3; b: 2/2 = 1; c: TP 0, FP 1 -> 0 (counted); d: in neither -> skipped (NaN)
    assert m["per_class"]["c"] == 0.0
    assert m["per_class"]["d"] is None
    assert abs(m["mIoU(S)"] - 200 / 3) < 1e-9  # a only (d skipped)
    assert abs(m["mIoU(U)"] - 50.0) < 1e-9  # (100 + 0) / 2
    assert abs(m["mIoU"] - (200 / 3 + 100 + 0) / 3) < 1e-9
    assert abs(m["hIoU"] - 2 * (200 / 3) * 50 / (200 / 3 + 50)) < 1e-9
    old = summarize(cm.matrix, classes, unseen, absent="gt_only")  # the previous rule hides c
    assert old["per_class"]["c"] is None
    assert abs(old["mIoU(U)"] - 100.0) < 1e-9

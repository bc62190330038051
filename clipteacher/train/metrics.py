"""Zero-shot segmentation metrics over a whole split (docs/METHOD.md#evaluation-metrics): pAcc, mIoU(S), mIoU(U), hIoU.

IoUs come from one confusion matrix accumulated over every image (MMSeg style), not from
per-image averages. hIoU is recomputed from the two means, never copied.

Which classes enter a mean (`absent`): "mmseg" (default) averages every class whose union
TP + FP + FN is positive, so a class predicted where the ground truth never has it counts with
IoU 0; only classes absent from both ground truth and prediction (NaN) are skipped, as MMSeg's
nanmean does. "gt_only" (the rule before 2026-11-22) averages only classes present in the ground
truth, which hides false positives of absent classes; it is kept to compare old numbers.
"""
from __future__ import annotations

import numpy as np


class ConfusionMatrix:
    """C x C counts, rows = ground truth, columns = prediction; ignore pixels are skipped."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: np.ndarray, label: np.ndarray) -> None:
        """pred, label: same-shape integer arrays."""
        keep = label != self.ignore_index
        gt = label[keep].astype(np.int64)
        pr = pred[keep].astype(np.int64)
        if gt.size and (gt.max() >= self.num_classes or gt.min() < 0):
            raise ValueError(f"label value {gt.max()} outside 0..{self.num_classes - 1}")
        self.matrix += np.bincount(gt * self.num_classes + pr, minlength=self.num_classes**2).reshape(
            self.num_classes, self.num_classes
        )

    def merge(self, other: np.ndarray) -> None:
        self.matrix += other


def iou_per_class(matrix: np.ndarray) -> np.ndarray:
    """IoU_c = TP / (TP + FP + FN); NaN for a class absent from both ground truth and prediction."""
    tp = np.diag(matrix).astype(np.float64)
    denom = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)


def harmonic(s: float, u: float) -> float:
    return 0.0 if s + u <= 0 else 2 * s * u / (s + u)


ABSENT_RULES = ("mmseg", "gt_only")


def summarize(matrix: np.ndarray, classes: list[str], unseen: list[str], absent: str = "mmseg") -> dict:
    """Percentages: pAcc, mIoU over all / seen / unseen classes, hIoU, and per-class IoU.

    matrix: C x C (rows ground truth), or (C + N) x (C + N) whose last N columns count pixels predicted as names
    outside the dataset (distractors, `clipteacher-eval --distractors`; their rows are empty): errors for their
    ground-truth class, never a class of the means; "distractor_share" is their share of the pixels. absent="mmseg": a class enters
    the means when its union is positive (predicted but never in the ground truth -> IoU 0 counts); classes in
    neither are NaN, skipped, and null in per_class. absent="gt_only": only classes present in the ground truth count.
    """
    if absent not in ABSENT_RULES:
        raise ValueError(f"absent must be one of {', '.join(ABSENT_RULES)}; got {absent!r}")
    extra = matrix.shape[0] - len(classes)
    if extra < 0 or matrix[len(classes):].any():
        raise ValueError(f"a {matrix.shape[0]}-row matrix for {len(classes)} classes: only columns of predictions "
                         f"(distractor names, with empty rows) may follow")
    distractor = float(matrix[:, len(classes):].sum() / max(matrix.sum(), 1) * 100) if extra else None
    iou = iou_per_class(matrix)[: len(classes)]
    matrix = matrix[: len(classes)]  # rows: ground truth; pAcc's total keeps the distractor column
    counted = ~np.isnan(iou) if absent == "mmseg" else matrix.sum(1) > 0
    unseen_ids = [i for i, c in enumerate(classes) if c in set(unseen)]
    seen_ids = [i for i in range(len(classes)) if i not in set(unseen_ids)]

    def mean_of(ids: list[int]) -> float:
        vals = [iou[i] for i in ids if counted[i]]
        return float(np.mean(vals) * 100) if vals else float("nan")

    total = matrix.sum()
    s, u = mean_of(seen_ids), mean_of(unseen_ids)
    return {
        "pAcc": float(np.diag(matrix).sum() / total * 100) if total else float("nan"),
        "mIoU": mean_of(list(range(len(classes)))),
        "mIoU(S)": s,
        "mIoU(U)": u,
        "hIoU": harmonic(s, u) if not (np.isnan(s) or np.isnan(u)) else float("nan"),
        "per_class": {c: (None if not counted[i] or np.isnan(iou[i]) else float(iou[i] * 100)) for i, c in enumerate(classes)},
        "pixels": int(total),
    } | ({"distractor_share": distractor} if extra else {})

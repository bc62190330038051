"""Seen-class loss: ZegCLIP's non-mutually-exclusive loss (NEL), sigmoid focal + dice (docs/METHOD.md#seen-class-loss).

Per-class sigmoids rather than a softmax, so adding classes at test time does not change how
an existing class is scored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def one_hot_targets(labels: torch.Tensor, num_classes: int, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """labels: B x H x W -> (targets B x C x H x W float, ignored B x H x W bool)."""
    ignored = labels == ignore_index
    if bool(((labels >= num_classes) & ~ignored).any()):
        raise ValueError(f"label value {int(labels[~ignored].max())} outside 0..{num_classes - 1}: labels must index "
                         "the training vocabulary")
    safe = labels.clone()
    safe[ignored] = 0
    targets = F.one_hot(safe.long(), num_classes).permute(0, 3, 1, 2).float()
    targets = targets * (~ignored).unsqueeze(1)
    return targets, ignored


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor,
                       alpha: float = 0.25, gamma: float = 2.0, class_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Focal loss averaged over classes and weighted pixels (ZegCLIP's normalisation).

    logits, targets: B x C x H x W; weight: B x H x W (0 drops a pixel); class_mask: B x C bool, the
    classes each image may score (its dataset's vocabulary; default all): the class mean runs over them,
    and an image with none (an unlabelled pool image) drops out.
    """
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    if class_mask is None:
        loss = loss.mean(dim=1)
    else:
        m = class_mask.to(loss.dtype)
        loss = torch.einsum("bchw,bc->bhw", loss, m) / m.sum(1).clamp(min=1.0)[:, None, None]
        weight = weight * (m.sum(1) > 0).to(weight.dtype)[:, None, None]
    loss = loss * weight
    return loss.sum() / weight.sum().clamp(min=1.0)


def dice_loss(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1 - (2 sum(p y) + 1) / (sum(p) + sum(y) + 1), per image and class present in the image, averaged.

    logits, targets: B x C x H x W; weight: B x H x W.
    """
    p = logits.sigmoid() * weight.unsqueeze(1)
    y = targets * weight.unsqueeze(1)
    inter = (p * y).flatten(2).sum(-1)
    denom = p.flatten(2).sum(-1) + y.flatten(2).sum(-1)
    dice = 1 - (2 * inter + 1) / (denom + 1)
    present = y.flatten(2).sum(-1) > 0
    if not present.any():
        return logits.sum() * 0.0
    return dice[present].mean()


def dense_distill_loss(unit: torch.Tensor, dense: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor,
                       ignore_index: int = 255) -> torch.Tensor:
    """Mean 1 - cos(student, teacher) over unlabelled valid cells (beyond the paper: docs/METHOD.md#dense-distillation).

    unit: B x D x h x w unit student features; dense: B x D x h' x w' teacher tokens aligned with the crop (zero
    where the teacher saw only padding), resampled bilinearly to h x w; labels, valid: B x h x w at the features'
    resolution. Cells whose resampled token is zero are skipped.
    """
    target = F.interpolate(dense.float(), size=unit.shape[-2:], mode="bilinear", align_corners=False)
    norm = target.norm(dim=1)
    keep = (labels == ignore_index) & valid & (norm > 1e-6)
    if not keep.any():
        return unit.sum() * 0.0
    cos = (unit * target).sum(1) / norm.clamp(min=1e-6)
    return (1 - cos)[keep].mean()


def vocab_distill_loss(feats: torch.Tensor, dense: torch.Tensor, text: torch.Tensor, temperature: float,
                       valid: torch.Tensor | None = None, scores=None) -> torch.Tensor:
    """KL(teacher || student) of softmaxes over a large fixed vocabulary, per teacher token (beyond the paper:
    docs/METHOD.md#vocabulary-distillation).

    feats: B x F x h x w student features; dense: B x D x h' x w' teacher tokens aligned with the crop (zero
    where the teacher saw only padding); text: V x D unit name embeddings; valid: B x h x w bool at the features'
    resolution (False on padding); scores: (B x F x h x w, V x D) -> B x V x h x w cosines (default: plain
    cosine, F = D; `Student.scores` for a gated student). The student is average-pooled to the teacher's grid:
    the teacher says nothing finer, and V is large (a thousand names), so scoring every stride-4 cell would cost
    20x more for no new target. Labelled and unlabelled cells alike: every name's score is constrained
    everywhere, not only the trained ones.
    """
    grid = dense.shape[-2:]
    pooled = F.adaptive_avg_pool2d(feats, grid)
    dense = dense.float()
    norm = dense.norm(dim=1)
    keep = norm > 1e-6
    if valid is not None:
        keep &= F.adaptive_avg_pool2d(valid[:, None].float(), grid)[:, 0] > 0.5
    if not keep.any():
        return feats.sum() * 0.0
    if scores is None:
        s = F.normalize(pooled, dim=1).permute(0, 2, 3, 1)[keep] @ text.T  # N x V
    else:
        s = scores(pooled, text).permute(0, 2, 3, 1)[keep]
    t = (dense / norm.clamp(min=1e-6)[:, None]).permute(0, 2, 3, 1)[keep]
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t @ text.T / temperature, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)  # KL(t || s), mean over rows


def nel_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, focal_weight: float,
             dice_weight: float, alpha: float = 0.25, gamma: float = 2.0,
             ignore_as_negative: bool = True, valid: torch.Tensor | None = None,
             class_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Focal + dice on seen-class logits.

    logits: B x C_s x H x W, labels: B x H x W with seen ids or ignore; valid: B x H x W bool,
    False on padding (never counted). With ignore_as_negative (ZegCLIP's code), ignored pixels
    are negatives for every seen class, which pushes unseen objects away from seen classes.
    class_mask: B x C_s bool, each image's own vocabulary (several datasets): other classes are
    neither positives nor negatives there. Dice needs no mask: it only scores classes present in the labels.
    """
    targets, ignored = one_hot_targets(labels, logits.shape[1], ignore_index)
    weight = torch.ones_like(labels, dtype=logits.dtype) if ignore_as_negative else (~ignored).to(logits.dtype)
    if valid is not None:
        weight = weight * valid.to(logits.dtype)
    out = {}
    if focal_weight > 0:
        out["focal"] = focal_weight * sigmoid_focal_loss(logits, targets, weight, alpha, gamma, class_mask)
    if dice_weight > 0:
        out["dice"] = dice_weight * dice_loss(logits, targets, weight)
    return out


def vocab_head_loss(logits: torch.Tensor, dense: torch.Tensor, text: torch.Tensor, temperature: float,
                    valid: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) between the teacher's softmax over the 1000 ImageNet names (cosine of its dense
    tokens to their embeddings, / temperature) and the student vocabulary head's own ImageNet softmax (beyond the
    paper: docs/METHOD.md#vocabulary-head). The head names pixels by that classifier, so this is what keeps it
    naming them while the segmentation losses move the backbone under it.

    logits: B x h x w x 1000 (the head's classifier, stride 32); dense: B x D x h' x w' teacher tokens (zero on
    padding); text: 1000 x D unit embeddings in the classifier's order; valid: B x H x W bool (False on padding).
    Both sides go to the coarser of the two grids, so no cell is scored twice."""
    grid = tuple(min(a, b) for a, b in zip(logits.shape[1:3], dense.shape[-2:]))
    student = F.adaptive_avg_pool2d(logits.float().permute(0, 3, 1, 2), grid)  # B x 1000 x g x g
    dense = F.adaptive_avg_pool2d(dense.float(), grid)
    norm = dense.norm(dim=1)
    keep = norm > 1e-6
    if valid is not None:
        keep &= F.adaptive_avg_pool2d(valid[:, None].float(), grid)[:, 0] > 0.5
    if not keep.any():
        return logits.sum() * 0.0
    log_ps = F.log_softmax(student.permute(0, 2, 3, 1)[keep], dim=-1)  # N x 1000
    t = (dense / norm.clamp(min=1e-6)[:, None]).permute(0, 2, 3, 1)[keep]
    log_pt = F.log_softmax(t @ text.T / temperature, dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)  # KL(t || s), mean over rows


def anchor_loss(logits: torch.Tensor, anchor: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """KL(anchor || student) between two ImageNet softmaxes on the same cells (learning without forgetting, beyond the
    paper: docs/METHOD.md#anchor-learning-without-forgetting): the frozen pretrained classifier's and the vocabulary head's, which segmentation
    training moves. Unlike `vocab_head_loss`, the target is the classifier's own sharp ImageNet distribution, not
    the teacher's name cosines, and no teacher token is needed (it holds on every crop, cached teacher or not).

    logits, anchor: B x h x w x 1000 (stride 32); valid: B x H x W bool (False on padding), pooled to the grid."""
    if valid is None:
        keep = torch.ones(logits.shape[:3], dtype=torch.bool, device=logits.device)
    else:
        keep = F.adaptive_avg_pool2d(valid[:, None].float(), logits.shape[1:3])[:, 0] > 0.5
    if not keep.any():
        return logits.sum() * 0.0
    log_ps = F.log_softmax(logits.float()[keep], dim=-1)  # N x 1000
    log_pt = F.log_softmax(anchor.float()[keep], dim=-1)
    return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True)  # KL(t || s), mean over rows

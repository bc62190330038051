"""The ZegCLIP / TagCLIP objective (docs/METHOD.md#zegclip): what `Distiller` is for the student.

ZegCLIP: the non-mutually-exclusive loss (sigmoid focal + dice, `clipteacher.train.losses.nel_loss`) on the
seen classes, on the masks of every decoder layer. TagCLIP adds a dice loss on the trusty map against G_A
(1 on seen-labelled pixels, 0 on ignored ones; padding never counts) and optionally a BCE on per-class
image-level presence (its L_cls). No teacher tokens are used: CLIP is inside the model.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipteacher.config import Config
from clipteacher.models.zegclip import ZegCLIP
from clipteacher.train.distill import autocast
from clipteacher.train.losses import dice_loss, nel_loss


def presence_targets(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """labels B x H x W -> B x C float, 1 where the class labels at least one pixel of the image."""
    out = torch.zeros(labels.shape[0], num_classes + 1, device=labels.device)
    idx = torch.where(labels == ignore_index, num_classes, labels.long()).flatten(1)
    out.scatter_(1, idx, 1.0)
    return out[:, :num_classes]


class ZegCLIPLearner(nn.Module):
    """ZegCLIP (or TagCLIP) + its losses. forward(...) -> dict of weighted loss terms, as `Distiller.forward`."""

    needs_teacher = False  # the model holds CLIP; run_steps skips the separate teacher pass

    def __init__(self, cfg: Config, model: ZegCLIP, text_seen: torch.Tensor, ignore_index: int = 255,
                 vocab_mask: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        self.ignore_index = ignore_index
        self.student = model  # the name the engine's validation and checkpoints use
        self.plm = None
        self.register_buffer("text_seen", text_seen.clone())
        mask = torch.ones(1, text_seen.shape[0], dtype=torch.bool) if vocab_mask is None else vocab_mask.clone()
        self.register_buffer("vocab_mask", mask, persistent=False)
        self.amp: torch.dtype | None = None

    def pseudo_labels(self, dense, labels, valid) -> None:
        return None

    def forward(self, images: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, cls=None, pseudo=None,
                source: torch.Tensor | None = None, dense=None, step: int = 0) -> dict[str, torch.Tensor]:
        """images: B x 3 x S x S, labels/valid: B x S x S (seen ids or ignore; valid False on padding)."""
        lc, zc = self.cfg.loss, self.cfg.zegclip
        mask = None if self.vocab_mask.shape[0] == 1 else self.vocab_mask[source]
        with autocast(images.device, self.amp):
            out = self.student(images, self.text_seen)
        size = labels.shape[-2:]
        losses: dict[str, torch.Tensor] = {}
        for masks in out["masks"]:  # every decoder layer, equal weights (ZegCLIP's deep supervision)
            up = F.interpolate(masks.float(), size=size, mode="bilinear", align_corners=False)
            for k, v in nel_loss(up, labels, self.ignore_index, lc.focal_weight, lc.dice_weight, lc.focal_alpha,
                                 lc.focal_gamma, lc.ignore_as_negative, valid, mask).items():
                losses[k] = losses[k] + v if k in losses else v
        if out["trust"] is not None and zc.trusty_weight > 0:
            up = F.interpolate(out["trust"].float(), size=size, mode="bilinear", align_corners=False)
            target = (labels != self.ignore_index).float()[:, None]
            losses["trusty"] = zc.trusty_weight * dice_loss(up, target, valid.float())
        if out["presence"] is not None:
            target = presence_targets(labels, self.text_seen.shape[0], self.ignore_index)
            losses["cls"] = zc.cls_weight * F.binary_cross_entropy_with_logits(out["presence"].float(), target)
        return losses

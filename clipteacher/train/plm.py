"""Pixel Learning Module (docs/METHOD.md#pixel-learning-module): pseudo labels in the ignored region and their classifier weights.

1. `make_pseudo_labels`: multi-scale K-Means on the teacher's dense tokens inside the ignored
   region, NMS-style fusion, regions written into the label map as ids after the seen classes
   (the numpy implementation in `clipteacher.pseudo`, shared with the app).
2. `PixelLearningModule`: the student's mean feature of every seen class and every pseudo
   region goes through a small generator (transformer decoder over the batch's CLS tokens, an
   MLP, or nothing) that emits classifier weights; seen outputs are pulled to the seen text
   embeddings (MSE), and a cross-entropy over [seen text ; pseudo weights] trains the student
   on seen and pseudo-labelled pixels.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from clipteacher.pseudo import pseudo_label_map, pseudo_regions, token_ignore_mask
from clipteacher.config import PLMConfig


@torch.no_grad()
def make_pseudo_labels(dense: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, num_seen: int,
                       cfg: PLMConfig, ignore_index: int = 255) -> torch.Tensor:
    """dense: B x D x h x w teacher tokens aligned with the crop; labels, valid: B x H x W.

    Returns B x H x W long on the CPU: seen ids unchanged, pseudo regions num_seen + r, the rest ignore.
    """
    out = labels.cpu().clone()
    tokens = dense.permute(0, 2, 3, 1).float().cpu().numpy()
    lab = labels.cpu().numpy()
    val = valid.cpu().numpy()
    for b in range(labels.shape[0]):
        mask = token_ignore_mask(lab[b], tokens.shape[1:3], ignore_index, cfg.ignore_fraction, val[b])
        _, fused = pseudo_regions(tokens[b], mask, cfg.windows, cfg.init, cfg.iters, cfg.fusion_threshold,
                                  cfg.fusion, cfg.min_region_tokens)
        pl = pseudo_label_map(lab[b], fused, num_seen, ignore_index, val[b])
        out[b] = torch.from_numpy(pl.astype(np.int64))
    return out


def region_means(unit: torch.Tensor, labels: torch.Tensor, num_ids: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean unit feature per label id, per image.

    unit: B x D x h x w L2-normalised features, labels: B x h x w (ids < num_ids are counted, anything else skipped).
    Returns (means B x num_ids x D, present B x num_ids bool).
    """
    feats = unit.flatten(2)  # B x D x N
    lab = labels.flatten(1)
    keep = lab < num_ids
    onehot = F.one_hot(torch.where(keep, lab, torch.zeros_like(lab)), num_ids).to(feats.dtype) * keep.unsqueeze(-1)
    sums = torch.einsum("bdn,bnk->bkd", feats, onehot)
    counts = onehot.sum(1)
    return sums / counts.clamp(min=1).unsqueeze(-1), counts > 0


class WeightGenerator(nn.Module):
    """Turns region means into classifier weights (paper Table 5: decoder | mlp | centroid).

    queries: B x Q x D, pad: B x Q bool (True = padding), memory: M x D CLS tokens -> B x Q x D unit.
    """

    def __init__(self, cfg: PLMConfig, dim: int):
        super().__init__()
        self.kind = cfg.generator
        if self.kind == "decoder":
            layer = nn.TransformerDecoderLayer(dim, cfg.decoder_heads, dim * 2, dropout=0.0, batch_first=True)
            self.net = nn.TransformerDecoder(layer, cfg.decoder_layers)
        elif self.kind == "mlp":
            self.net = nn.Sequential(nn.Linear(dim, dim * 2), nn.GELU(), nn.Linear(dim * 2, dim))
        elif self.kind != "centroid":
            raise ValueError(f"plm.generator must be decoder, mlp or centroid, got '{self.kind}'")

    def forward(self, queries: torch.Tensor, pad: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if self.kind == "decoder":
            # One CLS token as memory makes cross-attention a constant shift; the batch's tokens
            # give the softmax something to choose between (docs/METHOD.md#weight-generator).
            mem = memory.unsqueeze(0).expand(queries.shape[0], -1, -1)
            out = queries + self.net(queries, mem, tgt_key_padding_mask=pad)
        elif self.kind == "mlp":
            out = queries + self.net(queries)
        else:
            out = queries
        return F.normalize(out, dim=-1)


class PixelLearningModule(nn.Module):
    """CE over seen + pseudo-labelled pixels with generated pseudo weights, and MSE of generated seen weights to text."""

    def __init__(self, cfg: PLMConfig, dim: int, max_regions: int = 128):
        super().__init__()
        self.cfg = cfg
        self.max_regions = max_regions
        self.generator = WeightGenerator(cfg, dim)

    def forward(self, unit: torch.Tensor, pseudo: torch.Tensor, cls: torch.Tensor, text_seen: torch.Tensor,
                scale: float, class_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """unit: B x D x h x w L2-normalised student features; pseudo: B x h x w (seen ids, num_seen + r, ignore) at
        the feature resolution; cls: B x D teacher tokens; text_seen: C_s x D; class_mask: B x C_s bool, the seen
        classes each image's CE may choose (its dataset's vocabulary; default all). Returns {'ce', 'gen'}."""
        num_seen = text_seen.shape[0]
        num_ids = num_seen + self.max_regions
        means, present = region_means(unit, pseudo, num_ids)
        pad = ~present
        pad[:, 0] &= present.any(1)  # an all-padded query set would make attention NaN
        weights = self.generator(means, pad, cls.detach())  # B x (C_s + R) x D
        zero = unit.sum() * 0.0
        seen_present = present[:, :num_seen]
        gen = ((weights[:, :num_seen] - text_seen.unsqueeze(0)) ** 2).sum(-1)[seen_present].mean() if seen_present.any() else zero
        # Classifier per image: seen text embeddings, then that image's own pseudo weights.
        classifier = torch.cat([text_seen.unsqueeze(0).expand(unit.shape[0], -1, -1), weights[:, num_seen:]], 1)
        logits = torch.einsum("bdhw,bkd->bkhw", unit, classifier) * scale
        options = torch.ones_like(seen_present) if class_mask is None else class_mask.to(seen_present.device)
        pseudo_present = torch.cat([options, present[:, num_seen:]], 1)
        logits = logits.masked_fill(~pseudo_present[:, :, None, None], -1e4)  # absent pseudo ids, other datasets' classes: not options
        target = torch.where(pseudo < num_ids, pseudo, torch.full_like(pseudo, -100))
        ce = F.cross_entropy(logits, target, ignore_index=-100) if (target >= 0).any() else zero
        return {"ce": ce, "gen": gen}

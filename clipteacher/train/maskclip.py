"""MaskCLIP+ as a training mode of the student (docs/METHOD.md#maskclip): the frozen teacher's dense scores
give pseudo labels for the unlabelled pixels, then, after a share of the schedule, the student's own
predictions do (the paper's self-training, Alg. 1). Seen pixels keep their labels throughout.

The teacher's side of MaskCLIP is in the teacher: the value-path dense tokens, and key smoothing
(`teacher.key_smoothing`; ConSE's analogue is `teacher.conse_smoothing`). Prompt denoising is here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def teacher_pseudo_labels(dense: torch.Tensor, text: torch.Tensor, temperature: float, denoise: float) -> torch.Tensor:
    """dense: B x D x h x w teacher tokens (zero on padding), text: N x D unit name embeddings ->
    B x h x w long, the best name per token, -1 where the teacher saw only padding.

    Prompt denoising (MaskCLIP Sec. 3.3): a name whose softmax confidence stays below `denoise` at every
    token of an image is not a candidate there (an image keeps all names if none passes)."""
    norm = dense.norm(dim=1)
    scores = torch.einsum("bdhw,nd->bnhw", dense.float(), text.float()) / norm.clamp(min=1e-6)[:, None] / temperature
    if denoise > 0:
        prob = scores.softmax(1) * (norm > 1e-6)[:, None]  # padding cells have no say
        keep = prob.amax(dim=(2, 3)) >= denoise  # B x N
        keep |= ~keep.any(1, keepdim=True)
        scores = scores.masked_fill(~keep[:, :, None, None], float("-inf"))
    labels = scores.argmax(1)
    return labels.masked_fill(norm <= 1e-6, -1)


def maskclip_loss(logits: torch.Tensor, labels: torch.Tensor, pseudo: torch.Tensor, valid: torch.Tensor,
                  ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy over the N names: seen-labelled cells keep their label, unlabelled cells take the pseudo label.

    logits: B x N x h x w; labels: B x h x w (indices into the first names, or ignore); pseudo: B x h x w
    (indices into all N names, -1 = none); valid: B x h x w bool (False on padding)."""
    target = torch.where(labels == ignore_index, pseudo, labels.long())
    target = target.masked_fill(~valid | (target < 0), ignore_index)
    if not (target != ignore_index).any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits, target, ignore_index=ignore_index)

"""Global Learning Module (docs/METHOD.md#global-learning-module): the teacher's CLS token pools the student's features.

Parameter-free: attention weights a = softmax_N(<g, f_i>) with the unit CLS token g as query
and the raw student features f_i as keys and values; the pooled vector is the "predicted
CLS", pulled to its own image's CLS token and pushed from the other images' tokens and
from a FIFO bank of past tokens by InfoNCE.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from clipteacher.config import GLMConfig


class CLSTokenBank(nn.Module):
    """FIFO queue of past teacher CLS tokens (S x D). The teacher is frozen, so entries never go stale."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.size = size
        self.register_buffer("tokens", torch.zeros(size, dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))  # how many slots are filled

    def get(self) -> torch.Tensor:
        """Filled entries, oldest first: n x D."""
        return self.tokens[: int(self.count)]

    @torch.no_grad()
    def push(self, cls: torch.Tensor) -> None:
        """Append B x D tokens; the oldest fall out once the bank is full."""
        if self.size == 0:
            return
        merged = torch.cat([self.get(), cls.detach().to(self.tokens)], dim=0)[-self.size :]
        self.tokens.zero_()
        self.tokens[: len(merged)] = merged
        self.count.fill_(len(merged))


def all_gather_tokens(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate B x D tensors over DDP ranks (no grad needed: teacher tokens). Returns (all, offset of this rank)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x, 0
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0), dist.get_rank() * x.shape[0]


class GlobalLearningModule(nn.Module):
    """Pools student features with the CLS token and scores them by InfoNCE against CLS tokens."""

    def __init__(self, cfg: GLMConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        self.bank = CLSTokenBank(cfg.bank_size, dim)

    def attention(self, cls: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Eq. 1. cls: B x D (unit), features: B x D x H x W -> weights B x H x W summing to 1."""
        b, d, h, w = features.shape
        scores = torch.einsum("bd,bdn->bn", F.normalize(cls, dim=-1), features.flatten(2))
        if self.cfg.scaled:
            scores = scores / d**0.5
        return scores.softmax(dim=-1).view(b, h, w)

    def pool(self, cls: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Eq. 2 (or the mean / max ablations of Table 4): predicted CLS, B x D."""
        flat = features.flatten(2)
        if self.cfg.pooling == "attention":
            weights = self.attention(cls, features).flatten(1)
            return torch.einsum("bn,bdn->bd", weights, flat)
        if self.cfg.pooling == "mean":
            return flat.mean(dim=-1)
        if self.cfg.pooling == "max":
            return flat.amax(dim=-1)
        raise ValueError(f"glm.pooling must be attention, mean or max, got '{self.cfg.pooling}'")

    def info_nce(self, predicted: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """Eq. 3. predicted, cls: B x D (this rank). Negatives: all ranks' CLS tokens plus the bank.

        The loss is computed before the bank is updated so the positive is never also a negative.
        """
        batch, offset = all_gather_tokens(cls.detach())
        keys = torch.cat([batch, self.bank.get()], dim=0)
        logits = F.normalize(predicted, dim=-1) @ F.normalize(keys, dim=-1).t() / self.cfg.temperature
        target = torch.arange(predicted.shape[0], device=predicted.device) + offset
        loss = F.cross_entropy(logits, target)
        self.bank.push(batch)  # every rank pushes the same gathered tokens, so banks stay identical
        return loss

    def forward(self, cls: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """cls: B x D teacher tokens, features: B x D x H x W student features -> scalar loss."""
        return self.info_nce(self.pool(cls, features), cls)

"""The distillation wrapper: teacher tokens in, every loss term out.

`TeacherSource` owns the frozen teacher (always eval, no grad) and hands out its tokens for a
batch of crops, either by running it (online) or from the cache. `Distiller` holds everything
that learns (student, GLM bank, PLM generator) and is what DDP wraps; the teacher stays
outside so its weights are never broadcast or all-reduced.
"""
from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipteacher.config import Config
from clipteacher.train.glm import GlobalLearningModule
from clipteacher.train.losses import anchor_loss, dense_distill_loss, nel_loss, vocab_distill_loss, vocab_head_loss
from clipteacher.train.maskclip import maskclip_loss, teacher_pseudo_labels
from clipteacher.train.plm import PixelLearningModule, make_pseudo_labels
from clipteacher.models.student import Student
from clipteacher.train.teacher_cache import CacheSet, TeacherCache


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast on `device` in `dtype`; a no-op context when dtype is None (float32)."""
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class TeacherSource:
    """Teacher CLS + dense tokens for a training batch (online or cached), on the teacher's device.

    amp: autocast dtype for the teacher's forward (None = float32); its outputs are float32 either way.
    """

    def __init__(self, teacher, cache: TeacherCache | CacheSet | None = None, amp: torch.dtype | None = None):
        self.teacher = teacher.eval()
        self.cache = cache
        self.amp = amp

    @property
    def device(self) -> torch.device:
        return self.teacher.pixel_mean.device

    @torch.no_grad()
    def __call__(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """batch: a training batch already on the teacher's device (`clipteacher.train.data.to_device`).

        -> (cls B x D, dense B x D x h x w) float32 on that device, aligned with batch['image'] (B x 3 x S x S)."""
        device = self.device
        if isinstance(self.cache, CacheSet):
            cls, dense = self.cache.lookup(batch["index"], batch["box"], batch["flip"], batch["source"])
            return cls.to(device), dense.to(device)
        if self.cache is not None:
            cls, dense = self.cache.lookup(batch["index"], batch["box"], batch["flip"])
            return cls.to(device), dense.to(device)
        self.teacher.eval()
        with autocast(device, self.amp):
            out = self.teacher(batch["image"])
        cls, dense = out.cls.float(), out.dense.float()
        # Padding is black in the crop; its tokens would form a fake region, so zero them.
        valid = F.adaptive_max_pool2d(batch["valid"][:, None].float(), dense.shape[-2:]) > 0
        return cls, dense * valid


def at_stride(x: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """Nearest-sample a B x H x W map at the centres of the feature cells: -> B x h x w."""
    stride = x.shape[-1] // feats.shape[-1]
    return x[:, stride // 2 :: stride, stride // 2 :: stride][:, : feats.shape[2], : feats.shape[3]]


class ImageNetAnchor(nn.Module):
    """The student's pretrained ImageNet classifier (backbone and vocabulary head as built, before a fine-tune or a
    resume loads other weights), frozen and always in eval mode: the target of `loss.anchor_weight`.

    forward: images B x 3 x H x W (RGB in [0, 1]) -> ImageNet logits B x H/32 x W/32 x 1000."""

    def __init__(self, student: Student):
        super().__init__()
        self.backbone = copy.deepcopy(student.backbone)
        self.classifier = copy.deepcopy(student.vocab)
        self.stage = student.stages[student.vocab.reads]
        self.register_buffer("mean", student.mean.clone(), persistent=False)
        self.register_buffer("std", student.std.clone(), persistent=False)
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> "ImageNetAnchor":
        return super().train(False)  # its BatchNorm statistics are part of what it anchors

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.classify(self.backbone((images - self.mean) / self.std)[self.stage])


def _drop_anchor(module: nn.Module, state: dict, prefix: str, _meta) -> None:
    """state_dict hook: the anchor is rebuilt from the packaged weights at every start, never saved."""
    for k in [k for k in state if k.startswith(prefix + "anchor.")]:
        del state[k]


def _anchor_not_missing(module: nn.Module, keys) -> None:
    """load_state_dict hook: a checkpoint has no anchor weights (`_drop_anchor`), so none is missing."""
    keys.missing_keys[:] = [k for k in keys.missing_keys if not k.startswith("anchor.")]


class Distiller(nn.Module):
    """Student + GLM + PLM. forward(...) -> dict of weighted loss terms (their sum is the objective)."""

    needs_teacher = True  # run_steps gives it the teacher's tokens of every batch

    def __init__(self, cfg: Config, embed_dim: int, text_seen: torch.Tensor, ignore_index: int = 255,
                 vocab_mask: torch.Tensor | None = None, text_vocab: torch.Tensor | None = None,
                 text_names: torch.Tensor | None = None):
        """text_seen: C_s x D, the training vocabulary (union over sources); vocab_mask: S x C_s bool, which
        of those classes source s may score (`clipteacher.train.sources.Sources.mask`; default: one source, all);
        text_vocab: V x D unit embeddings of the vocabulary-distillation names (needed when loss.vocab_weight > 0);
        text_names: N x D, method=maskclip_plus's pseudo-label names, the first C_s being text_seen's."""
        super().__init__()
        self.cfg = cfg
        self.ignore_index = ignore_index
        self.student = Student(cfg.student, embed_dim)
        self.anchor = None
        if cfg.loss.anchor_weight > 0:
            self.anchor = ImageNetAnchor(self.student)  # before any checkpoint's weights reach the student
            self._register_state_dict_hook(_drop_anchor)
            self.register_load_state_dict_post_hook(_anchor_not_missing)
        self.glm = GlobalLearningModule(cfg.glm, embed_dim)
        self.use_plm = cfg.loss.ce_weight > 0 or cfg.loss.gen_weight > 0
        self.plm = PixelLearningModule(cfg.plm, embed_dim) if self.use_plm else None
        self.register_buffer("text_seen", text_seen.clone())
        mask = torch.ones(1, text_seen.shape[0], dtype=torch.bool) if vocab_mask is None else vocab_mask.clone()
        self.register_buffer("vocab_mask", mask, persistent=False)  # rebuilt from the config, not a weight
        if cfg.loss.vocab_weight > 0 and text_vocab is None:
            raise ValueError("loss.vocab_weight > 0 needs the vocabulary's text embeddings (text_vocab)")
        vocab = torch.zeros(0, embed_dim) if text_vocab is None else text_vocab.clone()
        self.register_buffer("text_vocab", vocab, persistent=False)  # fixed; rebuilt from the teacher at every start
        # the 1000 ImageNet names in the vocabulary head's classifier order (loss.vocab_head_weight); set by the engine
        self.register_buffer("text_imagenet", torch.zeros(0, embed_dim), persistent=False)
        self.maskclip = cfg.method == "maskclip_plus" and cfg.maskclip.weight > 0
        if self.maskclip and text_names is None:
            raise ValueError("method=maskclip_plus needs the pseudo-label names' text embeddings (text_names)")
        names = torch.zeros(0, embed_dim) if text_names is None else text_names.clone()
        self.register_buffer("text_names", names, persistent=False)
        self.amp: torch.dtype | None = None  # autocast dtype of the student's forward (None = float32); set by the engine

    def pseudo_labels(self, dense: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor | None:
        """dense: B x D x h x w, labels/valid: B x H x W -> B x H x W pseudo-label map on labels' device, or None
        when the PLM is off. K-Means runs in numpy on the CPU whatever the device."""
        if not self.use_plm:
            return None
        pseudo = make_pseudo_labels(dense, labels, valid, self.text_seen.shape[0], self.cfg.plm, self.ignore_index)
        return pseudo.to(labels.device)

    def forward(self, images: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor, cls: torch.Tensor,
                pseudo: torch.Tensor | None, source: torch.Tensor | None = None,
                dense: torch.Tensor | None = None, step: int = 0) -> dict[str, torch.Tensor]:
        """images: B x 3 x S x S, labels/valid/pseudo: B x S x S, cls: B x D, source: B (each image's source number;
        None = all from source 0), dense: B x D x h x w teacher tokens (read by loss.dense_weight, loss.vocab_weight
        and method=maskclip_plus), step: the optimisation step (MaskCLIP+ switches to self-training by it)."""
        lc, scale = self.cfg.loss, self.cfg.student.logit_scale
        # One source: no mask, the single-dataset losses exactly. Several: each image scores its own vocabulary.
        mask = None if self.vocab_mask.shape[0] == 1 else self.vocab_mask[source]
        with autocast(images.device, self.amp):
            feats, names = self.student.forward_with_names(images)
        packed = feats.float()  # the losses run in float32 (a no-op without autocast)
        feats = self.student.embed(packed)  # B x D x h x w (packed is B x 2D with student.vocab_topk)
        unit = F.normalize(feats, dim=1)  # once: normalising B x D x H/4 x W/4 is a large share of a CPU step
        losses: dict[str, torch.Tensor] = {}
        # Losses work at the feature resolution (stride 4) with nearest-sampled labels: 16x cheaper
        # than upsampling logits to the crop, which matters on a CPU.
        labels, valid = at_stride(labels, feats), at_stride(valid, feats)
        packed_layout = self.student.vocab is not None
        logits = (self.student.scores(packed, self.text_seen) if packed_layout
                  else self.student.scores(unit, self.text_seen, unit=True)) * scale
        losses.update(nel_loss(logits, labels, self.ignore_index, lc.focal_weight, lc.dice_weight, lc.focal_alpha,
                               lc.focal_gamma, lc.ignore_as_negative, valid, mask))
        if lc.glm_weight > 0:
            losses["glm"] = lc.glm_weight * self.glm(cls, feats)
        if lc.dense_weight > 0 and dense is not None:
            losses["dense"] = lc.dense_weight * dense_distill_loss(unit, dense, labels, valid, self.ignore_index)
        if lc.vocab_weight > 0 and dense is not None:
            # unit vectors are pooled (the vocabulary head's halves: the MLP one normalised, the mixture near unit)
            pooled_in = packed if packed_layout else unit
            losses["vocab"] = lc.vocab_weight * vocab_distill_loss(pooled_in, dense, self.text_vocab, lc.vocab_temperature,
                                                                  valid, self.student.scores)
        if lc.vocab_head_weight > 0 and dense is not None:
            if names is None or self.text_imagenet.shape[0] != names.shape[-1]:
                raise ValueError("loss.vocab_head_weight > 0 needs student.vocab_topk > 0 and the ImageNet names' "
                                 "embeddings (text_imagenet)")
            losses["vocab_head"] = lc.vocab_head_weight * vocab_head_loss(names, dense, self.text_imagenet,
                                                                          lc.vocab_temperature, valid)
        if self.anchor is not None:
            losses["anchor"] = self.cfg.loss.anchor_weight * anchor_loss(names, self.anchor(images), valid)
        if self.maskclip and dense is not None:
            mc = self.cfg.maskclip
            logits_all = torch.einsum("bdhw,nd->bnhw", unit, self.text_names) * scale
            if step >= mc.self_train_after * self.cfg.train.iters:  # MaskCLIP+ self-training: its own predictions
                targets = logits_all.detach().argmax(1)
            else:
                targets = teacher_pseudo_labels(dense, self.text_names, mc.temperature, mc.denoise)
                targets = F.interpolate(targets[:, None].float(), size=feats.shape[-2:], mode="nearest")[:, 0].long()
            losses["maskclip"] = mc.weight * maskclip_loss(logits_all, labels, targets, valid, self.ignore_index)
        if self.use_plm and pseudo is not None:
            plm = self.plm(unit, at_stride(pseudo, feats), cls, self.text_seen, scale, mask)
            if lc.ce_weight > 0:
                losses["ce"] = lc.ce_weight * plm["ce"]
            if lc.gen_weight > 0:
                losses["gen"] = lc.gen_weight * plm["gen"]
        return losses

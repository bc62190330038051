"""Inference: the student plus cached text embeddings, with the unseen-class bias (docs/METHOD.md#inference).

Only the student runs on the image; classes are rows of a text-embedding matrix. Classes that
were not in the training vocabulary get +gamma on their logits, because a student trained on
seen classes scores them too low.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from clipteacher.checkpoint import load_checkpoint
from clipteacher.config import Config, from_dict
from clipteacher.io import resize_short
from clipteacher.prompts import outside_vocabulary
from clipteacher.models.build import build_model
from clipteacher.models.student import Student


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """H x W x 3 uint8 -> 3 x H x W float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255.0


def unseen_bias(classes: list[str], vocabulary: list[str], gamma: float) -> torch.Tensor:
    """C vector: gamma for every class outside the training vocabulary (ignoring case), 0 otherwise."""
    return torch.tensor([gamma if out else 0.0 for out in outside_vocabulary(classes, vocabulary)])


@torch.no_grad()
def predict_logits(student: Student, image: torch.Tensor, text: torch.Tensor, scale: float, bias: torch.Tensor,
                   out_size: tuple[int, int], window: int = 0, overlap: float = 1 / 6,
                   unseen: torch.Tensor | None = None) -> torch.Tensor:
    """image: 1 x 3 x h x w in [0, 1]; text: C x D; bias: C; unseen: C bool (TagCLIP's trusty weighting needs it).
    Returns 1 x C x H x W logits at out_size. `student` is any model of `clipteacher.models.build`.

    window > 0 tiles images larger than window x window with overlapping crops and averages logits.
    """
    _, _, h, w = image.shape
    if window <= 0 or (h <= window and w <= window):
        logits = student.logits(image, text, scale, bias, unseen)
        return F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
    stride = max(1, int(window * (1 - overlap)))
    total = image.new_zeros(1, text.shape[0], h, w)
    count = image.new_zeros(1, 1, h, w)
    for y in range(0, max(h - window, 0) + stride, stride):
        for x in range(0, max(w - window, 0) + stride, stride):
            y0, x0 = min(y, max(h - window, 0)), min(x, max(w - window, 0))
            crop = image[:, :, y0 : y0 + window, x0 : x0 + window]
            logits = student.logits(crop, text, scale, bias, unseen)
            total[:, :, y0 : y0 + crop.shape[2], x0 : x0 + crop.shape[3]] += F.interpolate(
                logits, size=crop.shape[2:], mode="bilinear", align_corners=False)
            count[:, :, y0 : y0 + crop.shape[2], x0 : x0 + crop.shape[3]] += 1
    return F.interpolate(total / count, size=out_size, mode="bilinear", align_corners=False)


class Segmenter:
    """A trained student with its vocabulary, text-embedding cache and default gamma, loaded from a checkpoint."""

    def __init__(self, cfg: Config, student: Student, vocabulary: list[str], text_cache: dict[str, torch.Tensor],
                 gamma: float, teacher_fingerprint: str = ""):
        self.cfg, self.student = cfg, student.eval()
        self.vocabulary, self.text_cache, self.gamma = vocabulary, text_cache, gamma
        self.teacher_fingerprint = teacher_fingerprint
        self.feature_mean: torch.Tensor | None = None  # D: hubness reference, when the model carries one
        self.feature_mean_reference = ""  # which images it came from
        self.hubness_default: bool | None = None  # the model's own choice of serving the correction (None: the global default)
        self._teacher = None

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu") -> "Segmenter":
        """From a training checkpoint (.pt) or a model folder (`clipteacher.checkpoint`)."""
        return cls.from_state(load_checkpoint(path), path, device)

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu") -> "Segmenter":
        """From a model folder (model.safetensors, config.json, README.md), e.g. assets/default."""
        return cls.from_checkpoint(folder, device)

    @classmethod
    def from_state(cls, ckpt: dict, path: str | Path, device: str = "cpu") -> "Segmenter":
        """The same from a checkpoint already read (load_checkpoint); `path` only names it in errors."""
        cfg = from_dict(ckpt["config"], f"checkpoint {path}")
        cfg.student.pretrained = False  # the checkpoint holds the weights
        student = build_model(cfg, ckpt["embed_dim"])
        state = {k[len("student."):]: v for k, v in ckpt["model"].items() if k.startswith("student.")}
        try:
            student.load_state_dict(state)
        except RuntimeError as err:
            raise ValueError(f"checkpoint {path} does not fit its own student config: {str(err).splitlines()[0]}") from None
        # fp16 files (assets/benchmarks) hold half text embeddings; the student computes in float32.
        text_cache = {c: e.float() for c, e in ckpt["text_cache"].items()}
        seg = cls(cfg, student.to(device), ckpt["vocabulary"], text_cache, ckpt["gamma"],
                  ckpt.get("teacher_fingerprint", ""))
        if "feature_mean" in ckpt:  # hubness reference (clipteacher.export.bundle.feature_mean)
            seg.feature_mean = ckpt["feature_mean"].float()
            seg.feature_mean_reference = ckpt.get("feature_mean_reference", "")
        if ckpt.get("hubness_default") is not None:
            seg.hubness_default = bool(ckpt["hubness_default"])
        return seg

    def text_embeddings(self, classes: list[str]) -> torch.Tensor:
        """C x D; names missing from the cache are embedded by the teacher's text encoder (built once)."""
        missing = [c for c in classes if c not in self.text_cache]
        if missing:
            if self._teacher is None:
                from clipteacher.models.teachers import build_teacher

                self._teacher = build_teacher(self.cfg.teacher)
            new = self._teacher.encode_text(missing, self.cfg.teacher.templates)
            self.text_cache.update({c: e for c, e in zip(missing, new)})
        return torch.stack([self.text_cache[c] for c in classes])

    @torch.no_grad()
    def predict(self, image: np.ndarray, classes: list[str], gamma: float | None = None, size: int | None = None,
                window: int = 0) -> torch.Tensor:
        """image: H x W x 3 uint8 RGB -> H x W long class indices into `classes`.

        Resized exactly as `clipteacher.train.engine.evaluate` resizes (short side `size`, default eval_size).
        """
        h, w = image.shape[:2]
        x = to_tensor(resize_short(image, size or self.cfg.data.eval_size))[None]
        device = next(self.student.parameters()).device
        text = self.text_embeddings(classes).to(device)
        bias = unseen_bias(classes, self.vocabulary, self.gamma if gamma is None else gamma).to(device)
        unseen = torch.tensor(outside_vocabulary(classes, self.vocabulary), device=device)
        logits = predict_logits(self.student, x.to(device), text, self.cfg.student.logit_scale, bias, (h, w), window,
                                unseen=unseen)
        return logits.argmax(1)[0].cpu()

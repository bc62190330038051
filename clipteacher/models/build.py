"""Which network a config trains and serves: the student, or ZegCLIP / TagCLIP (`Config.method`)."""
from __future__ import annotations

import torch.nn as nn

from clipteacher.config import Config
from clipteacher.models.student import Student


def build_model(cfg: Config, embed_dim: int, visual: nn.Module | None = None) -> nn.Module:
    """Student(cfg.student) for method clipteacher / maskclip_plus; ZegCLIP(cfg.zegclip) for zegclip, around
    `visual` (a CLIP image tower; default: the architecture of cfg.teacher, weights to be loaded by the caller).
    Both have forward, logits(images, text, scale, bias, unseen) and param_groups."""
    if cfg.method == "zegclip":
        from clipteacher.models.zegclip import ZegCLIP, clip_visual

        return ZegCLIP(cfg.zegclip, visual if visual is not None else clip_visual(cfg.teacher, load_weights=False),
                       embed_dim)
    return Student(cfg.student, embed_dim)


def fill_vocabulary_bank(model: nn.Module, teacher, templates):
    """Give a student with the vocabulary head (`student.vocab_topk`) its bank: the 1000 ImageNet names embedded
    by `teacher` with `templates`. Anything else is left as it is. Returns those 1000 x D embeddings as embedded
    (before any centring), or None without the head."""
    if getattr(model, "vocab", None) is None:
        return None
    from clipteacher.models.teachers import imagenet_class_names

    text = teacher.encode_text(imagenet_class_names(), templates).cpu()
    model.set_bank(text)
    return text

"""Which network a config trains and serves: the student, or ZegCLIP / TagCLIP (`Config.method`)."""
from __future__ import annotations

import copy

import torch.nn as nn

from clipteacher.config import Config, from_dict
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


def interpolate_pretrained(ckpt: dict, weight: float) -> dict:
    """Weight-space ensembling towards the student's pretrained ImageNet weights (WiSE-FT, Wortsman et al. 2022;
    docs/METHOD.md#pretrained-interpolation): every floating tensor of the backbone and of the vocabulary head's
    classifier becomes (1 - weight) x fine-tuned + weight x pretrained; the MLP head, the bank and integer buffers
    stay as trained. Returns a new checkpoint dict; `ckpt` is not changed.

    Segmentation training moves the backbone under the ImageNet classifier that names pixels for the vocabulary
    head; a partial step back restores much of that naming and costs the fine-tuned task little."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"pretrained interpolation weight must be in [0, 1], got {weight}")
    cfg = from_dict(ckpt["config"])
    if cfg.method == "zegclip" or not cfg.student.pretrained:
        raise ValueError("pretrained interpolation needs a student with pretrained weights (student.pretrained)")
    pretrained = Student(cfg.student, ckpt["embed_dim"]).state_dict()  # built, before any checkpoint loads
    model = dict(ckpt["model"])
    for key, pre in pretrained.items():
        if key.startswith(("backbone.", "vocab.features.", "vocab.classifier.")) and pre.is_floating_point():
            tuned = model[f"student.{key}"]
            mixed = (1 - weight) * tuned.float() + weight * pre.float()
            model[f"student.{key}"] = mixed.to(tuned.dtype)
    return {**ckpt, "model": model}


def add_vocabulary_branch(ckpt: dict) -> dict:
    """A checkpoint of a student with the vocabulary head -> the same student with `student.vocab_branch`: the head
    reads its own pretrained copy of the stride-32 blocks (docs/METHOD.md#vocabulary-branch), taken from the packaged
    ImageNet weights; every trained tensor stays as it is. Returns a new checkpoint dict; `ckpt` is not changed."""
    cfg = from_dict(ckpt["config"])
    if cfg.method == "zegclip" or not cfg.student.vocab_topk or not cfg.student.pretrained:
        raise ValueError("the vocabulary branch needs a student with the vocabulary head (student.vocab_topk) and "
                         "pretrained weights (student.pretrained)")
    if cfg.student.vocab_branch:
        raise ValueError("this checkpoint's student has the vocabulary branch already")
    from clipteacher.models.weights import WeightsError, packaged_state_dict

    try:
        packaged_state_dict(cfg.student.backbone, required=True)  # the branch is these weights, never random ones
    except WeightsError as err:
        raise ValueError(str(err)) from None
    config = copy.deepcopy(ckpt["config"])
    config.setdefault("student", {})["vocab_branch"] = True
    branch = Student(from_dict(config).student, ckpt["embed_dim"]).vocab.branch.state_dict()
    model = dict(ckpt["model"])
    dtype = ckpt["model"]["student.vocab.features.0.weight"].dtype
    model.update({f"student.vocab.branch.{k}": v.to(dtype) if v.is_floating_point() else v for k, v in branch.items()})
    return {**ckpt, "config": config, "model": model}

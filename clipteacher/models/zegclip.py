"""ZegCLIP and TagCLIP: CLIP at inference, with prompts and a light decoder (docs/METHOD.md#baselines).

The seed baselines the CLIPTeacher paper compares against. Unlike the student, these keep the CLIP
image encoder at inference; only deep prompts and the decoder train.

    PromptedEncoder   frozen open_clip ViT + deep prompt tuning (ZegCLIP Sec. 3.2)
                      image B x 3 x H x W [0, 1] -> (global g B x D, tokens B x D x h x w), both unit
    QueryBuilder      relationship descriptor (ZegCLIP Eq. 7-8): concat[t * g, t] -> Linear 2D -> d;
                      with `trusty`, TagCLIP's trusty token and Trusty Learner (TagCLIP Eq. 4-5)
    MaskDecoder       SegViT's attention-to-mask decoder, 3 layers: queries = class embeddings,
                      keys/values = image tokens; each layer's query-key logits are its masks
    ZegCLIP           the three together; `logits(images, text, ...)` is the segmentation entry point

Masks are per-class sigmoid logits (the non-mutually-exclusive loss trains them), so a class is scored
alone and a new vocabulary does not change how an old class scores.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipteacher.config import TeacherConfig, ZegCLIPConfig
from clipteacher.models.teachers import resized_positions


def clip_visual(cfg: TeacherConfig, load_weights: bool) -> nn.Module:
    """The open_clip ViT image tower named by the teacher config. load_weights=False builds the architecture
    only (a checkpoint restores the weights); True loads `clip_pretrained` as the CLIP teacher does."""
    import open_clip

    if cfg.clip_config:
        return open_clip.CLIP(**cfg.clip_config).visual
    if load_weights:
        from clipteacher.models.teachers import ClipTeacher

        return ClipTeacher(cfg.clip_model, cfg.clip_pretrained, cfg.input_size).visual
    if cfg.clip_model not in open_clip.list_models():
        raise ValueError(f"unknown teacher.clip_model '{cfg.clip_model}'; see open_clip.list_models()")
    return open_clip.create_model(cfg.clip_model, pretrained=None).visual


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head attention written out: q B x M x W, k and v B x N x W -> (B x M x W, logits B x heads x M x N).
    The traced nn.MultiheadAttention bakes the sequence lengths into its reshapes; these reshapes keep them
    dynamic, so exported graphs take any image size and any vocabulary."""
    b, _, width = q.shape
    q, k, v = (t.reshape(b, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))  # B x heads x L x hd
    logits = q @ k.transpose(-1, -2) / math.sqrt(width // heads)
    return (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, width), logits


def block_forward(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """One open_clip ResidualAttentionBlock on B x N x W tokens with its own weights, through `attention`."""
    attn = block.attn
    q, k, v = F.linear(block.ln_1(x), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    x = x + block.ls_1(attn.out_proj(attention(q, k, v, attn.num_heads)[0]))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


class PromptedEncoder(nn.Module):
    """Frozen CLIP ViT with `tokens` learnable prompt tokens inserted after the CLS token. Layers below
    `layers` get fresh prompts (their prompt outputs are dropped); deeper layers carry the last ones on.
    The prompts are dropped before ln_post and the projection.

    forward: images B x 3 x H x W RGB [0, 1] -> (g B x D unit, tokens B x D x H/p x W/p unit).
    """

    def __init__(self, visual: nn.Module, tokens: int, layers: int = 0):
        super().__init__()
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        from open_clip.transformer import ResidualAttentionBlock

        if not hasattr(visual, "conv1") or visual.attn_pool is not None:
            raise ValueError("ZegCLIP needs a plain open_clip ViT image tower (conv1 patches, CLS token)")
        if not all(type(b) is ResidualAttentionBlock for b in visual.transformer.resblocks):
            raise ValueError("ZegCLIP needs open_clip's plain attention blocks (block_forward reuses their weights)")
        self.visual = visual.requires_grad_(False)
        depth = len(visual.transformer.resblocks)
        self.layers = depth if layers <= 0 else min(layers, depth)
        width = visual.conv1.out_channels
        patch = visual.conv1.kernel_size[0]
        # VPT's uniform init, scaled to the patch embedding's fan-in and the width
        bound = math.sqrt(6.0 / float(3 * patch * patch + width))
        self.prompts = nn.Parameter(torch.empty(self.layers, tokens, width).uniform_(-bound, bound))
        self.register_buffer("mean", torch.tensor(OPENAI_DATASET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_DATASET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "PromptedEncoder":
        super().train(mode)
        self.visual.eval()  # frozen: its dropout and any norm statistics never change
        return self

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.visual
        x = v.conv1((images - self.mean) / self.std)  # B x W x h x w
        b, _, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        x = torch.cat([v.class_embedding.to(x.dtype).expand(b, 1, -1), x], dim=1)
        x = v.ln_pre(x + resized_positions(v, h, w).to(x.dtype))
        m = self.prompts.shape[1]
        for i, block in enumerate(v.transformer.resblocks):
            if i < self.layers:
                prompt = self.prompts[i].to(x.dtype).expand(b, -1, -1)
                rest = x[:, 1:] if i == 0 else x[:, 1 + m:]
                x = torch.cat([x[:, :1], prompt, rest], dim=1)
            x = block_forward(block, x)
        x = torch.cat([x[:, :1], x[:, 1 + m:]], dim=1)
        x = v.ln_post(x) @ v.proj
        g = F.normalize(x[:, 0], dim=-1)
        tokens = F.normalize(x[:, 1:], dim=-1)
        return g, tokens.transpose(1, 2).reshape(b, -1, h, w)


class SelfAttention(nn.Module):
    """Multi-head self-attention on B x N x W (through `attention`)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(attention(*self.qkv(x).chunk(3, -1), self.heads)[0])


class QueryBuilder(nn.Module):
    """Class queries from text embeddings and the image's global embedding.

    ZegCLIP's relationship descriptor: q_c = Linear(concat[t_c * g, t_c]). With `trusty` (TagCLIP), a
    learnable trusty token t_A is appended to the C text embeddings first, and the C + 1 queries pass the
    Trusty Learner: LN(MultiHeadSelfAttention(q) + q), so t_A sees every class of the vocabulary.

    forward: text C x D (unit), g B x D (unit) -> queries B x C' x d, C' = C (+ 1 with trusty).
    """

    def __init__(self, embed_dim: int, width: int, heads: int, trusty: bool):
        super().__init__()
        self.descriptor = nn.Linear(2 * embed_dim, width)
        self.trusty = trusty
        if trusty:
            self.token = nn.Parameter(F.normalize(torch.randn(embed_dim), dim=0))
            self.attn = SelfAttention(width, heads)
            self.norm = nn.LayerNorm(width)

    def forward(self, text: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        t = text.unsqueeze(0).expand(g.shape[0], -1, -1)  # B x C x D
        if self.trusty:
            t = torch.cat([t, self.token.to(t.dtype).expand(g.shape[0], 1, -1)], dim=1)
        q = self.descriptor(torch.cat([t * g.unsqueeze(1), t], dim=-1))
        if self.trusty:
            q = self.norm(self.attn(q) + q)
        return q


class MaskLayer(nn.Module):
    """One attention-to-mask layer: self-attention among queries, cross-attention to the image tokens whose
    head-averaged query-key logits are the layer's masks, a feed-forward; each with a shortcut and LayerNorm.

    forward: queries B x C x d, memory B x N x d -> (queries B x C x d, masks B x C x N logits).
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.self_attn = SelfAttention(width, heads)
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.out = nn.Linear(width, width)
        self.ffn = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))

    def forward(self, queries: torch.Tensor, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.norms[0](queries + self.self_attn(queries))
        attended, logits = attention(self.q(x), self.k(memory), self.v(memory), self.heads)  # logits B x heads x C x N
        x = self.norms[1](x + self.out(attended))
        x = self.norms[2](x + self.ffn(x))
        return x, logits.mean(1)


class MaskDecoder(nn.Module):
    """`layers` MaskLayers over the image tokens (projected D -> d with a LayerNorm).

    forward: queries B x C x d, tokens B x D x h x w -> (last layer's queries B x C x d, the masks of every
    layer, each B x C x h x w logits)."""

    def __init__(self, embed_dim: int, width: int, heads: int, layers: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(embed_dim, width), nn.LayerNorm(width))
        self.layers = nn.ModuleList(MaskLayer(width, heads) for _ in range(layers))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        b, _, h, w = tokens.shape
        memory = self.proj(tokens.flatten(2).transpose(1, 2))
        masks = []
        for layer in self.layers:
            queries, m = layer(queries, memory)
            masks.append(m.reshape(b, -1, h, w))
        return queries, masks


class ZegCLIP(nn.Module):
    """Frozen CLIP image encoder with deep prompts + relationship-descriptor queries + attention-to-mask decoder.
    With cfg.trusty it is TagCLIP: one more query (the trusty token), whose mask is the trusty map.

    forward(images B x 3 x H x W [0, 1], text C x D unit) -> dict(masks: list over decoder layers of
    B x C x h x w logits, trust: B x 1 x h x w logits or None, presence: B x C logits or None).
    """

    def __init__(self, cfg: ZegCLIPConfig, visual: nn.Module, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        self.embed_dim = embed_dim
        self.encoder = PromptedEncoder(visual, cfg.prompt_tokens, cfg.prompt_layers)
        self.queries = QueryBuilder(embed_dim, cfg.decoder_dim, cfg.decoder_heads, cfg.trusty)
        self.decoder = MaskDecoder(embed_dim, cfg.decoder_dim, cfg.decoder_heads, cfg.decoder_layers)
        # TagCLIP's L_cls: does the class appear in the image, from the last layer's query
        self.presence = nn.Linear(cfg.decoder_dim, 1) if cfg.cls_weight > 0 else None

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image pass (cached by the runtime): -> (g B x D, tokens B x D x h x w)."""
        return self.encoder(images)

    def decode(self, g: torch.Tensor, tokens: torch.Tensor, text: torch.Tensor) -> dict:
        """The vocabulary pass: image embeddings and C x D text -> forward's dict."""
        last, masks = self.decoder(self.queries(text, g), tokens)
        c = text.shape[0]
        trust = None
        if self.cfg.trusty:
            trust = masks[-1][:, c:]
            masks = [m[:, :c] for m in masks]
            last = last[:, :c]
        presence = self.presence(last)[..., 0] if self.presence is not None else None
        return {"masks": masks, "trust": trust, "presence": presence}

    def forward(self, images: torch.Tensor, text: torch.Tensor) -> dict:
        g, tokens = self.encode(images)
        return self.decode(g, tokens, text)

    def logits(self, images: torch.Tensor, text: torch.Tensor, scale: float = 0.0, bias: torch.Tensor | None = None,
               unseen: torch.Tensor | None = None) -> torch.Tensor:
        """images B x 3 x H x W, text C x D, bias C (the unseen gamma), unseen C bool -> B x C x h x w class scores.
        `scale` is the student's kappa and unused: these logits are the decoder's own."""
        out = self.decode(*self.encode(images), text)
        return combine(out["masks"][-1], out["trust"], unseen, bias)

    def param_groups(self, lr: float, backbone_mult: float, weight_decay: float) -> list[dict]:
        """Only prompts and decoder train (CLIP frozen); ZegCLIP gives them all the head's learning rate."""
        params = [p for p in self.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr, "weight_decay": weight_decay}]


def combine(masks: torch.Tensor, trust: torch.Tensor | None, unseen: torch.Tensor | None,
            bias: torch.Tensor | None) -> torch.Tensor:
    """Class scores from the decoder's masks B x C x h x w: the mask logits (ZegCLIP), or with a trusty map
    B x 1 x h x w TagCLIP's weighting in log space, log(M_A * M_R) for seen classes and log((1 - M_A) * M_R)
    for unseen ones (TagCLIP Eq. 12); then + bias C (gamma on unseen classes). unseen: C bool (None = none)."""
    scores = masks
    if trust is not None:
        u = torch.zeros(masks.shape[1], dtype=masks.dtype, device=masks.device) if unseen is None \
            else unseen.to(masks.dtype).to(masks.device)
        u = u.view(1, -1, 1, 1)
        scores = F.logsigmoid(masks) + u * F.logsigmoid(-trust) + (1 - u) * F.logsigmoid(trust)
    if bias is not None:
        scores = scores + bias.view(1, -1, 1, 1).to(scores.dtype)
    return scores

"""Small wrappers that fix each exported graph's inputs and outputs (segment-anything's pattern).

Each forward is straight-line tensor code: no Python branching on values, so the traced
graph is valid for every batch, height, width and class count declared as a dynamic axis.

    StudentOnnx     image B x 3 x H x W float [0, 1]     -> features B x D x H/4 x W/4 (with the vocabulary head:
                                                           `pack_coarse`'s B x (D + D/16) x H/4 x W/4)
    ClassifierOnnx  features B x D x h x w, class_embeddings C x D, bias C, out_size 2 (int64 H, W)
                                                        -> logits B x C x h x w, labels B x H x W (int64)
    VocabClassifierOnnx  the same for the vocabulary head's packed features (scores its stride-32 mixture there)
    TextEncoderOnnx input_ids B x L, attention_mask B x L -> embeddings B x D (unit)
    TeacherOnnx     image B x 3 x S x S float [0, 1]     -> cls B x D, dense B x D x h x w (unit)
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from clipteacher.models.student import Student, unpack_coarse
from clipteacher.models.teachers import Teacher


class StudentOnnx(nn.Module):
    """The whole image pass. The student normalises inside, so callers feed RGB in [0, 1]."""

    def __init__(self, student: Student):
        super().__init__()
        self.student = student

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.student(image, serving=True)


class ClassifierOnnx(nn.Module):
    """Class-conditioned head: cosine logits against any vocabulary, so a new vocabulary never re-runs the image.

    logits stay at feature resolution (cheap, for score maps); labels are the argmax of the
    logits bilinearly upsampled to out_size, exactly as `clipteacher.predictor.predict_logits`.
    """

    def __init__(self, logit_scale: float):
        super().__init__()
        self.logit_scale = float(logit_scale)

    def scores(self, features: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        return cosines(features, class_embeddings)

    def forward(self, features: torch.Tensor, class_embeddings: torch.Tensor, bias: torch.Tensor,
                out_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.scores(features, class_embeddings) * self.logit_scale + bias.view(1, -1, 1, 1)
        # sizes taken from a tensor input are traced as graph values, not baked-in constants
        up = F.interpolate(logits, size=(out_size[0], out_size[1]), mode="bilinear", align_corners=False)
        return logits, up.argmax(1)


class VocabClassifierOnnx(ClassifierOnnx):
    """The classifier of a student with the vocabulary head: packed features B x (D + P) x h x w
    (`clipteacher.models.student.pack_coarse`); per name, (1 - g) cos(MLP feature, t) + g cos(mixture, t) with the
    mixture's cosines taken on its stride-32 grid and upsampled (`Student.scores`: the same numbers). g is the
    name's gate, or one constant without `vocab_gate`. Same inputs and outputs as ClassifierOnnx."""

    def __init__(self, student: Student):
        super().__init__(student.cfg.logit_scale)
        self.gate = student.vocab_gate
        self.mix = float(student.vocab_mix.detach())
        self.dim = student.embed_dim

    def scores(self, features: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        _, coarse = unpack_coarse(features, self.dim)
        if self.gate is None:
            g = self.mix / (1 + self.mix)
        else:
            g = torch.sigmoid(self.gate(class_embeddings)).view(1, -1, 1, 1)  # 1 x C x 1 x 1
        # the MLP feature scored in place: slicing it out of the packed array copied all of it (a third of the graph)
        head = cosines(features, class_embeddings)
        mix = torch.matmul(class_embeddings, coarse.flatten(2)).unflatten(2, coarse.shape[2:])  # unit mixture
        mix = F.interpolate(mix, size=features.shape[2:], mode="bilinear", align_corners=False)
        return head + g * (mix - head)


def cosines(features: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """features B x F x h x w whose first D channels are the vectors (F >= D; the rest are left out by zero
    weights, not sliced away), class_embeddings C x D (unit) -> B x C x h x w cosines, written for onnxruntime's
    CPU kernels: MatMuls instead of an Einsum, and the feature norm divides the C x N products rather than the
    D x N features (its Einsum, ReduceL2 and D x N Div were 3x slower in all)."""
    flat = features.flatten(2)  # B x F x N
    extra = features.shape[1] - class_embeddings.shape[1]
    dots = torch.matmul(F.pad(class_embeddings, (0, extra)), flat)  # B x C x N
    norms = torch.matmul(F.pad(torch.ones_like(class_embeddings[:1]), (0, extra)), flat * flat).sqrt()  # B x 1 x N
    return (dots / norms.clamp_min(1e-12)).unflatten(2, features.shape[2:])


class TextEncoderOnnx(nn.Module):
    """The teacher's text tower (MiniLM or CLIP text), already L2-normalising."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.encoder = teacher.text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids, attention_mask)


class TeacherOnnx(nn.Module):
    """The teacher's image encoder at its own square input size (the caller resizes)."""

    def __init__(self, teacher: Teacher):
        super().__init__()
        self.teacher = teacher

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.teacher
        out = t._embed((image - t.pixel_mean) / t.pixel_std)
        return out.cls, out.dense


class ZegCLIPImageOnnx(nn.Module):
    """ZegCLIP's image pass (prompted CLIP) packed into one feature map, so a bundle's callers cache and pass
    one array whatever the model: features B x 2D x h x w = [image tokens; the global embedding g repeated
    at every cell]. `ZegCLIPClassifierOnnx` unpacks it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        g, tokens = self.model.encode(image)
        return torch.cat([tokens, g[:, :, None, None].expand_as(tokens)], dim=1)


class ZegCLIPClassifierOnnx(nn.Module):
    """ZegCLIP's vocabulary pass: packed features B x 2D x h x w, class_embeddings C x D, bias C, unseen C
    (1.0 = outside the training vocabulary; read by TagCLIP's trusty weighting only), out_size 2
    -> logits B x C x h x w (`clipteacher.models.zegclip.combine`), labels B x H x W (argmax of the upsampled logits)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, features: torch.Tensor, class_embeddings: torch.Tensor, bias: torch.Tensor,
                unseen: torch.Tensor, out_size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from clipteacher.models.zegclip import combine

        d = class_embeddings.shape[1]
        tokens, g = features[:, :d], features[:, d:, 0, 0]
        out = self.model.decode(g, tokens, class_embeddings)
        logits = combine(out["masks"][-1], out["trust"], unseen, bias)
        up = F.interpolate(logits, size=(out_size[0], out_size[1]), mode="bilinear", align_corners=False)
        return logits, up.argmax(1)

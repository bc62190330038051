"""Teachers: tiny random CLIPs (shapes, value path by hand, weight loading) and the real ConSE."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clipteacher.config import TeacherConfig
from clipteacher.models.teachers import (ClipTeacher, ConSETeacher, MiniLMTextEncoder, TeacherOutput, WeightsError,
                               build_teacher, minilm_folder)
from helpers import MSRC, TINY_CLIP



def tiny_clip_teacher(input_size: int = 32, seed: int = 0) -> ClipTeacher:
    torch.manual_seed(seed)
    return ClipTeacher(input_size=input_size, clip_config=TINY_CLIP)


def load_image(name: str) -> torch.Tensor:
    from PIL import Image

    path = MSRC / "images" / f"{name}.jpg"
    if not path.is_file():
        pytest.skip(f"msrc21 image not found: {path}")
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1)[None].float() / 255


# ---------------------------------------------------------------------------- CLIP


def test_clip_shapes_norms_and_grid():
    t32, t48 = tiny_clip_teacher(32), tiny_clip_teacher(48)
    images = torch.rand(2, 3, 37, 53)
    out = t32(images)
    assert isinstance(out, TeacherOutput)
    assert out.cls.shape == (2, 32) and out.dense.shape == (2, 32, 4, 4)
    assert t48(images).dense.shape == (2, 32, 6, 6)
    assert torch.allclose(out.cls.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.dense.norm(dim=1), torch.ones(2, 4, 4), atol=1e-5)
    assert t32.embed_dim == 32 and t32.kind == "clip"


def test_clip_cls_and_text_match_open_clip():
    teacher = tiny_clip_teacher(32)
    torch.manual_seed(0)
    import open_clip

    clip = open_clip.CLIP(**TINY_CLIP).eval()  # same seed -> same weights as the teacher
    images = torch.rand(2, 3, 32, 32)
    mean = torch.tensor(open_clip.constants.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.constants.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = F.normalize(clip.encode_image((images - mean) / std), dim=-1)
    assert torch.allclose(teacher(images).cls, ref, atol=1e-5)
    with torch.no_grad():
        text = F.normalize(clip.encode_text(open_clip.tokenizer.SimpleTokenizer(context_length=16)(["a photo of a cow."])), dim=-1)
    assert torch.allclose(teacher.encode_text(["cow"]), text, atol=1e-5)


def test_clip_dense_is_the_value_path_by_hand():
    teacher = tiny_clip_teacher(32)
    v = teacher.visual
    images = torch.rand(1, 3, 32, 32)
    x_norm = (images - teacher.pixel_mean) / teacher.pixel_std

    captured = {}
    v.transformer.resblocks[0].register_forward_hook(lambda m, i, o: captured.setdefault("x", o))
    with torch.no_grad():
        v(x_norm)  # the untouched open_clip forward; we only read the first block's output
    row, col, grid = 2, 1, 4
    x = captured["x"][0, 1 + row * grid + col]  # W, input of the last block at that patch

    last = v.transformer.resblocks[-1]
    width = x.shape[0]
    ln = lambda t, m: F.layer_norm(t, (width,), m.weight, m.bias, m.eps)
    w_v, b_v = last.attn.in_proj_weight[2 * width:], last.attn.in_proj_bias[2 * width:]
    with torch.no_grad():
        value = w_v @ ln(x, last.ln_1) + b_v
        z = x + last.attn.out_proj.weight @ value + last.attn.out_proj.bias
        hidden = F.gelu(last.mlp.c_fc.weight @ ln(z, last.ln_2) + last.mlp.c_fc.bias)
        z = z + last.mlp.c_proj.weight @ hidden + last.mlp.c_proj.bias
        expected = F.normalize(ln(z, v.ln_post) @ v.proj, dim=0)
        out = teacher(images)
        # the ordinary last-layer token differs, so this test can tell the two paths apart
        _, tokens = v._pool(v.transformer(v._embeds(x_norm)))
        naive = F.normalize(tokens[0, row * grid + col] @ v.proj, dim=0)
    assert torch.allclose(out.dense[0, :, row, col], expected, atol=1e-5)
    assert not torch.allclose(naive, expected, atol=1e-3)


def test_clip_stays_frozen():
    teacher = tiny_clip_teacher(32)
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())
    images = torch.rand(1, 3, 32, 32, requires_grad=True)
    out = teacher(images)
    assert not out.cls.requires_grad and not out.dense.requires_grad


def test_clip_text_and_fingerprint():
    teacher = tiny_clip_teacher(32)
    emb = teacher.encode_text(["cow", "grass", "sky"], templates=("a photo of a {}.", "a {} in the scene."))
    assert emb.shape == (3, 32)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(3), atol=1e-5)
    single = teacher.encode_text(["cow"], templates=("a {} in the scene.",))
    assert not torch.allclose(single[0], emb[0], atol=1e-4)  # templates are averaged, not ignored
    tokens = teacher.tokenize(["a cow."])
    assert tokens["input_ids"].shape == (1, 16) and tokens["attention_mask"].sum() == 5  # sot a cow . eot

    assert teacher.fingerprint() == tiny_clip_teacher(32).fingerprint()
    assert teacher.fingerprint() != tiny_clip_teacher(48).fingerprint()
    assert teacher.fingerprint() != tiny_clip_teacher(32, seed=1).fingerprint()
    with pytest.raises(ValueError, match="prompt template"):
        teacher.encode_text(["cow"], templates=("no placeholder",))


def test_clip_missing_weights_raise_one_clear_line(tmp_path):
    cfg = TeacherConfig(kind="clip", clip_pretrained=str(tmp_path / "nope" / "ViT-B-16.pt"))
    with pytest.raises(WeightsError) as err:
        build_teacher(cfg)
    msg = str(err.value)
    assert "\n" not in msg and "teacher.clip_pretrained=" in msg and "teacher.kind=conse" in msg
    # the 'openai' tag needs a download: it must fail at once, not hang on the network
    with pytest.raises(WeightsError, match="teacher.kind=conse"):
        build_teacher(TeacherConfig(kind="clip", clip_pretrained="openai"))


def test_clip_loads_a_local_weights_file(tmp_path):
    import open_clip

    (tmp_path / "TinyTeacherTest.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "TinyTeacherTest.json")
    torch.manual_seed(3)
    clip = open_clip.CLIP(**TINY_CLIP).eval()
    torch.save(clip.state_dict(), tmp_path / "tiny.pt")
    teacher = build_teacher(TeacherConfig(kind="clip", clip_model="TinyTeacherTest",
                                          clip_pretrained=str(tmp_path / "tiny.pt"), input_size=32))
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = F.normalize(clip.encode_image((images - teacher.pixel_mean) / teacher.pixel_std), dim=-1)
    assert torch.allclose(teacher(images).cls, ref, atol=1e-5)

    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="broken.pt"):
        ClipTeacher("TinyTeacherTest", str(tmp_path / "broken.pt"), 32)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="clip, conse"):
        build_teacher(TeacherConfig(kind="dino"))
    with pytest.raises(ValueError, match="multiple of the CLIP patch size"):
        tiny_clip_teacher(36)
    with pytest.raises(ValueError, match="B x 3 x H x W"):
        tiny_clip_teacher(32)(torch.rand(3, 32, 32))


# ---------------------------------------------------------------------------- ConSE (real weights)


@pytest.fixture(scope="module")
def conse() -> ConSETeacher:
    teacher = build_teacher(TeacherConfig(kind="conse", conse_backbone="tf_efficientnet_lite0"))
    assert isinstance(teacher, ConSETeacher)
    return teacher


def test_conse_shapes_and_norms(conse):
    out = conse(torch.rand(2, 3, 100, 150))
    assert conse.embed_dim == 384 and conse.class_text.shape == (1000, 384)
    assert out.cls.shape == (2, 384) and out.dense.shape == (2, 384, 14, 14)  # 448 / 32
    assert torch.allclose(out.cls.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(out.dense.norm(dim=1), torch.ones(2, 14, 14), atol=1e-5)
    conse.train()
    assert not any(m.training for m in conse.modules())
    assert not any(p.requires_grad for p in conse.parameters())


def test_conse_topk_one_is_the_top_class_text(conse):
    images = torch.rand(2, 3, conse.input_size, conse.input_size)
    x = (images - conse.pixel_mean) / conse.pixel_std
    with torch.no_grad():
        top = conse.backbone(x).argmax(-1)
    conse.topk = 1
    try:
        out = conse(images)
    finally:
        conse.topk = 10
    assert torch.allclose(out.cls, conse.class_text[top], atol=1e-5)
    mixed = conse(images).cls
    assert not torch.allclose(mixed, conse.class_text[top], atol=1e-3)


def test_minilm_matches_sentence_transformers(conse):
    from sentence_transformers import SentenceTransformer

    names = ["cow", "grass", "a photo of a bicycle.", "traffic sign on a road"]
    reference = SentenceTransformer(minilm_folder(), device="cpu").encode(names, normalize_embeddings=True,
                                                                          convert_to_tensor=True)
    ours = conse.text_encoder(**conse.tokenize(names))
    assert isinstance(conse.text_encoder, MiniLMTextEncoder)
    assert (F.cosine_similarity(ours, reference.cpu(), dim=-1) > 0.9999).all()
    assert torch.allclose(conse.encode_text(names, templates=("{}",)), ours, atol=1e-5)


def test_conse_sees_cows_and_books(conse):
    """msrc21 1_22_s is a cow on grass, 13_22_s a page of a book."""
    text = conse.encode_text(["cow", "book"])
    cow = conse(load_image("1_22_s")).cls @ text.T
    book = conse(load_image("13_22_s")).cls @ text.T
    assert cow[0, 0] > cow[0, 1] and book[0, 1] > book[0, 0]


def test_conse_fingerprint(conse):
    again = build_teacher(TeacherConfig(kind="conse", conse_backbone="tf_efficientnet_lite0"))
    assert conse.fingerprint().startswith("conse-") and conse.fingerprint() == again.fingerprint()
    again.input_size = 256
    assert again.fingerprint() != conse.fingerprint()
    again.topk = 5
    again.input_size = conse.input_size
    assert again.fingerprint() != conse.fingerprint()


def test_conse_smoothing_averages_by_feature_affinity(conse):
    images = torch.rand(1, 3, conse.input_size, conse.input_size)
    plain = conse(images).dense  # 1 x D x h x w
    x = (images - conse.pixel_mean) / conse.pixel_std
    with torch.no_grad():
        keys = F.normalize(conse.backbone.forward_features(x).flatten(2), dim=1)[0]  # C x N
    weights = (keys.T @ keys / 0.1).softmax(-1)  # N x N, by hand
    by_hand = F.normalize(weights @ plain.flatten(2)[0].T, dim=-1).T.reshape(plain.shape)
    fingerprint = conse.fingerprint()
    conse.smoothing = 0.1
    try:
        smoothed = conse(images).dense
        assert conse.fingerprint() != fingerprint
        conse.smoothing = 1e4  # a flat average: every location the same mixture
        flat = conse(images).dense.flatten(2)
    finally:
        conse.smoothing = 0.0
    assert torch.allclose(smoothed, by_hand, atol=1e-4) and not torch.allclose(smoothed, plain, atol=1e-2)
    assert torch.allclose(flat, flat[..., :1].expand_as(flat), atol=1e-3)
    assert conse.fingerprint() == fingerprint
    with pytest.raises(ValueError, match="conse_smoothing"):
        ConSETeacher("tf_efficientnet_lite0", smoothing=-1.0)

"""The student's vocabulary head (`student.vocab_topk`): ConSE from the backbone's own ImageNet classifier."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from clipteacher.checkpoint import load_checkpoint
from clipteacher.config import ConfigError, StudentConfig, from_dict
from clipteacher.models.student import Student
from clipteacher.models.teachers import imagenet_class_names
from clipteacher.train.engine import train
from helpers import TINY_CLIP, tiny_config

D = 8


def vocab_student(topk: int = 3, mix: float = 1.5) -> Student:
    torch.manual_seed(0)
    student = Student(StudentConfig(pretrained=False, head_dim=16, vocab_topk=topk, vocab_mix=mix), D).eval()
    bank = torch.nn.functional.normalize(torch.randn(1000, D), dim=1)
    student.set_bank(bank)
    return student


def test_with_a_zero_head_the_output_is_the_top_k_mixture_of_the_bank():
    student = vocab_student(topk=3, mix=1.5)
    torch.nn.init.zeros_(student.head.embed.weight)
    torch.nn.init.zeros_(student.head.embed.bias)
    seen = {}
    student.vocab.classifier.register_forward_hook(lambda m, i, o: seen.update(logits=o.detach()))
    x = torch.rand(2, 3, 32, 32)  # stride 32: one location, so the upsampled mixture is constant
    text = torch.nn.functional.normalize(torch.randn(4, D), dim=1)
    with torch.no_grad():
        out = student(x)
        scores = student.scores(out, text).numpy()
    assert out.shape == (2, 2 * D, 8, 8)
    assert not out[:, :D].any()  # the zero MLP feature stays zero when normalised
    bank = student.vocab.bank.numpy()
    for b in range(2):
        z = seen["logits"][b, 0, 0].numpy().astype(np.float64)
        p = np.exp(z - z.max())
        p /= p.sum()
        top = np.argsort(-p)[:3]
        w = p[top] / p[top].sum()
        mix = (w[:, None] * bank[top]).sum(0)
        want = mix / np.linalg.norm(mix)
        got = out[b, D:].numpy().reshape(D, -1)
        assert np.allclose(got, want[:, None], atol=1e-5)
        # a name's score is the mixture's cosine, weighted 1.5 / (1 + 1.5) beside the MLP feature's (zero here)
        assert np.allclose(scores[b].reshape(4, -1), (0.6 * text.numpy() @ want)[:, None], atol=1e-5)


def test_the_head_adds_to_the_mixture_and_gradients_reach_the_classifier():
    student = vocab_student().train()
    out = student(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 2 * D, 16, 16)
    student.scores(out, torch.nn.functional.normalize(torch.randn(3, D), dim=1)).square().mean().backward()
    assert student.vocab.classifier.weight.grad.abs().sum() > 0
    assert student.vocab.features[0].weight.grad.abs().sum() > 0  # the classifier's conv_head, pretrained too
    assert student.vocab_mix.grad is not None and student.head.embed.weight.grad.abs().sum() > 0
    groups = student.param_groups(1.0, 0.1, 0.0)
    backbone_group = {id(p) for p in groups[0]["params"]}
    assert id(student.vocab.classifier.weight) in backbone_group and id(student.vocab_mix) not in backbone_group
    assert sum(len(g["params"]) for g in groups) == len(list(student.parameters()))


def test_the_bank_must_be_one_row_per_imagenet_name():
    with pytest.raises(ValueError, match="bank must be"):
        vocab_student().set_bank(torch.zeros(10, D))


def test_a_backbone_without_an_imagenet_classifier_is_one_line():
    with pytest.raises(ValueError, match="EfficientNet"):
        Student(StudentConfig(backbone="resnet18", pretrained=False, vocab_topk=5), D)


@pytest.mark.parametrize("values, message", [
    ({"student": {"vocab_topk": -1}}, "vocab_topk"),
    ({"student": {"vocab_topk": 1001}}, "vocab_topk"),
    ({"method": "zegclip", "teacher": {"kind": "clip"}, "student": {"vocab_topk": 5}}, "no student"),
    ({"student": {"vocab_branch": True}}, "vocab_branch"),
    ({"student": {"vocab_branch": True, "vocab_topk": 5, "pretrained": False}}, "needs student.pretrained"),
])
def test_bad_vocab_head_settings_are_config_errors(values, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(values)


def test_training_fills_the_bank_from_the_teacher_and_saves_it(tiny_data, tmp_path):
    from clipteacher.models.teachers import build_teacher

    cfg = tiny_config(tiny_data, tmp_path / "v", train={"iters": 2}, student={"vocab_topk": 4},
                      loss={"vocab_weight": 1.0})
    train(cfg, verbose=False)
    bank = load_checkpoint(tmp_path / "v" / "last.pt")["model"]["student.vocab.bank"].float()
    assert bank.shape[0] == 1000
    torch.manual_seed(cfg.train.seed)  # the random tiny CLIP the run built
    teacher = build_teacher(cfg.teacher)
    names = imagenet_class_names()
    # the tiny CLIP's own embeddings of a few ImageNet names, row for row
    pick = [0, 417, 999]
    want = teacher.encode_text([names[i] for i in pick], cfg.teacher.templates)
    assert torch.allclose(bank[pick], want, atol=1e-5)


@pytest.mark.parametrize("branch", [False, True])
def test_vocab_head_bundle_matches_pytorch(tmp_path, branch):
    import onnxruntime as ort

    from clipteacher.config import Config
    from clipteacher.export.bundle import export_bundle, write_untrained_checkpoint
    from clipteacher.predictor import Segmenter

    cfg = Config()
    cfg.teacher.kind, cfg.teacher.clip_config, cfg.teacher.input_size = "clip", TINY_CLIP, 32
    cfg.student.pretrained, cfg.student.head_dim, cfg.student.vocab_topk, cfg.data.eval_size = False, 16, 5, 64
    cfg.student.vocab_branch = cfg.student.pretrained = branch  # the branch copies the packaged ImageNet blocks
    teacher = write_untrained_checkpoint(cfg, ["cow", "grass", "sky"], ["cow", "grass"], tmp_path / "ckpt.pt")
    export_bundle(tmp_path / "ckpt.pt", tmp_path / "bundle", teacher=teacher, log=lambda *_: None)
    student = Segmenter.from_checkpoint(tmp_path / "ckpt.pt").student
    assert student.vocab is not None and student.vocab.bank.abs().sum() > 0
    image = ort.InferenceSession(str(tmp_path / "bundle" / "student.onnx"), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(tmp_path / "bundle" / "classifier.onnx"), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, teacher.embed_dim, generator=gen), dim=1)
    # sizes unlike the export's dummy (dynamic axes all through), with stride-32 grids that do not divide evenly
    for shape in [(2, 3, 64, 64), (1, 3, 97, 131), (1, 3, 37, 200)]:
        x = torch.rand(*shape, generator=gen)
        with torch.no_grad():
            ref = student.logits(x, text, cfg.student.logit_scale, torch.zeros(4)).numpy()
            packed = student.serving_features(x).numpy()
        feats = image.run(None, {"image": x.numpy()})[0]
        assert feats.shape == packed.shape and np.abs(feats - packed).max() < 1e-4
        assert feats.shape[1] < 2 * teacher.embed_dim  # the coarse mixture is packed, not upsampled
        for b in range(shape[0]):
            got = head.run(None, {"features": feats[b:b + 1], "class_embeddings": text.numpy(),
                                  "bias": np.zeros(4, np.float32), "out_size": np.array(shape[2:], np.int64)})[0]
            assert got.shape == ref[b:b + 1].shape and np.abs(got - ref[b:b + 1]).max() < 1e-3


def test_the_serving_layout_packs_and_unpacks_the_coarse_mixture_exactly():
    from clipteacher.models.student import pack_coarse, unpack_coarse

    gen = torch.Generator().manual_seed(0)
    for d, (h, w) in [(8, (4, 4)), (384, (25, 33)), (20, (16, 9)), (32, (128, 171))]:
        fine = torch.randn(2, d, h, w, generator=gen)
        coarse = torch.randn(2, d, -(-h // 8), -(-w // 8), generator=gen)
        packed = pack_coarse(fine, coarse)
        assert packed.shape == (2, d + -(-d // 16), h, w)
        got_fine, got_coarse = unpack_coarse(packed, d)
        assert torch.equal(got_fine, fine) and torch.equal(got_coarse, coarse)


def test_a_centred_bank_adds_no_common_direction_to_every_name():
    # Text embeddings that share one direction (as MiniLM's do): the raw mixture is close to every name in the
    # bank, which the sigmoid NEL reads as a false positive everywhere; the centred one is not.
    gen = torch.Generator().manual_seed(1)
    common = torch.nn.functional.normalize(torch.randn(D, generator=gen), dim=0)
    bank = torch.nn.functional.normalize(torch.randn(1000, D, generator=gen) + 3 * common, dim=1)
    mean_cos = {}
    for center in (False, True):
        torch.manual_seed(0)
        student = Student(StudentConfig(pretrained=False, head_dim=16, vocab_topk=5, vocab_center=center), D).eval()
        student.set_bank(bank)
        with torch.no_grad():
            mix = student.vocab(torch.randn(4, student.backbone.feature_info.channels()[-1], 3, 3, generator=gen))
        mean_cos[center] = torch.einsum("bdhw,cd->bchw", mix, bank).mean().item()
    assert mean_cos[False] > 0.6
    assert abs(mean_cos[True]) < 0.2


def test_a_trained_student_fine_tunes_into_one_with_the_vocabulary_head(tiny_data, tmp_path):
    plain = tiny_config(tiny_data, tmp_path / "plain", train={"iters": 1, "seed": 1})  # another init than the fine-tune's
    train(plain, verbose=False)
    start = load_checkpoint(tmp_path / "plain" / "last.pt")["model"]
    cfg = tiny_config(tiny_data, tmp_path / "v", student={"vocab_topk": 4}, optim={"lr": 0.0, "min_lr": 0.0},
                      train={"iters": 1, "init_from": str(tmp_path / "plain" / "last.pt"),
                             "init_skip": ["student.backbone.conv_stem."]})
    train(cfg, verbose=False)
    got = load_checkpoint(tmp_path / "v" / "last.pt")["model"]
    same = lambda k: torch.allclose(got[k].float(), start[k].float(), atol=1e-6)  # noqa: E731 - one step at lr 0
    assert same("student.head.embed.weight") and same("student.backbone.bn1.weight")
    assert "student.vocab.classifier.weight" in got and "student.vocab.classifier.weight" not in start
    # skipped: the fine-tune's own init (seed 0), not the checkpoint's
    assert (got["student.backbone.conv_stem.weight"].float() - start["student.backbone.conv_stem.weight"].float()).abs().max() > 1e-3


def test_vocab_head_loss_is_zero_when_the_classifier_agrees_with_the_teacher_and_trains_it():
    from clipteacher.train.losses import vocab_head_loss

    gen = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(1000, D, generator=gen), dim=1)
    dense = torch.randn(2, D, 3, 3, generator=gen)
    dense[1, :, 2, 2] = 0  # padding: ignored
    unit = torch.nn.functional.normalize(dense, dim=1).permute(0, 2, 3, 1)
    agree = unit @ text.T / 0.05  # the teacher's own logits, one grid cell per token
    assert vocab_head_loss(agree, dense, text, 0.05).abs() < 1e-5
    wrong = torch.randn(2, 3, 3, 1000, generator=gen, requires_grad=True)
    loss = vocab_head_loss(wrong, dense, text, 0.05)
    assert loss > 0.1
    loss.backward()
    assert wrong.grad[1, 2, 2].abs().sum() == 0 and wrong.grad[0, 0, 0].abs().sum() > 0


def test_vocab_head_loss_needs_the_head():
    with pytest.raises(ConfigError, match="vocab_topk"):
        from_dict({"loss": {"vocab_head_weight": 1.0}})


def test_training_with_the_vocab_head_loss_logs_it(tiny_data, tmp_path):
    import json

    cfg = tiny_config(tiny_data, tmp_path / "v", train={"iters": 2, "log_every": 1}, student={"vocab_topk": 4},
                      loss={"vocab_head_weight": 1.0})
    train(cfg, verbose=False)
    rows = [json.loads(line) for line in (tmp_path / "v" / "metrics.jsonl").read_text().splitlines()]
    values = [r["vocab_head"] for r in rows if "vocab_head" in r]
    assert values and all(v > 0 for v in values)


def gated_student(mix: float = 1.0) -> Student:
    torch.manual_seed(0)
    cfg = StudentConfig(pretrained=False, head_dim=16, vocab_topk=3, vocab_mix=mix, vocab_gate=True)
    student = Student(cfg, D).eval()
    student.set_bank(torch.nn.functional.normalize(torch.randn(1000, D), dim=1))
    return student


def unit_np(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=0, keepdims=True)


def test_the_gate_weighs_the_mixture_per_name():
    student = gated_student(mix=1.0)
    with torch.no_grad():
        out = student(torch.rand(1, 3, 64, 64))
        assert out.shape == (1, 2 * D, 16, 16)
        # the MLP half's cosine; the mixture half (upsampled unit vectors) by its dot product, linear like the upsampling
        head, mix = unit_np(out[0, :D].numpy().reshape(D, -1)), out[0, D:].numpy().reshape(D, -1)
        text = torch.nn.functional.normalize(torch.randn(3, D), dim=1)
        # name-blind at the start: mix 1 -> both cosines count half
        got = student.scores(out, text)[0].numpy().reshape(3, -1)
        assert np.allclose(got, 0.5 * (text.numpy() @ head) + 0.5 * (text.numpy() @ mix), atol=1e-5)
        # a gate that reads the name: one name all mixture, one all MLP head
        student.vocab_gate.weight.copy_(100.0 * text[0] - 100.0 * text[1])
        student.vocab_gate.bias.zero_()
        got = student.scores(out, text)[0].numpy().reshape(3, -1)
    g = 0.5 * (1 + np.tanh(50.0 * text.numpy() @ (text[0] - text[1]).numpy()))  # sigmoid(100 x), overflow-free
    assert g[0] > 0.99 and g[1] < 0.01
    want = (1 - g)[:, None] * (text.numpy() @ head) + g[:, None] * (text.numpy() @ mix)
    assert np.allclose(got, want, atol=1e-5)
    assert np.allclose(got[0], text.numpy()[0] @ mix, atol=1e-2) and np.allclose(got[1], text.numpy()[1] @ head, atol=1e-2)


def test_a_gated_student_trains_the_gate_and_sums_its_halves_for_the_teacher(tiny_data, tmp_path):
    cfg = tiny_config(tiny_data, tmp_path / "g", train={"iters": 2}, student={"vocab_topk": 4, "vocab_gate": True},
                      loss={"vocab_weight": 1.0})
    train(cfg, verbose=False)
    got = load_checkpoint(tmp_path / "g" / "last.pt")["model"]
    assert got["student.vocab_gate.weight"].float().abs().max() > 0  # zero at the start: the loss reached it
    student = gated_student(mix=0.5)
    out = torch.randn(2, 2 * D, 4, 4)
    want = unit_t(out[:, :D]) + 0.5 * unit_t(out[:, D:])
    assert torch.allclose(student.embed(out), want, atol=1e-6)


def unit_t(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def test_the_gate_needs_the_vocabulary_head():
    with pytest.raises(ConfigError, match="vocab_gate"):
        from_dict({"student": {"vocab_gate": True}})


def gated_bundle(tmp_path, gate_std: float = 0.0):
    """An untrained gated student (tiny CLIP teacher) at tmp_path/ckpt.pt, exported to tmp_path/bundle; gate_std > 0
    draws a gate that tells names apart. Returns (config, teacher)."""
    from clipteacher.config import Config
    from clipteacher.export.bundle import export_bundle, write_untrained_checkpoint
    from clipteacher.predictor import Segmenter

    cfg = Config()
    cfg.teacher.kind, cfg.teacher.clip_config, cfg.teacher.input_size = "clip", TINY_CLIP, 32
    cfg.student.pretrained, cfg.student.head_dim, cfg.data.eval_size = False, 16, 64
    cfg.student.vocab_topk, cfg.student.vocab_gate = 5, True
    teacher = write_untrained_checkpoint(cfg, ["cow", "grass", "sky"], ["cow", "grass"], tmp_path / "ckpt.pt")
    if gate_std > 0:
        student = Segmenter.from_checkpoint(tmp_path / "ckpt.pt").student
        with torch.no_grad():
            student.vocab_gate.weight.normal_(0, gate_std)
        torch.save({**load_checkpoint(tmp_path / "ckpt.pt"),
                    "model": {"student." + k: v for k, v in student.state_dict().items()}}, tmp_path / "ckpt.pt")
    export_bundle(tmp_path / "ckpt.pt", tmp_path / "bundle", teacher=teacher, log=lambda *_: None)
    return cfg, teacher


def test_gated_bundle_matches_pytorch(tmp_path):
    import onnxruntime as ort

    from clipteacher.predictor import Segmenter

    cfg, teacher = gated_bundle(tmp_path, gate_std=3.0)  # a gate that tells names apart: per-name weights seen
    student = Segmenter.from_checkpoint(tmp_path / "ckpt.pt").student
    image = ort.InferenceSession(str(tmp_path / "bundle" / "student.onnx"), providers=["CPUExecutionProvider"])
    head = ort.InferenceSession(str(tmp_path / "bundle" / "classifier.onnx"), providers=["CPUExecutionProvider"])
    x = torch.rand(1, 3, 97, 131, generator=torch.Generator().manual_seed(0))
    text = torch.nn.functional.normalize(torch.randn(4, teacher.embed_dim), dim=1)
    with torch.no_grad():
        ref = student.logits(x, text, cfg.student.logit_scale, torch.zeros(4)).numpy()
    feats = image.run(None, {"image": x.numpy()})[0]
    assert feats.shape[1] == teacher.embed_dim + -(-teacher.embed_dim // 16)  # [MLP feature; packed mixture]
    got = head.run(None, {"features": feats, "class_embeddings": text.numpy(), "bias": np.zeros(4, np.float32),
                          "out_size": np.array([97, 131], np.int64)})[0]
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-3
    gates = torch.sigmoid(student.vocab_gate(text)).detach().numpy()
    assert gates.max() - gates.min() > 0.1  # the names were weighed differently


def test_the_probe_scores_a_gated_bundle_and_its_teacher(tmp_path):
    """The probe ran the teacher's D-dim tokens through the student's classifier, which a gated head widens to 2D."""
    import json

    from PIL import Image

    from clipteacher.runtime import Bundle
    from training.experiments.probe import run_probe

    gated_bundle(tmp_path)
    pool = tmp_path / "pool"
    (pool / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = {f"{i}.png": n for i, n in enumerate(["cow", "sheep", "horse", "goat", "dog", "cat"])}
    for file in names:
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(pool / "images" / file)
    (pool / "images.json").write_text(json.dumps({"images": {f: {"name": n} for f, n in names.items()}}))
    out = run_probe(Bundle(tmp_path / "bundle", verbose=False), pool, ks=(2,), hubness=False)
    assert out["student"]["images"] == out["teacher"]["images"] == len(names)
    assert 0 <= out["teacher"]["top1@2"] <= 100


def test_the_gate_learns_at_its_own_rate_without_decay():
    student = gated_student()
    groups = student.param_groups(1e-3, 0.1, 0.01, gate_mult=30.0)
    gate = [g for g in groups if any(p is student.vocab_gate.weight for p in g["params"])]
    assert len(gate) == 1 and gate[0]["lr"] == pytest.approx(3e-2) and gate[0]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(student.parameters()))


@pytest.mark.parametrize("train", [False, True])
def test_the_mlp_head_equals_the_concatenate_then_fuse_decoder_it_replaces(train):
    """MLPHead sums per-stage composed maps; the SegFormer decoder concatenates upsampled projections and fuses
    them with one 1x1 convolution. Same parameters, same outputs and gradients (BN in both modes)."""
    from clipteacher.models.student import MLPHead

    torch.manual_seed(0)
    head = MLPHead([5, 7, 9, 11], 6, 4).train(train)
    with torch.no_grad():  # non-trivial BN statistics and affine terms
        head.fuse[1].running_mean.normal_()
        head.fuse[1].running_var.uniform_(0.5, 2.0)
        head.fuse[1].weight.normal_()
        head.fuse[1].bias.normal_()
    feats = [torch.randn(2, c, 23 // s + 1, 31 // s + 1) for c, s in zip((5, 7, 9, 11), (1, 2, 4, 8))]

    def concat_then_fuse(feats):
        size = feats[0].shape[-2:]
        ups = [torch.nn.functional.interpolate(p(f), size=size, mode="bilinear", align_corners=False)
               for p, f in zip(head.proj, feats)]
        return head.embed(head.fuse(torch.cat(ups, dim=1)))

    state = {k: v.clone() for k, v in head.state_dict().items()}
    ours = head(feats)
    grads = torch.autograd.grad(ours.square().sum(), list(head.parameters()))
    head.load_state_dict(state)  # train mode updated the BN running statistics once already
    ref = concat_then_fuse(feats)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(head.parameters()))
    assert ours.shape == (2, 4, 24, 32)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    scale = max(r.abs().max() for r in ref_grads)  # in train mode BN cancels the projection biases' gradients to ~0
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-3, atol=1e-5 * scale)


def test_anchor_loss_matches_a_hand_computed_kl_and_skips_padding():
    from clipteacher.train.losses import anchor_loss

    student = torch.zeros(1, 1, 2, 1000)
    anchor = torch.zeros(1, 1, 2, 1000)
    anchor[0, 0, 0, 0] = np.log(999.0)  # the anchor puts 0.5 on name 0, 0.5 / 999 on each other name
    anchor[0, 0, 1, 0] = 50.0  # the second cell is padding: whatever it holds must not count
    valid = torch.tensor([[[True, True, False, False]]])  # B x H x W, the crop's right half padded
    p = np.full(1000, 0.5 / 999)
    p[0] = 0.5
    expected = float((p * np.log(p * 1000)).sum())  # KL(p || uniform)
    assert float(anchor_loss(student, anchor, valid)) == pytest.approx(expected, rel=1e-5)
    assert float(anchor_loss(anchor, anchor)) == pytest.approx(0.0, abs=1e-6)


def test_the_anchor_is_the_pretrained_classifier_frozen_and_never_saved(tiny_data, tmp_path):
    """A fine-tune (train.init_from) moves the student; the anchor stays the classifier the student was built with,
    stays out of the checkpoint, and its loss trains the student's classifier only."""
    import json

    from clipteacher.train.distill import ImageNetAnchor

    cfg = tiny_config(tiny_data, tmp_path / "a", train={"iters": 2, "log_every": 1}, student={"vocab_topk": 4},
                      loss={"anchor_weight": 1.0})
    train(cfg, verbose=False)
    saved = load_checkpoint(tmp_path / "a" / "last.pt")["model"]
    assert not any(k.startswith("anchor.") for k in saved) and "student.vocab.classifier.weight" in saved
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [r["anchor"] for r in rows if "anchor" in r]

    # fine-tune from that run: the student starts from its weights, the anchor from the built (initial) ones
    cfg2 = tiny_config(tiny_data, tmp_path / "b", train={"iters": 1, "init_from": str(tmp_path / "a" / "last.pt")},
                       student={"vocab_topk": 4}, loss={"anchor_weight": 1.0})
    from clipteacher.train.engine import build_run, check_inputs, initialise

    train_set, val_set, _ = check_inputs(cfg2, None, False, True)
    run = build_run(cfg2, train_set, val_set, verbose=False)
    built = {k: v.clone() for k, v in run.core.anchor.state_dict().items()}
    initialise(run, cfg2.train.init_from)
    anchor = run.core.anchor
    assert isinstance(anchor, ImageNetAnchor) and not anchor.training
    for k, v in anchor.state_dict().items():
        assert torch.equal(v, built[k]), k
    w = "classifier.classifier.weight"
    assert not torch.equal(anchor.state_dict()[w], saved["student.vocab.classifier.weight"].float())
    run.core.train()
    assert not anchor.training and not any(p.requires_grad for p in anchor.parameters())


def test_anchor_loss_needs_the_head():
    with pytest.raises(ConfigError, match="vocab_topk"):
        from_dict({"loss": {"anchor_weight": 1.0}})


def test_pretrained_interpolation_steps_backbone_and_classifier_back_and_nothing_else():
    """WiSE-FT at weight w: each backbone / vocabulary-classifier tensor t_ft -> (1 - w) t_ft + w t_pre, with t_pre the
    packaged ImageNet weights the student is built with; the MLP head, the bank and integer buffers stay."""
    from clipteacher.models.build import interpolate_pretrained

    cfg = from_dict({"student": {"head_dim": 16, "vocab_topk": 3}})
    pre = Student(cfg.student, D).state_dict()
    tuned = {f"student.{k}": v + 1.0 if v.is_floating_point() else v + 3 for k, v in pre.items()}
    ckpt = {"config": cfg.to_dict(), "model": tuned, "embed_dim": D}
    out = interpolate_pretrained(ckpt, 0.25)["model"]
    assert ckpt["model"] is tuned and all(torch.equal(tuned[k], ckpt["model"][k]) for k in tuned)  # not mutated
    moved = {"backbone.conv_stem.weight", "backbone.blocks.6.0.bn3.running_var", "vocab.features.0.weight",
             "vocab.classifier.weight", "vocab.classifier.bias"}
    for k in moved:
        torch.testing.assert_close(out[f"student.{k}"], pre[k] + 0.75)
    for k in ("head.embed.weight", "head.proj.0.bias", "vocab.bank", "vocab_mix"):
        assert torch.equal(out[f"student.{k}"], tuned[f"student.{k}"]), k
    assert torch.equal(out["student.backbone.bn1.num_batches_tracked"], tuned["student.backbone.bn1.num_batches_tracked"])
    assert all(torch.equal(a, b) for a, b in zip(interpolate_pretrained(ckpt, 0.0)["model"].values(), tuned.values()))


@pytest.mark.parametrize("values, weight", [({"student": {"pretrained": False}}, 0.5), ({}, 1.5)])
def test_pretrained_interpolation_refuses_what_it_cannot_do(values, weight):
    from clipteacher.models.build import interpolate_pretrained

    cfg = from_dict(values)
    with pytest.raises(ValueError, match="pretrained interpolation"):
        interpolate_pretrained({"config": cfg.to_dict(), "model": {}, "embed_dim": D}, weight)


def branch_student(branch: bool) -> Student:
    torch.manual_seed(0)
    cfg = StudentConfig(pretrained=False, head_dim=16, vocab_topk=3, vocab_branch=branch)
    student = Student(cfg, D)
    student.set_bank(torch.nn.functional.normalize(torch.randn(1000, D), dim=1))
    return student


@pytest.mark.parametrize("branch", [False, True])
def test_with_the_branch_the_shared_stride_32_blocks_no_longer_reach_the_classifier(branch):
    """Changing the backbone's stride-32 blocks changes the MLP feature either way, and the ImageNet logits only
    without the branch; a change before stride 16 reaches both."""
    student = branch_student(branch).eval()
    x = torch.rand(2, 3, 96, 64)
    with torch.no_grad():
        out, _, logits = student.parts(x)
        for p in student.backbone.blocks[5:].parameters():
            p.add_(0.1 * torch.randn_like(p))
        out2, _, logits2 = student.parts(x)
        for p in student.backbone.blocks[4].parameters():
            p.add_(0.1 * torch.randn_like(p))
        out3, _, logits3 = student.parts(x)
    assert logits.shape == (2, 3, 2, 1000)
    assert not torch.allclose(out, out2) and not torch.allclose(out2, out3) and not torch.allclose(logits2, logits3)
    assert torch.equal(logits, logits2) == branch


def test_the_branch_is_frozen_in_eval_mode_and_left_out_of_the_optimiser():
    student = branch_student(True).train()
    branch = student.vocab.branch
    assert not branch.training and student.vocab.features.training and student.backbone.training
    assert not any(p.requires_grad for p in branch.parameters())
    groups = student.param_groups(1e-3, 0.1, 0.0)
    ids = {id(p) for g in groups for p in g["params"]}
    assert not ids & {id(p) for p in branch.parameters()}
    assert {id(p) for p in student.vocab.classifier.parameters()} <= ids
    before = {k: v.clone() for k, v in branch.state_dict().items()}
    student.parts(torch.rand(2, 3, 64, 64))[2].sum().backward()  # the ImageNet logits alone, in train mode
    assert all(torch.equal(v, before[k]) for k, v in branch.state_dict().items())  # BatchNorm statistics kept
    assert all(p.grad is None for p in branch.parameters())
    assert student.backbone.blocks[4][0].conv_pw.weight.grad is not None  # the gradient passes through the branch
    assert student.backbone.blocks[6][0].conv_pw.weight.grad is None  # and not through the shared stride-32 blocks


def test_adding_the_branch_to_a_checkpoint_keeps_every_trained_tensor_and_loads_strictly():
    """The branch comes from the weights the student is built with (packaged ImageNet weights), not from the
    checkpoint's trained stride-32 blocks."""
    from clipteacher.models.build import add_vocabulary_branch

    cfg = from_dict({"student": {"head_dim": 16, "vocab_topk": 3}})
    built = Student(cfg.student, D).state_dict()
    tuned = {f"student.{k}": v + 1.0 if v.is_floating_point() else v for k, v in built.items()}
    ckpt = {"config": cfg.to_dict(), "model": tuned, "embed_dim": D}
    out = add_vocabulary_branch(ckpt)
    assert not ckpt["config"]["student"]["vocab_branch"] and ckpt["model"] is tuned  # not mutated
    assert from_dict(out["config"]).student.vocab_branch
    assert all(torch.equal(out["model"][k], v) for k, v in tuned.items())
    student = Student(from_dict(out["config"]).student, D)
    student.load_state_dict({k.removeprefix("student."): v for k, v in out["model"].items()})  # strict
    new = [k for k in out["model"] if k not in tuned]
    assert new and all(k.startswith("student.vocab.branch.") for k in new)
    assert {k.split(".")[3] for k in new} == {"5", "6"}  # EfficientNet-Lite0's stride-32 blocks, indices kept
    for k in new:  # the packaged blocks, where the trained backbone's copy was moved by +1
        assert torch.equal(out["model"][k], built[k.replace("student.vocab.branch.", "backbone.blocks.")]), k
    with pytest.raises(ValueError, match="already"):
        add_vocabulary_branch(out)
    with pytest.raises(ValueError, match="vocabulary head"):
        add_vocabulary_branch({"config": from_dict({}).to_dict(), "model": {}, "embed_dim": D})


def test_the_anchor_reads_the_stage_the_branch_reads():
    from clipteacher.train.distill import ImageNetAnchor

    student = branch_student(True).eval()
    anchor = ImageNetAnchor(student)
    x = torch.rand(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.allclose(anchor(x), student.parts(x)[2])


def test_a_student_without_the_branch_fine_tunes_into_one_with_it(tiny_data, tmp_path):
    """train.init_from a checkpoint without the branch + student.vocab_branch=true (the README's recipe): the
    branch starts from the packaged blocks, every other tensor from the checkpoint, and stays frozen."""
    pre = {"vocab_topk": 4, "pretrained": True}
    train(tiny_config(tiny_data, tmp_path / "a", train={"iters": 1}, student=pre), verbose=False)
    cfg = tiny_config(tiny_data, tmp_path / "b", train={"iters": 1, "init_from": str(tmp_path / "a" / "last.pt")},
                      student={**pre, "vocab_branch": True})
    train(cfg, verbose=False)
    built = Student(cfg.student, D).vocab.branch.state_dict()
    saved = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    for k, v in built.items():
        assert torch.equal(saved[f"student.vocab.branch.{k}"].float(), v.float()), k

"""ONNX bundle: onnxruntime vs PyTorch parity, tokenizers, bundle.json, bad input, atomic writes, torch-free runtime."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from clipteacher.export.bundle import OPSET, export_bundle, write_untrained_checkpoint
from clipteacher.runtime.clip_tokenizer import ClipTokenizer
from clipteacher.cli.export import main as export_main
from clipteacher.runtime.bundle import Bundle, resize_short, to_input
from clipteacher.checkpoint import load_checkpoint, save_checkpoint
from clipteacher.config import Config
from clipteacher.predictor import Segmenter, predict_logits, unseen_bias
from helpers import MSRC, ROOT, TINY_CLIP

CLASSES = ["building", "grass", "tree", "cow", "sheep", "sky", "aeroplane", "water", "bicycle"]
SEEN = [c for c in CLASSES if c not in ("aeroplane", "bicycle")]
TRICKY = ["café", "Ünïcödé façade", "🦄 unicorn 🐱", "t-shirt, (large)", "  ", "rock'n'roll & co.", "日本語の名前",
          ("big red t-shirt, " * 30)[:500], "x" * 500, "&amp; html", "CAPS Name"]


def cosine(a: np.ndarray, b: np.ndarray, axis: int = 1) -> np.ndarray:
    return (a * b).sum(axis) / np.linalg.norm(a, axis=axis) / np.linalg.norm(b, axis=axis)


def real_images(n: int = 3) -> list[np.ndarray]:
    import cv2

    paths = sorted((MSRC / "images").glob("*.jpg"))[:: 97][:n]
    if not paths:
        pytest.skip(f"msrc21 images not found under {MSRC}")
    return [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]


@pytest.fixture(scope="module")
def conse(tmp_path_factory):
    """An untrained student (packaged ImageNet backbone) with the real ConSE teacher, exported once."""
    root = tmp_path_factory.mktemp("conse")
    cfg = Config()
    cfg.data.eval_size = 160
    cfg.teacher.templates = ("a photo of a {}.", "{}")
    cfg.teacher.conse_smoothing = 0.1  # as the shipped configs: the key smoothing must export too
    teacher = write_untrained_checkpoint(cfg, CLASSES, SEEN, root / "ckpt.pt")
    export_bundle(root / "ckpt.pt", root / "bundle", teacher=teacher, log=lambda *_: None)
    return {"root": root, "ckpt": root / "ckpt.pt", "dir": root / "bundle", "teacher": teacher,
            "seg": Segmenter.from_checkpoint(root / "ckpt.pt"), "bundle": Bundle(root / "bundle", verbose=False)}


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A tiny random CLIP teacher, exported through the CLI with int8 and fp16 students."""
    root = tmp_path_factory.mktemp("clip")
    cfg = Config()
    cfg.teacher.kind, cfg.teacher.clip_config, cfg.teacher.input_size = "clip", TINY_CLIP, 32
    cfg.student.pretrained, cfg.student.head_dim, cfg.data.eval_size = False, 32, 64
    cfg.data.root = str(MSRC)
    teacher = write_untrained_checkpoint(cfg, CLASSES, SEEN, root / "ckpt.pt")
    # the CLI rebuilds the random CLIP from the training seed; its fingerprint must match the checkpoint's
    assert export_main(["--checkpoint", str(root / "ckpt.pt"), "--out", str(root / "bundle"), "--int8", "--fp16"]) == 0
    return {"root": root, "ckpt": root / "ckpt.pt", "dir": root / "bundle", "teacher": teacher, "cfg": cfg,
            "bundle": Bundle(root / "bundle", verbose=False)}


# ---------------------------------------------------------------------------- image parity


def test_student_parity_on_random_images(conse):
    import onnxruntime as ort

    sess = ort.InferenceSession(str(conse["dir"] / "student.onnx"), providers=["CPUExecutionProvider"])
    student = conse["seg"].student
    gen = torch.Generator().manual_seed(0)
    for shape in [(2, 3, 160, 160), (1, 3, 97, 131)]:  # batch, and sizes unlike the export's dummy
        x = torch.rand(*shape, generator=gen)
        with torch.no_grad():
            ref = student(x).numpy()
        got = sess.run(None, {"image": x.numpy()})[0]
        assert got.shape == ref.shape
        assert cosine(got, ref).min() >= 0.9999


def test_student_and_labels_parity_on_real_images(conse):
    bundle, seg = conse["bundle"], conse["seg"]
    text = torch.stack([seg.text_cache[c] for c in CLASSES])
    bias = unseen_bias(CLASSES, seg.vocabulary, seg.gamma)
    assert bias.numpy().tolist() == bundle.unseen_bias(CLASSES).tolist()
    for image in real_images():
        feats = bundle.image_features(image)
        x = torch.from_numpy(to_input(resize_short(image, bundle.eval_size)))  # the evaluation protocol's input
        with torch.no_grad():
            ref = seg.student(x).numpy()
        assert cosine(feats, ref).min() >= 0.9999
        labels = bundle.segment(image, CLASSES)  # served: with the bundle's default hubness correction
        served_bias = bias + torch.from_numpy(bundle.hubness_bias(text.numpy()))
        ref_labels = predict_logits(seg.student, x, text, seg.cfg.student.logit_scale, served_bias,
                                    image.shape[:2]).argmax(1)[0]
        assert labels.shape == image.shape[:2]
        assert (labels == ref_labels.numpy()).mean() >= 0.999
        assert len(np.unique(labels)) > 1  # a constant map would make the agreement meaningless


def test_classifier_logits_and_new_vocabulary(conse):
    bundle = conse["bundle"]
    feats = bundle.image_features(real_images(1)[0], size=96)
    names = ["cow", "zebra", "t-shirt"]  # two names never embedded before, no new image pass
    text, bias = bundle.embed_text(names), bundle.unseen_bias(names, gamma=0.7)
    assert bias.tolist() == pytest.approx([0.0, 0.7, 0.7])
    labels, logits = bundle.classify(feats, text, bias, out_size=(50, 70))
    f = feats[0] / np.linalg.norm(feats[0], axis=0, keepdims=True)
    expected = bundle.logit_scale * np.einsum("dhw,cd->chw", f, text) + bias[:, None, None]
    np.testing.assert_allclose(logits, expected, atol=1e-3)
    assert labels.shape == (50, 70) and labels.dtype == np.int64 and labels.max() < 3
    with pytest.raises(ValueError, match="class_embeddings"):
        bundle.classify(feats, text[:, :5], bias)


def test_teacher_tokens_parity(conse, clip):
    for fx, size in ((conse, 448), (clip, 32)):
        image = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)  # at input size: no resize
        cls, dense = fx["bundle"].teacher_tokens(image)
        ref = fx["teacher"](torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)
        np.testing.assert_allclose(cls, ref.cls[0].numpy(), atol=1e-4)
        assert cosine(dense, ref.dense[0].numpy(), axis=0).min() >= 0.9999


# ---------------------------------------------------------------------------- text


def test_minilm_tokenizer_ids_match_transformers(conse):
    from transformers import AutoTokenizer

    from clipteacher.models.teachers import MINILM_MAX_TOKENS, minilm_folder

    ref = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)(
        TRICKY, padding=True, truncation=True, max_length=MINILM_MAX_TOKENS, return_tensors="np")
    got = conse["bundle"].tokenize(TRICKY)
    np.testing.assert_array_equal(got["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(got["attention_mask"], ref["attention_mask"])
    assert got["input_ids"].shape[1] == MINILM_MAX_TOKENS  # the 500-character name was truncated


@pytest.mark.parametrize("context_length", [77, 16])
def test_clip_tokenizer_ids_match_open_clip(context_length):
    from open_clip.tokenizer import SimpleTokenizer, default_bpe

    names = TRICKY + [f"a photo of a {n}." for n in TRICKY]
    ref = SimpleTokenizer(context_length=context_length)(names).numpy()
    got = ClipTokenizer(default_bpe(), context_length)(names)
    np.testing.assert_array_equal(got, ref)
    assert (got[:, -1] != 0).any()  # some names were long enough to be truncated


def test_text_encoder_parity(conse, clip):
    for fx in (conse, clip):
        bundle, teacher = fx["bundle"], fx["teacher"]
        for templates in (None, ("itap of a {}.",)):
            got = bundle.embed_text(TRICKY, templates)
            ref = teacher.encode_text(TRICKY, templates or bundle.templates).numpy()
            assert got.shape == ref.shape
            assert cosine(got, ref).min() >= 0.9999
    cached = conse["bundle"].embed_text(CLASSES)  # served from bundle.json, exactly the checkpoint's cache
    np.testing.assert_array_equal(cached, torch.stack([conse["seg"].text_cache[c] for c in CLASSES]).numpy())


# ---------------------------------------------------------------------------- bundle files


def test_bundle_json_and_checksums(conse, clip, tmp_path):
    for fx in (conse, clip):
        meta = json.loads((fx["dir"] / "bundle.json").read_text())
        assert set(meta["checksums"]) == set(meta["files"].values())
        for name, digest in meta["checksums"].items():
            assert hashlib.sha256((fx["dir"] / name).read_bytes()).hexdigest() == digest
        assert meta["versions"]["opset"] == OPSET and meta["vocabulary"] == SEEN
        assert meta["gamma"] == 1.5 and meta["logit_scale"] == 20.0
        assert meta["input"]["student"]["normalised_in_graph"] is True
        assert sorted(os.listdir(fx["dir"])) == sorted(list(meta["checksums"]) + ["bundle.json"])
    meta = json.loads((clip["dir"] / "bundle.json").read_text())
    assert meta["teacher"]["kind"] == "clip" and meta["teacher"]["tokenizer"]["context_length"] == 16
    assert {"student_int8", "student_fp16"} <= set(meta["files"])
    broken = tmp_path / "broken"
    shutil.copytree(clip["dir"], broken)
    with open(broken / "classifier.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="checksum"):
        Bundle(broken, verbose=False)


def test_int8_and_fp16_students(clip):
    image = real_images(1)[0]
    ref = clip["bundle"].image_features(image)
    for precision, floor in (("fp16", 0.999), ("int8", 0.95)):
        got = Bundle(clip["dir"], precision=precision, verify=False, verbose=False).image_features(image)
        assert got.shape == ref.shape and cosine(got, ref).mean() >= floor
    with pytest.raises(ValueError, match="precision"):
        Bundle(clip["dir"], precision="int4", verify=False, verbose=False)


def test_int8_quantises_only_the_head_convolutions_and_says_how(clip):
    """Every convolution outside INT8_MODULES keeps float weights; the ReLU between fuse and embed is folded
    into the quantised fuse (its range is the activation's, docs/DESIGN.md#int8-student)."""
    import onnx

    from clipteacher.export.bundle import INT8_MODULES

    graph = onnx.load(str(clip["dir"] / "student.int8.onnx")).graph
    made_by = {o: n for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    quantised = {n.name for n in convs if n.input[1] in made_by and made_by[n.input[1]].op_type == "DequantizeLinear"}
    assert quantised and all(name.startswith(INT8_MODULES) for name in quantised)
    assert {n.name for n in convs if n.name.startswith(INT8_MODULES)} == quantised
    assert len(quantised) < len(convs)
    notes = json.loads((clip["dir"] / "bundle.json").read_text())["notes"]["int8"]
    assert sorted(notes["quantised"]) == sorted(quantised)
    assert "split train" in notes["calibration"] or "random" in notes["calibration"]


def test_calibration_images_from_sources_dataset_or_random(tmp_path):
    from PIL import Image

    from clipteacher.export.bundle import calibration_images

    cfg = Config()
    cfg.data.eval_size, cfg.data.root = 32, str(tmp_path / "no_dataset")
    images, origin = calibration_images(cfg, 3, log=lambda *_: None)
    assert len(images) == 3 and "random" in origin and all(x.shape == (1, 3, 32, 32) for x in images)
    for i, size in enumerate([(40, 60), (50, 50), (64, 48)]):
        Image.fromarray(np.full((*size, 3), 40 * i, np.uint8)).save(tmp_path / f"c{i}.png")
    images, origin = calibration_images(cfg, 2, [str(tmp_path / "*.png")], log=lambda *_: None)
    assert len(images) == 2 and str(tmp_path) in origin
    assert images[1].max() == pytest.approx(80 / 255)  # evenly spaced: the first and the last of three
    assert all(x.shape == (1, 3, 32, 32) and x.dtype == np.float32 for x in images)
    (tmp_path / "c1.png").write_text("not an image")
    with pytest.raises(ValueError, match="--calibration") as err:  # given images must be usable
        calibration_images(cfg, 3, [str(tmp_path)], log=lambda *_: None)
    assert "\n" not in str(err.value)


def test_calibration_flags_need_int8(conse, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export_main(["--checkpoint", str(conse["ckpt"]), "--out", str(tmp_path / "b"), "--calibration", str(tmp_path)])
    assert exit_.value.code == 2 and "--int8" in capsys.readouterr().err
    code, lines = run_cli(["--checkpoint", str(conse["ckpt"]), "--out", str(tmp_path / "b"), "--int8",
                           "--calibration", str(tmp_path / "missing")], capsys)
    errors = [line for line in lines if not line.startswith("Loading weights")]  # the teacher's own progress bar
    assert code == 2 and len(errors) == 1 and "--calibration" in errors[0] and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------- bad input


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    code = export_main(args)
    return code, capsys.readouterr().err.strip().splitlines()


def test_bad_inputs_give_one_line_errors(conse, tmp_path, capsys):
    out = tmp_path / "out"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    ckpt = load_checkpoint(conse["ckpt"])
    ckpt["config"]["teacher"]["kind"] = "sam"
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, tmp_path / "sam.pt")
    ckpt = load_checkpoint(conse["ckpt"])
    ckpt["model"] = {k: v for k, v in ckpt["model"].items() if "embed" not in k}
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, tmp_path / "partial.pt")
    cases = [
        (["--checkpoint", str(conse["ckpt"]), "--out", str(conse["dir"])], "already exists"),
        (["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)], "not found"),
        (["--checkpoint", str(garbage), "--out", str(out)], "could not be read"),
        (["--checkpoint", str(tmp_path / "sam.pt"), "--out", str(out)], "'teacher.kind' must be one of clip, conse; got 'sam'"),
        (["--checkpoint", str(tmp_path / "partial.pt"), "--out", str(out)], "does not fit"),
    ]
    for args, message in cases:
        code, lines = run_cli(args, capsys)
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (args, lines)
        assert not out.exists()

    ckpt = load_checkpoint(conse["ckpt"])
    ckpt["teacher_fingerprint"] = "conse-0000000000000000"  # trained with another teacher
    save_checkpoint({k: v for k, v in ckpt.items() if k != "format"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="another teacher"):
        export_bundle(tmp_path / "other.pt", out, teacher=conse["teacher"], log=lambda *_: None)
    assert not out.exists()


def test_failure_mid_export_leaves_no_folder(clip, tmp_path, monkeypatch):
    import clipteacher.export.bundle

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(clipteacher.export.bundle, "quantize_int8", boom)  # after four graphs are already written
    out = tmp_path / "bundle"
    with pytest.raises(RuntimeError, match="disk full"):
        export_bundle(clip["ckpt"], out, int8=True, teacher=clip["teacher"], log=lambda *_: None)
    assert os.listdir(tmp_path) == []  # neither the bundle nor its temp folder


# ---------------------------------------------------------------------------- torch-free runtime


def test_runtime_does_not_import_torch(conse, clip):
    code = f"""
import sys
import numpy as np
from clipteacher.runtime import Bundle
image = np.random.default_rng(0).integers(0, 256, (120, 90, 3), dtype=np.uint8)
for folder in ({str(conse["dir"])!r}, {str(clip["dir"])!r}):
    b = Bundle(folder, verbose=False)
    labels = b.segment(image, ["cow", "zebra crossing", "café"])
    assert labels.shape == (120, 90), labels.shape
    b.teacher_tokens(image)
    print(b.provider)
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))
print("torch-free")
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip().splitlines()[-1] == "torch-free"
    assert "ExecutionProvider" in res.stdout


def test_a_lone_pass_runs_on_the_solo_session_and_concurrent_ones_on_their_own(bundle_dir):
    """solo_threads: the student and classifier calls that start while nothing else runs use the all-core copy;
    one that starts while another is in flight uses the per-request session; the answers are the same."""
    import threading

    bundle = Bundle(bundle_dir, verbose=False, threads=1, spin=False, solo_threads=2)
    for options in (bundle._session("student").get_session_options(), bundle._solo_options):  # both draw from one arena
        assert options.get_session_config_entry("session.use_env_allocators") == "1"
    image = np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)
    alone = bundle.segment(image, ["sky", "cow"])
    assert bundle.solo_calls == 2 and bundle.last_threads == 2  # the student and the classifier, on both threads
    bundle.embed_text(["a name never embedded"])
    assert bundle.solo_calls == 2 and bundle.last_threads == 1  # the text encoder has no solo copy
    with bundle.without_solo():  # a long job's calls (1 thread against 2 may flip a tie)
        assert float((bundle.segment(image, ["sky", "cow"]) == alone).mean()) > 0.99
    assert bundle.solo_calls == 2 and bundle.last_threads == 1

    solo = bundle._session("student", solo=True)
    entered, release, plain = threading.Event(), threading.Event(), bundle._session("student")
    run, plain_run = solo.run, plain.run

    def held(*args, **kwargs):  # a lone call that is still computing while the next one starts
        entered.set()
        release.wait(30)
        return run(*args, **kwargs)

    solo.run = held
    try:
        first = threading.Thread(target=bundle.image_features, args=(image,))
        first.start()
        assert entered.wait(30)
        plain_calls = []
        plain.run = lambda *a, **k: plain_calls.append(1) or plain_run(*a, **k)
        concurrent = bundle.image_features(image)
        assert plain_calls == [1] and bundle.solo_calls == 3  # only the held call went solo
    finally:
        release.set()
        first.join(30)
        solo.run = run
        plain.run = plain_run
    np.testing.assert_allclose(concurrent, bundle.image_features(image), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(alone, bundle.segment(image, ["sky", "cow"]))


def test_no_solo_session_without_more_threads_than_a_request_has(bundle_dir):
    for threads, solo in ((2, 2), (1, None), (1, 0), (None, 2)):  # None: onnxruntime's default, all cores
        bundle = Bundle(bundle_dir, verbose=False, threads=threads, solo_threads=solo)
        bundle.segment(np.zeros((40, 40, 3), np.uint8), ["sky"])
        assert bundle.solo_threads is None and bundle.solo_calls == 0

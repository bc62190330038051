"""Write a self-describing ONNX bundle from a training checkpoint (segment-anything's export pattern).

    export_bundle("runs/msrc21/last.pt", "bundles/msrc21", int8=True)

The bundle folder holds
    student.onnx       image B x 3 x H x W float RGB [0, 1] -> features B x D x H/4 x W/4
    classifier.onnx    features, class_embeddings C x D, bias C, out_size (H, W) -> logits B x C x h x w, labels B x H x W
    text_encoder.onnx  input_ids, attention_mask -> embeddings B x D (unit), plus its tokenizer file
    teacher.onnx       image B x 3 x S x S float RGB [0, 1] -> cls B x D, dense B x D x h x w (S = teacher input size)
    student.int8.onnx / student.fp16.onnx   optional variants
    bundle.json        everything `clipteacher.runtime.Bundle` needs (vocabulary, gamma, scale, sizes, templates,
                       cached text embeddings, versions, sha256 of every file)
Every graph uses opset OPSET, named inputs and explicit dynamic axes, passes `onnx.checker`, and is
run once by onnxruntime against PyTorch before the folder is published. Files are written to a
temp folder next to the target, which is renamed at the end, so a bundle is never half-written.
"""
from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from clipteacher.export.modules import (ClassifierOnnx, VocabClassifierOnnx, StudentOnnx, TeacherOnnx,
                                        TextEncoderOnnx, ZegCLIPClassifierOnnx, ZegCLIPImageOnnx)
from clipteacher.runtime.bundle import BUNDLE_FORMAT, HUBNESS_DEFAULT, HUBNESS_STRENGTH
from clipteacher.io import model_digest, read_image_file, resize_short, sha256_file
from clipteacher.checkpoint import model_record, save_checkpoint
from clipteacher.config import Config
from clipteacher.predictor import Segmenter
from clipteacher.models.student import Student
from clipteacher.models.teachers import MINILM_MAX_TOKENS, Teacher, build_teacher, minilm_folder

OPSET = 17
CALIBRATION_IMAGES = 32  # int8 activation ranges come from this many training images
REFERENCE_IMAGES = 96  # hubness reference: training images whose student features give each name's expected score
CALIBRATION_PERCENTILE = 99.99  # of each activation's values: clips rare outliers, finer steps for the rest
# The student modules quantised to int8 (node-name prefixes of the exported graph): the head's embed, the
# one 1x1 convolution at stride 4 with many channels (the fuse product is folded into each stage's map,
# `MLPHead`). Every other layer costs more label agreement than it saves time; measured in
# docs/DESIGN.md#int8-student with bench/int8.py --sweep.
INT8_MODULES = ("/student/head/embed/",)


def export_onnx(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str],
                dynamic_axes: dict) -> list[np.ndarray]:
    """Trace `module` to `path`, check it, run it once in onnxruntime and compare with PyTorch.

    Returns the onnxruntime outputs on `args`. Inputs the graph does not use (CLIP's
    attention_mask) are dropped by the exporter and so not fed.
    """
    module.eval()
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's fused inference kernel has no ONNX symbolic; trace the plain ops instead
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings():
            # the TorchScript exporter is deprecated in favour of torch.export, but is the one that
            # takes explicit dynamic_axes for HF/timm models without guards; tracer warnings are expected
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    onnx.checker.check_model(str(path))
    with torch.no_grad():
        ref = module(*args)
    ref = [ref] if isinstance(ref, torch.Tensor) else list(ref)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: a.numpy() for name, a in zip(inputs, args)}
    got = sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})
    for name, r, g in zip(outputs, ref, got):
        r = r.numpy()
        ok = np.array_equal(r, g) if r.dtype.kind == "i" else np.allclose(r, g, rtol=1e-3, atol=1e-4)
        if r.shape != g.shape or not ok:
            raise RuntimeError(f"{path.name}: onnxruntime output '{name}' differs from PyTorch on the dummy input")
    return got


def check_teacher(teacher: Teacher, seg: Segmenter, checkpoint: str | Path) -> None:
    """The text tower must be the one that embedded the checkpoint's classes, or cached and new embeddings disagree."""
    if teacher.kind != seg.cfg.teacher.kind:
        raise ValueError(f"checkpoint {checkpoint} was trained with teacher '{seg.cfg.teacher.kind}', "
                         f"got a '{teacher.kind}' teacher")
    if teacher.embed_dim != seg.student.embed_dim:
        raise ValueError(f"checkpoint {checkpoint}: student embeds in {seg.student.embed_dim}-d, "
                         f"teacher in {teacher.embed_dim}-d")
    if seg.teacher_fingerprint and teacher.fingerprint() != seg.teacher_fingerprint:
        raise ValueError(f"checkpoint {checkpoint} was trained with another teacher (fingerprint {seg.teacher_fingerprint}, "
                         f"this machine builds {teacher.fingerprint()}); its text embeddings would not match")


def calibration_images(cfg: Config, n: int = CALIBRATION_IMAGES, sources: list[str] | None = None,
                       log=print) -> tuple[list[np.ndarray], str]:
    """Up to n images for int8 calibration, as 1 x 3 x S x S float [0, 1] (short side S = eval_size,
    centre-cropped), and where they came from.

    sources: image files, folders or patterns (`clipteacher.batch.collect_inputs`); default the training
    split of the checkpoint's dataset. When that is not on this machine, random images: for the two
    head convolutions that are quantised they gave the same agreement with fp32 as real images
    (docs/DESIGN.md#int8-student), and bundle.json records which was used."""
    size = cfg.data.eval_size
    try:
        if sources:
            from clipteacher.batch import collect_inputs

            paths, _ = collect_inputs(list(sources), None)
            picks = np.linspace(0, len(paths) - 1, min(n, len(paths))).astype(int)
            images = [resize_short(read_image_file(paths[i]), size) for i in picks]
            origin = f"{len(images)} images from {', '.join(map(str, sources))}"
        else:
            from clipteacher.train.datasets import build_dataset

            folder = build_dataset(cfg.data.kind, cfg.data.root, cfg.data.train_split)
            picks = np.linspace(0, len(folder) - 1, min(n, len(folder))).astype(int)
            images = [resize_short(folder.read_image(int(i)), size) for i in picks]
            origin = f"{len(images)} images of {cfg.data.root} split {cfg.data.train_split}"
    except Exception as err:  # noqa: BLE001 - a missing/broken dataset falls back; explicit sources do not
        if sources:
            raise ValueError(f"--calibration: {err}") from None
        log(f"export: int8 calibration: dataset {cfg.data.root} unavailable ({type(err).__name__}); using random images")
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]
        origin = f"{n} random images (dataset {cfg.data.root} was not available)"
    out = []
    for im in images:
        h, w = im.shape[:2]
        y, x = (h - size) // 2, (w - size) // 2
        crop = im[y: y + size, x: x + size]
        out.append(np.ascontiguousarray(crop.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0)
    return out, origin


def reference_images(cfg: Config, n: int = REFERENCE_IMAGES) -> tuple[list[np.ndarray], str]:
    """Up to n training images (H x W x 3 uint8 at short side eval_size), spread evenly over the run's sources
    (`data` and `data.extra`; an unlabelled pool counts, without its probe images), and where they came from.
    ([], reason) when none of them is on this machine."""
    from clipteacher.train.sources import ImagePool
    from clipteacher.config import SourceConfig
    from clipteacher.train.datasets import build_dataset

    folders, missing = [], []
    primary = SourceConfig(kind=cfg.data.kind, root=cfg.data.root, split=cfg.data.train_split, val_split="")
    for src in (primary, *cfg.data.extra):
        try:
            folders.append(ImagePool(src.root, src.exclude_probe) if src.kind == "images"
                           else build_dataset(src.kind, src.root, src.split))
        except Exception as err:  # noqa: BLE001 - a source not on this machine is left out and named
            missing.append(f"{src.root} ({type(err).__name__})")
    if not folders:
        return [], f"no training images on this machine: {', '.join(missing)}"
    each = max(1, n // len(folders))
    images = []
    for f in folders:
        picks = np.unique(np.linspace(0, len(f) - 1, min(each, len(f))).astype(int))
        images += [resize_short(f.read_image(int(i)), cfg.data.eval_size) for i in picks]
    origin = f"{len(images)} training images of {', '.join(str(f.root) for f in folders)}"
    return images, origin + (f" (not found: {', '.join(missing)})" if missing else "")


@torch.no_grad()
def feature_mean(student: Student, images: list[np.ndarray]) -> np.ndarray:
    """D: the mean of the student's score vectors (`Student.score_vectors`: its unit features without the
    vocabulary head) over every feature cell of `images` (H x W x 3 uint8 each).

    A name's expected cosine under the training images is then one dot product (`Bundle.hubness_bias`)."""
    from clipteacher.predictor import to_tensor

    total, cells = None, 0
    for im in images:
        unit = student.score_vectors(student(to_tensor(im)[None]))[0]  # D x h x w
        s = unit.flatten(1).sum(1)
        total = s if total is None else total + s
        cells += unit.shape[1] * unit.shape[2]
    return (total / cells).numpy().astype(np.float32)


def quantize_int8(src: Path, dst: Path, images: list[np.ndarray], modules: tuple[str, ...] = INT8_MODULES) -> list[str]:
    """Static QDQ int8 of the student's convolutions under `modules` (ONNX node-name prefixes); all else
    stays fp32. Returns the names of the quantised convolutions.

    Per-channel int8 weights, uint8 activations with ranges at the CALIBRATION_PERCENTILE of the
    calibration images. The ReLU / ReLU6 after a quantised convolution is quantised with it, so its
    output range is the activation's ([0, 6]) rather than the pre-activation's, which is far wider.
    Why only the head's embed convolution: docs/DESIGN.md#int8-student (bench/int8.py --sweep).
    """
    import contextlib
    import io

    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"image": im} for im in images])

        def get_next(self):
            return next(self.items, None)

    pre = dst.with_suffix(".pre.onnx")
    # no symbolic shapes: the shape arithmetic of timm's 'same' padding must stay dynamic
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    model = onnx.load(str(pre))
    convs = [n for n in model.graph.node if n.op_type == "Conv" and n.name.startswith(tuple(modules))]
    if not convs:
        raise ValueError(f"int8: no convolution of the student graph is under {', '.join(modules)}")
    outputs = {o for n in convs for o in n.output}
    activations = [n.name for n in model.graph.node if n.op_type in ("Relu", "Clip") and n.input[0] in outputs]
    with contextlib.redirect_stdout(io.StringIO()):  # the calibrator prints its progress
        quantize_static(str(pre), str(dst), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                        op_types_to_quantize=["Conv", "Relu", "Clip"],
                        nodes_to_quantize=[n.name for n in convs] + activations,
                        calibrate_method=CalibrationMethod.Percentile,
                        extra_options={"CalibPercentile": CALIBRATION_PERCENTILE})
    pre.unlink()
    onnx.checker.check_model(str(dst))
    return [n.name for n in convs]


def topological_sort(graph: onnx.GraphProto) -> None:
    """Reorder graph.node in place so every node comes after the producers of its inputs (stable)."""
    done = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    order, pending = [], list(graph.node)
    while pending:
        rest = []
        for node in pending:
            if all(i in done for i in node.input):
                order.append(node)
                done.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at node {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(order)


def convert_fp16(src: Path, dst: Path) -> str | None:
    """fp16 weights and activations with fp32 inputs/outputs (for GPUs). Returns None, or why it was skipped."""
    try:
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError as err:
        return f"onnxruntime.transformers.float16 is not available ({err})"
    model = convert_float_to_float16(onnx.load(str(src)), keep_io_types=True)
    topological_sort(model.graph)  # the converter appends the input casts after their consumers
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))
    return None


def versions() -> dict:
    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "unknown"

    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__, "opset": OPSET,
            "clipteacher": version("clipteacher"), "timm": version("timm"), "open_clip": version("open_clip_torch")}


def write_bundle(folder: Path, seg: Segmenter, teacher: Teacher, checkpoint: str | Path, int8: bool, fp16: bool,
                 log=print, calibration: list[str] | None = None, calibration_count: int = CALIBRATION_IMAGES) -> None:
    """Write every file of the bundle into an existing empty `folder` (calibration: see calibration_images)."""
    cfg, student, dim = seg.cfg, seg.student.cpu().eval(), seg.student.embed_dim
    # Graphs are traced and checked on the CPU; a caller's GPU teacher is copied, not moved under its feet.
    teacher = (teacher if teacher.pixel_mean.device.type == "cpu" else copy.deepcopy(teacher).cpu()).eval()
    files, notes = {}, {}
    if int8:  # read first: unusable --calibration images stop the export before anything is traced
        images, origin = calibration_images(cfg, calibration_count, calibration, log=log)

    zegclip = cfg.method == "zegclip"
    if zegclip and int8:
        raise ValueError("--int8 quantises the student's head; a ZegCLIP/TagCLIP checkpoint has none (export without it)")
    log("export: student.onnx" + (" (ZegCLIP image pass: prompted CLIP)" if zegclip else ""))
    size = cfg.data.eval_size
    image_pass = ZegCLIPImageOnnx(student) if zegclip else StudentOnnx(student)
    (feats,) = export_onnx(image_pass, (torch.rand(1, 3, size, size),), folder / "student.onnx", ["image"],
                           ["features"], {"image": {0: "batch", 2: "height", 3: "width"},
                                          "features": {0: "batch", 2: "feature_height", 3: "feature_width"}})
    files["student"] = "student.onnx"
    stride = size // feats.shape[-1]

    feature_axes = {0: "batch", 2: "feature_height", 3: "feature_width"}
    axes = {"features": feature_axes, "class_embeddings": {0: "classes"}, "bias": {0: "classes"},
            "unseen": {0: "classes"}, "logits": {0: "batch", 1: "classes", 2: "feature_height", 3: "feature_width"},
            "labels": {0: "batch", 1: "height", 2: "width"}}
    text = torch.nn.functional.normalize(torch.randn(3, dim), dim=-1)
    bias, out_size = torch.tensor([0.0, 0.0, 1.5]), torch.tensor([48, 40])
    cosine = ClassifierOnnx(cfg.student.logit_scale)
    cosine_inputs = ["features", "class_embeddings", "bias", "out_size"]
    cosine_axes = {k: v for k, v in axes.items() if k != "unseen"}
    plain = not zegclip and student.vocab is None  # the student's classifier is the plain cosine
    if zegclip:
        log("export: classifier.onnx (ZegCLIP decoder" + (", TagCLIP trusty map)" if cfg.zegclip.trusty else ")"))
        export_onnx(ZegCLIPClassifierOnnx(student), (torch.randn(1, feats.shape[1], 12, 10), text, bias, torch.tensor([0.0, 0.0, 1.0]),
                                                     out_size),
                    folder / "classifier.onnx", ["features", "class_embeddings", "bias", "unseen", "out_size"],
                    ["logits", "labels"], {k: v for k, v in axes.items() if k != "features"} | {"features": feature_axes})
    elif not plain:
        log("export: classifier.onnx (vocabulary head)")
        export_onnx(VocabClassifierOnnx(student), (torch.randn(1, feats.shape[1], 12, 10), text, bias, out_size),
                    folder / "classifier.onnx", cosine_inputs, ["logits", "labels"], cosine_axes)
    log("export: " + ("classifier.onnx" if plain else "cosine.onnx"))
    # otherwise the Compare view's plain cosine of the teacher's D-channel dense tokens, which this classifier is not
    export_onnx(cosine, (torch.randn(1, dim, 12, 10), text, bias, out_size),
                folder / ("classifier.onnx" if plain else "cosine.onnx"), cosine_inputs, ["logits", "labels"], cosine_axes)
    if not plain:
        files["cosine"] = "cosine.onnx"
    files["classifier"] = "classifier.onnx"

    log("export: text_encoder.onnx")
    if teacher.kind == "conse":
        from transformers import AutoTokenizer

        shutil.copy(Path(minilm_folder()) / "tokenizer.json", folder / "tokenizer.json")
        pad = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True).pad_token
        tokenizer = {"kind": "wordpiece", "file": "tokenizer.json", "max_length": MINILM_MAX_TOKENS, "pad_token": pad}
        length_axis = {1: "length"}
    else:
        from open_clip.tokenizer import default_bpe

        shutil.copy(default_bpe(), folder / Path(default_bpe()).name)
        context = int(teacher.text_encoder.positional_embedding.shape[0])
        tokenizer = {"kind": "clip_bpe", "file": Path(default_bpe()).name, "context_length": context}
        length_axis = {}  # CLIP's positional embedding and causal mask fix the length
    tok = teacher.tokenize(["a photo of a cat.", "t-shirt"])
    export_onnx(TextEncoderOnnx(teacher), (tok["input_ids"], tok["attention_mask"]), folder / "text_encoder.onnx",
                ["input_ids", "attention_mask"], ["embeddings"],
                {"input_ids": {0: "batch", **length_axis}, "attention_mask": {0: "batch", **length_axis},
                 "embeddings": {0: "batch"}})
    files["text_encoder"] = "text_encoder.onnx"
    files["tokenizer"] = tokenizer["file"]

    log("export: teacher.onnx")
    s = teacher.input_size
    export_onnx(TeacherOnnx(teacher), (torch.rand(1, 3, s, s),), folder / "teacher.onnx", ["image"], ["cls", "dense"],
                {"image": {0: "batch"}, "cls": {0: "batch"}, "dense": {0: "batch"}})
    files["teacher"] = "teacher.onnx"

    if int8:
        log("export: student.int8.onnx")
        quantised = quantize_int8(folder / "student.onnx", folder / "student.int8.onnx", images)
        files["student_int8"] = "student.int8.onnx"
        notes["int8"] = {"calibration": origin, "quantised": quantised, "percentile": CALIBRATION_PERCENTILE}
    if fp16:
        log("export: student.fp16.onnx")
        skipped = convert_fp16(folder / "student.onnx", folder / "student.fp16.onnx")
        if skipped:
            log(f"export: fp16 skipped: {skipped}")
            notes["fp16"] = f"skipped: {skipped}"
        else:
            files["student_fp16"] = "student.fp16.onnx"

    # The hubness reference travels in the model (so an export without the training data, as in Docker, has it);
    # a model without one gets it from its training images when they are on this machine.
    mean, origin = seg.feature_mean, seg.feature_mean_reference
    if zegclip:
        origin = "not for ZegCLIP/TagCLIP: the correction is measured on the student's features"
    elif student.vocab_gate is not None:
        mean, origin = None, "not for a gated vocabulary head: its names score two features each"
    elif mean is None:
        log("export: hubness reference")
        ref_images, origin = reference_images(cfg)
        mean = torch.from_numpy(feature_mean(student, ref_images)) if ref_images else None
    hubness = None
    if mean is not None and not zegclip:
        hubness = {"mean": [float(v) for v in mean.float()], "strength": HUBNESS_STRENGTH,
                   "default": HUBNESS_DEFAULT if seg.hubness_default is None else seg.hubness_default,
                   "reference": origin}
    else:
        log(f"export: no hubness reference ({origin}); the bundle serves without the correction")
        notes["hubness"] = origin

    names = list(seg.text_cache)
    pixels = student.encoder if zegclip else student  # who holds the image normalisation
    meta = {
        "format": BUNDLE_FORMAT,
        "files": files,
        # what the image pass is: the student, or ZegCLIP/TagCLIP (features packed as [tokens; g], 2 x embed_dim)
        "model": {"method": cfg.method, "trusty": bool(zegclip and cfg.zegclip.trusty),
                  "feature_dim": int(feats.shape[1])},
        "vocabulary": list(seg.vocabulary),
        "gamma": float(seg.gamma),
        "hubness": hubness,
        "glm": {"scaled": bool(cfg.glm.scaled)},  # the app's GLM-attention view computes what training did
        "logit_scale": float(cfg.student.logit_scale),
        "embed_dim": dim,
        "feature_stride": int(stride),
        "eval_size": int(cfg.data.eval_size),
        "input": {
            "student": {"layout": "B x 3 x H x W", "color": "RGB", "range": [0.0, 1.0], "normalised_in_graph": True,
                        "mean": pixels.mean.flatten().tolist(), "std": pixels.std.flatten().tolist()},
            "teacher": {"layout": "B x 3 x S x S", "color": "RGB", "range": [0.0, 1.0], "normalised_in_graph": True,
                        "size": teacher.input_size, "mean": teacher.pixel_mean.flatten().tolist(),
                        "std": teacher.pixel_std.flatten().tolist()},
        },
        "teacher": {"kind": teacher.kind, "input_size": teacher.input_size, "fingerprint": teacher.fingerprint(),
                    "templates": list(cfg.teacher.templates), "tokenizer": tokenizer},
        # float32 -> Python float -> JSON round-trips exactly
        "text_cache": {"names": names, "embeddings": [[float(v) for v in seg.text_cache[n].float()] for n in names]},
        "source": {"checkpoint": str(Path(checkpoint).resolve()), "checkpoint_sha256": model_digest(checkpoint),
                   "student_backbone": cfg.student.backbone},
        "versions": versions(),
        "notes": notes,
        "checksums": {name: sha256_file(folder / name) for name in sorted(set(files.values()))},
    }
    (folder / "bundle.json").write_text(json.dumps(meta, indent=1))


def export_bundle(checkpoint: str | Path, out: str | Path, int8: bool = False, fp16: bool = False,
                  teacher: Teacher | None = None, log=print, calibration: list[str] | None = None,
                  calibration_count: int = CALIBRATION_IMAGES) -> Path:
    """Checkpoint -> bundle folder `out` (must not exist). `teacher` reuses an already built teacher
    (checked against the checkpoint's fingerprint). int8 calibration images: `calibration_images`.
    Errors are one line; nothing is left behind on failure."""
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"output folder already exists: {out} (choose another --out or remove it)")
    seg = Segmenter.from_checkpoint(checkpoint)
    if teacher is None:
        torch.manual_seed(seg.cfg.train.seed)  # as training does, so random test CLIPs (clip_config) are rebuilt exactly
        teacher = build_teacher(seg.cfg.teacher)
    check_teacher(teacher, seg, checkpoint)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        write_bundle(tmp, seg, teacher, checkpoint, int8, fp16, log, calibration, calibration_count)
        if out.exists():
            raise FileExistsError(f"output folder appeared during export: {out}")
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"export: wrote {out}")
    return out


def write_untrained_checkpoint(cfg: Config, classes: list[str], vocabulary: list[str], path: str | Path,
                               teacher: Teacher | None = None) -> Teacher:
    """A checkpoint of an untrained student, or of ZegCLIP/TagCLIP around the teacher's CLIP (cfg.method), for
    smoke tests and the latency benchmark. Returns the teacher."""
    from clipteacher.models.build import build_model, fill_vocabulary_bank

    torch.manual_seed(cfg.train.seed)
    teacher = teacher or build_teacher(cfg.teacher)
    text = teacher.encode_text(list(classes), cfg.teacher.templates)
    torch.manual_seed(cfg.train.seed)
    student = build_model(cfg, teacher.embed_dim, visual=teacher.visual if cfg.method == "zegclip" else None)
    fill_vocabulary_bank(student, teacher, cfg.teacher.templates)
    save_checkpoint(model_record(cfg.to_dict(), {f"student.{k}": v for k, v in student.state_dict().items()},
                                 vocabulary, dict(zip(classes, text)), teacher.embed_dim, cfg.train.gamma,
                                 teacher.fingerprint()), path)
    return teacher

"""A Triton Inference Server model repository made from an exported bundle.

    clipteacher-export --bundle bundles/default --triton triton_repo             # GPU instances
    clipteacher-export --bundle bundles/default --triton triton_repo --triton-instances cpu
    tritonserver --model-repository triton_repo

One Triton model per graph of the bundle, each the bundle's own ONNX file (onnxruntime backend):

    clipteacher_student       image  B x 3 x H x W (RGB in [0, 1])      -> features  B x D x h x w
    clipteacher_classifier    features 1 x D x h x w, class_embeddings C x D, bias C, out_size [H, W]
                                                                        -> logits 1 x C x h x w, labels 1 x H x W
    clipteacher_text_encoder  input_ids (and attention_mask) B x L int64 -> embeddings B x D (unit rows)
    clipteacher_teacher       image  B x 3 x S x S                      -> cls, dense (the Compare view only)

A ZegCLIP/TagCLIP bundle (bundle.json "model") has the same models: its student is the prompted CLIP
(features B x 2D x h x w, [tokens; g]), its classifier the decoder, which also takes `unseen` C (1.0 for
names outside the training vocabulary; TagCLIP's trusty weighting), and `clipteacher_cosine` scores the
teacher's tokens.

The student and the text encoder batch dynamically (requests of the same image size are stacked); the
classifier takes a vocabulary of any length, so it is not batched. A client runs the same steps as
`clipteacher.runtime.Bundle.segment` (written out in the repository's README.md): tokenise the names with
the tokenizer bundle.json names (copied beside it), embed them (or take the cached rows of bundle.json),
add the unseen-name bias gamma and the hubness correction, run the student on the resized image, then the
classifier.
`check_repository` parses every config.pbtxt with Triton's own model-config protobuf (from `tritonclient`)
and compares each input and output with the ONNX graph it serves.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

ONNX_TYPES = {1: "TYPE_FP32", 7: "TYPE_INT64", 10: "TYPE_FP16", 6: "TYPE_INT32", 9: "TYPE_BOOL"}
MAX_BATCH = 8  # images (or names) per dynamically batched run
QUEUE_DELAY_US = 2000  # how long Triton waits to fill a batch
PREFIX = "clipteacher_"


@dataclass
class ModelSpec:
    """One Triton model: which bundle file it serves and whether its first axis is Triton's batch axis."""

    name: str  # Triton model name (folder)
    onnx: str  # the bundle's file
    batched: bool  # max_batch_size > 0 and dynamic batching


def model_specs(bundle_dir: Path, precision: str = "fp32") -> list[ModelSpec]:
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    student = meta["files"].get("student" if precision == "fp32" else f"student_{precision}")
    if student is None:
        raise ValueError(f"{bundle_dir} has no {precision} student graph (bundle.json files: {sorted(meta['files'])})")
    specs = [ModelSpec(PREFIX + "student", student, True), ModelSpec(PREFIX + "classifier", meta["files"]["classifier"], False),
             ModelSpec(PREFIX + "text_encoder", meta["files"]["text_encoder"], True)]
    if "teacher" in meta["files"]:
        specs.append(ModelSpec(PREFIX + "teacher", meta["files"]["teacher"], True))
    if "cosine" in meta["files"]:  # ZegCLIP/TagCLIP bundles: the plain cosine classifier for the teacher's tokens
        specs.append(ModelSpec(PREFIX + "cosine", meta["files"]["cosine"], False))
    return specs


def graph_io(path: Path) -> tuple[list, list]:
    """(inputs, outputs) of an ONNX graph, each as (name, Triton data type, dims with -1 for symbolic axes)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def rows(values):
        return [(v.name, ONNX_TYPES[v.type.tensor_type.elem_type],
                 [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim]) for v in values]

    return rows(graph.input), rows(graph.output)


def config_text(spec: ModelSpec, inputs: list, outputs: list, instances: str, count: int) -> str:
    """config.pbtxt of one model, in protobuf text format."""
    drop = 1 if spec.batched else 0  # Triton adds the batch axis itself when max_batch_size > 0

    def tensors(kind: str, rows: list) -> str:
        items = [f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: [ {", ".join(map(str, d[drop:]))} ]\n  }}'
                 for n, t, d in rows]
        return f"{kind} [\n" + ",\n".join(items) + "\n]\n"

    text = (f'name: "{spec.name}"\nbackend: "onnxruntime"\nmax_batch_size: {MAX_BATCH if spec.batched else 0}\n'
            + tensors("input", inputs) + tensors("output", outputs))
    if spec.batched:
        text += f"dynamic_batching {{\n  max_queue_delay_microseconds: {QUEUE_DELAY_US}\n}}\n"
    text += f"instance_group [\n  {{\n    count: {count}\n    kind: KIND_{instances.upper()}\n  }}\n]\n"
    return text


def write_repository(bundle_dir: str | Path, out: str | Path, instances: str = "gpu", count: int = 1,
                     precision: str = "fp32") -> Path:
    """Bundle folder -> Triton model repository `out` (must not exist). instances: "gpu" | "cpu"."""
    bundle_dir, out = Path(bundle_dir), Path(out)
    if instances not in ("gpu", "cpu"):
        raise ValueError(f"instances must be 'gpu' or 'cpu', got {instances!r}")
    if count < 1:
        raise ValueError(f"instance count must be at least 1, got {count}")
    if not (bundle_dir / "bundle.json").is_file():
        raise FileNotFoundError(f"{bundle_dir} is not a bundle (no bundle.json); export one with clipteacher-export")
    if out.exists():
        raise FileExistsError(f"{out} exists; choose a new folder for the Triton repository")
    specs = model_specs(bundle_dir, precision)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for spec in specs:
            folder = tmp / spec.name
            (folder / "1").mkdir(parents=True)
            shutil.copyfile(bundle_dir / spec.onnx, folder / "1" / "model.onnx")
            inputs, outputs = graph_io(folder / "1" / "model.onnx")
            (folder / "config.pbtxt").write_text(config_text(spec, inputs, outputs, instances, count))
        # what a client needs besides the graphs: the tokenizer, the cached name embeddings, gamma, hubness
        for path in bundle_dir.iterdir():
            if path.is_file() and path.suffix != ".onnx":
                shutil.copyfile(path, tmp / (PREFIX + "text_encoder") / path.name)
        (tmp / "README.md").write_text(CLIENT_FLOW)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_repository(repo: str | Path) -> list[str]:
    """Parse every config.pbtxt with tritonclient's ModelConfig protobuf and compare it with its ONNX graph.
    Returns the model names; raises ValueError naming the first mismatch."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repo = Path(repo)
    names = []
    for folder in sorted(p for p in repo.iterdir() if p.is_dir()):
        config = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        if config.name != folder.name:
            raise ValueError(f"{folder}/config.pbtxt names model {config.name!r}, not its folder's name")
        graph = folder / "1" / "model.onnx"
        if not graph.is_file():
            raise ValueError(f"{folder.name}: no version 1 model.onnx")
        inputs, outputs = graph_io(graph)
        drop = 1 if config.max_batch_size > 0 else 0
        for kind, declared, actual in (("input", config.input, inputs), ("output", config.output, outputs)):
            want = {n: (t, d[drop:]) for n, t, d in actual}
            got = {t.name: (model_config_pb2.DataType.Name(t.data_type), list(t.dims)) for t in declared}
            if got != want:
                raise ValueError(f"{folder.name}: config {kind}s {got} do not match the graph's {want}")
        if config.max_batch_size > 0 and not config.HasField("dynamic_batching"):
            raise ValueError(f"{folder.name}: batched but without dynamic_batching")
        names.append(config.name)
    if not names:
        raise ValueError(f"{repo} holds no model folders")
    return names


CLIENT_FLOW = """\
# clipteacher models for Triton

Written by `clipteacher-export --triton`. Start with `tritonserver --model-repository <this folder>`.

A segmentation is the same sequence of steps as `clipteacher.runtime.Bundle.segment`:

1. Names -> text embeddings. Rows of the names in `clipteacher_text_encoder/bundle.json` ("text_cache")
   can be used as they are. Other names: fill each prompt template of bundle.json ("teacher" ->
   "templates") with the name, tokenise with the tokenizer that bundle.json names ("teacher" ->
   "tokenizer"; its file is copied into `clipteacher_text_encoder/`), call
   `clipteacher_text_encoder` (input_ids and, for the MiniLM encoder, attention_mask: B x L int64), average the templates' rows
   and L2-normalise.
2. Bias per name: +gamma (bundle.json "gamma") for a name outside bundle.json "vocabulary"; with the
   hubness correction on, minus strength x logit_scale x (name embedding . bundle.json hubness "mean").
3. Image -> features: resize so the short side is bundle.json "eval_size" (bilinear), RGB in [0, 1],
   layout 1 x 3 x H x W float32; call `clipteacher_student` -> features 1 x D x h x w.
4. `clipteacher_classifier` with features, class_embeddings (C x D), bias (C) and out_size (the
   original image's [height, width], int64) -> labels 1 x H x W (indices into the names) and logits.

The vocabulary can change without re-running step 3: keep the features of an image and repeat 1, 2, 4.
"""

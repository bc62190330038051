"""clipteacher-export --triton: a Triton model repository whose config.pbtxt files parse with Triton's own
model-config protobuf and match the ONNX graphs, and whose documented client flow gives the bundle's masks."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest

from clipteacher.cli import export as export_cli
from clipteacher.export import triton
from clipteacher.runtime import Bundle

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is not installed")
from google.protobuf import text_format  # noqa: E402


@pytest.fixture(scope="module")
def repo(bundle_dir, tmp_path_factory):
    return triton.write_repository(bundle_dir, tmp_path_factory.mktemp("triton") / "repo", instances="cpu", count=2)


def parse(repo: Path, name: str):
    return text_format.Parse((repo / name / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def test_repository_parses_and_matches_the_graphs(repo):
    assert triton.check_repository(repo) == ["clipteacher_classifier", "clipteacher_student", "clipteacher_teacher",
                                             "clipteacher_text_encoder"]
    student = parse(repo, "clipteacher_student")
    assert student.backend == "onnxruntime" and student.max_batch_size > 0
    image = student.input[0]
    assert image.name == "image" and image.data_type == model_config_pb2.TYPE_FP32
    assert list(image.dims) == [3, -1, -1]  # the batch axis is Triton's; height and width vary
    assert student.HasField("dynamic_batching")
    assert [(g.kind, g.count) for g in student.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)]
    classifier = parse(repo, "clipteacher_classifier")
    assert classifier.max_batch_size == 0 and not classifier.HasField("dynamic_batching")  # any vocabulary length
    assert {t.name for t in classifier.input} == {"features", "class_embeddings", "bias", "out_size"}
    text = parse(repo, "clipteacher_text_encoder")
    assert {t.data_type for t in text.input} == {model_config_pb2.TYPE_INT64}  # token ids (and a mask for MiniLM)
    meta = json.loads((repo / "clipteacher_text_encoder" / "bundle.json").read_text())
    tokenizer = meta["teacher"].get("tokenizer", {}).get("file")
    assert tokenizer is None or (repo / "clipteacher_text_encoder" / tokenizer).is_file()


def test_a_config_that_disagrees_with_its_graph_is_caught(repo, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(repo, broken)
    path = broken / "clipteacher_student" / "config.pbtxt"
    path.write_text(path.read_text().replace('name: "image"', 'name: "pixels"'))
    with pytest.raises(ValueError, match="clipteacher_student: config inputs"):
        triton.check_repository(broken)
    path.write_text(path.read_text().replace("max_batch_size: 8", "max_batch_size: 0"))  # dims now lack batch
    with pytest.raises(ValueError, match="clipteacher_student"):
        triton.check_repository(broken)


def test_client_flow_of_the_readme_gives_the_bundles_mask(repo, bundle_dir):
    """The steps in the repository's README.md, run on its own model files, reproduce Bundle.segment."""
    bundle = Bundle(bundle_dir, verbose=False)
    meta = json.loads((repo / "clipteacher_text_encoder" / "bundle.json").read_text())
    image = np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8)
    names = ["sky", "cow", "zebra"]  # zebra is outside the vocabulary: +gamma
    run = {m: ort.InferenceSession(str(repo / m / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
           for m in ("clipteacher_student", "clipteacher_classifier", "clipteacher_text_encoder")}
    rows = []
    for name in names:
        prompts = [t.replace("{}", name) for t in meta["teacher"]["templates"]]
        tokens = bundle.tokenize(prompts)
        encoder = run["clipteacher_text_encoder"]
        emb = encoder.run(None, {i.name: tokens[i.name] for i in encoder.get_inputs()})[0].mean(0)
        rows.append(emb / np.linalg.norm(emb))
    text = np.stack(rows).astype(np.float32)
    bias = np.array([meta["gamma"] if n not in meta["vocabulary"] else 0.0 for n in names], np.float32)
    hub = meta.get("hubness")
    if hub and hub["default"]:
        bias -= hub["strength"] * meta["logit_scale"] * (text @ np.asarray(hub["mean"], np.float32))
    h, w = image.shape[:2]
    s = meta["eval_size"] / min(h, w)
    small = cv2.resize(image, (round(w * s), round(h * s)), interpolation=cv2.INTER_LINEAR)
    features = run["clipteacher_student"].run(None, {"image": small.transpose(2, 0, 1)[None].astype(np.float32) / 255})[0]
    labels = run["clipteacher_classifier"].run(["labels"], {"features": features, "class_embeddings": text, "bias": bias,
                                                            "out_size": np.array([h, w], np.int64)})[0][0]
    expected = bundle.segment(image, names, gamma=meta["gamma"])
    assert labels.shape == expected.shape and (labels == expected).mean() > 0.99


def test_cli_writes_checks_and_refuses_in_one_line(bundle_dir, tmp_path, capsys):
    out = tmp_path / "repo"
    assert export_cli.main(["--bundle", str(bundle_dir), "--triton", str(out)]) == 0
    assert "checked against the ONNX graphs" in capsys.readouterr().out
    assert parse(out, "clipteacher_student").instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    assert export_cli.main(["--bundle", str(bundle_dir), "--triton", str(out)]) == 2  # exists
    assert export_cli.main(["--bundle", str(tmp_path), "--triton", str(tmp_path / "x")]) == 2  # not a bundle
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "exists" in err and "not a bundle" in err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob("*.partial"))
    with pytest.raises(SystemExit):
        export_cli.main(["--bundle", str(bundle_dir)])  # --bundle without --triton

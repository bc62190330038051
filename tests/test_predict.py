"""clipteacher-predict: masks as the app's download, the summary, bad files, resuming, stem clashes,
one-line argument errors, kills that leave no half mask, and a torch-free process."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipteacher import batch
from clipteacher.app import service as svc
from clipteacher.cli import predict
from clipteacher.runtime import Bundle
from helpers import ROOT

NAMES = "sky, grass, cow, zebra"


def write_images(folder: Path, n: int, seed: int = 0, size=(48, 64), prefix: str = "img") -> list[Path]:
    """n random RGB images, alternately .jpg and .png: folder/<prefix><i>.<ext>."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"{prefix}{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def run_cli(*args, bundle=None) -> int:
    return predict.main([*map(str, args), *(["--bundle", str(bundle)] if bundle else [])])


def summary(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "summary.jsonl").read_text().splitlines()]


def read_mask(path: Path) -> tuple[np.ndarray, list[str], list[int]]:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.mode == "P"
        return np.asarray(im), json.loads(im.info["classes"]), im.getpalette()


# ---------------------------------------------------------------------------- outputs


def test_masks_are_the_apps_download_and_summary_matches_them(bundle_dir, tmp_path, capsys):
    images = write_images(tmp_path / "in", 3)
    (tmp_path / "in" / "notes.jpg").write_text("a text file renamed .jpg\n")
    (tmp_path / "in" / "readme.txt").write_text("not listed: no image suffix\n")
    extra = write_images(tmp_path / "other", 1, seed=1, size=(40, 40), prefix="extra")[0]
    out = tmp_path / "out"
    code = run_cli(tmp_path / "in", extra, "--names", NAMES, "--out", out, "--overlay", bundle=bundle_dir)
    err = capsys.readouterr().err
    assert code == 1  # the text file failed
    assert [line for line in err.splitlines() if line.startswith("error:")] == [
        f"error: {tmp_path / 'in' / 'notes.jpg'}: notes.jpg is not an image that can be read; "
        "upload a PNG, JPEG or WebP file."]
    service = svc.Service(Bundle(bundle_dir, verbose=False))
    lines = {Path(item["file"]).name: item for item in summary(out)}
    assert len(summary(out)) == 5 and set(lines) == {"img0.jpg", "img1.png", "img2.jpg", "notes.jpg", "extra0.jpg"}
    assert set(lines["notes.jpg"]) == {"file", "error"}
    for path in images + [extra]:
        item = next(i for i in summary(out) if i["file"] == str(path))
        mask, classes, palette = read_mask(out / item["mask"])
        assert item["mask"] == f"{path.stem}.png"
        image, _ = svc.load_image(path)
        seg = service.segment(image, NAMES)
        np.testing.assert_array_equal(mask, seg.labels)  # the app's labels, names and palette
        assert classes == seg.names and palette[: 3 * len(classes)] == seg.colors.ravel().tolist()
        assert (item["width"], item["height"]) == (image.shape[1], image.shape[0])
        counts = np.bincount(mask.ravel(), minlength=len(classes))
        expected = {classes[i]: counts[i] / mask.size for i in range(len(classes)) if counts[i]}
        assert item["shares"] == pytest.approx(expected, abs=1e-6) and item["seconds"] >= 0
        with Image.open(out / f"{path.stem}.overlay.jpg") as ov:
            assert ov.format == "JPEG" and ov.size == (image.shape[1], image.shape[0])
    # no temporary files left; the lock file stays on purpose (removing it would race with a run that opened it)
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".clipteacher-predict.lock"]


def test_same_size_images_share_a_student_run(bundle_dir, tmp_path, monkeypatch):
    write_images(tmp_path / "in", 3, size=(48, 64), prefix="a")
    write_images(tmp_path / "in", 2, seed=1, size=(40, 40), prefix="b")
    (tmp_path / "in" / "a9.jpg").write_text("not an image")
    runs = []
    real = Bundle.batch_features
    monkeypatch.setattr(Bundle, "batch_features", lambda self, images, size=None: runs.append(len(images))
                        or real(self, images, size))
    masks = {}
    for b in ("8", "1"):
        runs.clear()
        out = tmp_path / f"out{b}"
        assert run_cli(tmp_path / "in", "--names", NAMES, "--out", out, "--batch", b, bundle=bundle_dir) == 1
        masks[b] = {p.name: read_mask(p)[0] for p in out.glob("*.png")}
        assert sorted(runs) == ([2, 3] if b == "8" else [1] * 5)
        assert len(summary(out)) == 6
    assert masks["8"].keys() == masks["1"].keys() and len(masks["8"]) == 5
    for name, mask in masks["8"].items():
        assert (mask == masks["1"][name]).mean() > 0.99


def test_a_failing_batch_is_retried_image_by_image(bundle_dir, tmp_path, monkeypatch):
    write_images(tmp_path / "in", 3)
    real = Bundle.batch_features

    def one_at_a_time(self, images, size=None):
        if len(images) > 1:
            raise MemoryError
        return real(self, images, size)

    monkeypatch.setattr(Bundle, "batch_features", one_at_a_time)
    out = tmp_path / "out"
    assert run_cli(tmp_path / "in", "--names", NAMES, "--out", out, bundle=bundle_dir) == 0
    assert len(list(out.glob("*.png"))) == 3 and all("error" not in item for item in summary(out))


def test_skip_existing_does_no_work_and_keeps_one_line_per_image(bundle_dir, tmp_path, monkeypatch, capsys):
    write_images(tmp_path / "in", 3)
    (tmp_path / "in" / "bad.jpg").write_bytes(b"\x00" * 10)
    out = tmp_path / "out"
    assert run_cli(tmp_path / "in", "--names", NAMES, "--out", out, bundle=bundle_dir) == 1
    masks = {p.name: p.read_bytes() for p in out.glob("*.png")}
    first = summary(out)
    capsys.readouterr()

    def no_model(args):
        raise AssertionError("the model was loaded although every mask exists")

    monkeypatch.setattr(predict, "open_bundle", no_model)
    assert run_cli(tmp_path / "in", "--names", NAMES, "--out", out, "--skip-existing", bundle=bundle_dir) == 1
    assert "0 segmented, 3 skipped (mask exists), 1 failed" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == masks
    by_file = lambda items: sorted(items, key=lambda i: i["file"])  # noqa: E731
    assert by_file(summary(out)) == by_file(first)  # the bad file's error replaced, not repeated


def test_resume_after_a_kill_redoes_what_is_not_complete(bundle_dir, tmp_path):
    """A killed run leaves at worst a temporary file and a summary line whose mask was never renamed in."""
    paths = write_images(tmp_path / "in", 3)
    out = tmp_path / "out"
    assert run_cli(tmp_path / "in", "--names", NAMES, "--out", out, bundle=bundle_dir) == 0
    (out / "img1.png").unlink()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    partial = out / f".img1.png.{dead.stdout.strip()}.partial.png"
    partial.write_bytes(b"\x89PNG half")
    with open(out / "summary.jsonl", "a") as f:
        f.write('{"file": "half a li')
    assert run_cli(tmp_path / "in", "--names", NAMES, "--out", out, "--skip-existing", bundle=bundle_dir) == 0
    assert not partial.exists()
    assert sorted(i["file"] for i in summary(out)) == sorted(map(str, paths))
    read_mask(out / "img1.png")


def test_a_killed_process_never_leaves_a_half_mask(bundle_dir, tmp_path):
    write_images(tmp_path / "in", 40)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "clipteacher.cli.predict", str(tmp_path / "in"), "--names", NAMES, "--out", str(out),
           "--bundle", str(bundle_dir)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not list(out.glob("*.png")) and time.monotonic() < deadline:
        time.sleep(0.01)  # the kill lands while masks are being written (hidden temporary files count too)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for mask in out.glob("[!.]*.png"):  # every mask in place is complete
        read_mask(mask)[0].max()
    res = subprocess.run(cmd + ["--skip-existing"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert len(list(out.glob("[!.]*.png"))) == 40 and len(summary(out)) == 40
    assert not [p for p in out.iterdir() if p.name.startswith(".") and p.name != ".clipteacher-predict.lock"]


def test_atomic_write_leaves_nothing_when_the_writer_dies(tmp_path):
    def dies(tmp):
        tmp.write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        batch.atomic_write(tmp_path / "m.png", dies)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- inputs and names


def test_shared_stems_get_distinct_masks(bundle_dir, tmp_path, capsys):
    a = write_images(tmp_path / "a", 1, seed=1)[0]  # a/img0.jpg
    b = write_images(tmp_path / "b", 1, seed=2)[0]  # b/img0.jpg
    c = tmp_path / "a" / "IMG0.png"  # same stem up to case: clashes on macOS and Windows file systems
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(c)
    solo = write_images(tmp_path / "c", 2, seed=3)[1]  # c/img1.png, unique
    out = tmp_path / "out"
    assert run_cli(tmp_path / "a", tmp_path / "b", solo, "--names", NAMES, "--out", out, bundle=bundle_dir) == 0
    assert "share a stem" in capsys.readouterr().err
    masks = {i["file"]: i["mask"] for i in summary(out)}
    assert len(set(masks.values())) == 4 and masks[str(solo)] == "img1.png"
    for path in (a, b, c):
        assert masks[str(path)].startswith(path.stem + "-") and (out / masks[str(path)]).is_file()
    # stable: the same inputs get the same names again
    assert batch.output_stems([a, b, c, solo]) == [Path(masks[str(p)]).stem for p in (a, b, c, solo)]
    named_like_a_hash = tmp_path / "c" / f"{batch.output_stems([a, b])[0]}.jpg"
    named_like_a_hash.write_bytes(a.read_bytes())
    with pytest.raises(batch.InputError, match="rename one"):
        batch.output_stems([a, b, named_like_a_hash])


def test_patterns_and_folders(tmp_path):
    images = write_images(tmp_path / "in" / "sub", 2) + write_images(tmp_path / "in", 1)
    (tmp_path / "in" / ".hidden.jpg").write_bytes(b"x")
    os.mkfifo(tmp_path / "in" / "pipe.jpg")  # would block a reader forever
    found, _ = batch.collect_inputs([str(tmp_path / "in" / "**" / "*.jpg")], tmp_path / "out")
    assert sorted(found) == sorted(p for p in images if p.suffix == ".jpg")
    found, _ = batch.collect_inputs([str(tmp_path / "in"), str(images[-1])], tmp_path / "out")
    assert found == [images[-1]]  # a folder is not recursive; a file given twice is taken once
    (tmp_path / "empty").mkdir()
    with pytest.raises(batch.InputError, match="no image files"):
        batch.collect_inputs([str(tmp_path / "empty")], tmp_path / "out")
    with pytest.raises(batch.InputError, match="not a regular file"):
        batch.collect_inputs([str(tmp_path / "in" / "pipe.jpg")], tmp_path / "out")


def test_outputs_are_never_inputs(bundle_dir, tmp_path, capsys):
    write_images(tmp_path / "in", 2)
    out = tmp_path / "in" / "masks"
    for _ in range(2):
        assert run_cli(tmp_path / "in" / "**" / "*.[pj][np]g", "--names", NAMES, "--out", out, "--overlay",
                       bundle=bundle_dir) == 0
    captured = capsys.readouterr()
    assert "2 segmented" in captured.out.splitlines()[-1] and "4 file(s) in the output folder" in captured.err
    assert len(summary(out)) == 2
    assert run_cli(tmp_path / "in", "--names", NAMES, "--out", tmp_path / "in", bundle=bundle_dir) == 2
    assert "both an input folder and --out" in capsys.readouterr().err


def test_names_file_templates_and_gamma(bundle_dir, tmp_path):
    (image,) = write_images(tmp_path / "in", 1)
    (tmp_path / "names.txt").write_text("sky\ngrass\nsky\ncow\n", encoding="utf-8")
    out = tmp_path / "out"
    assert run_cli(image, "--names-file", tmp_path / "names.txt", "--out", out, "--templates", "a photo of a {}.",
                   "--templates", "{}", "--gamma", "-2", bundle=bundle_dir) == 0
    assert read_mask(out / "img0.png")[1] == ["sky", "grass", "cow"]


def test_odd_file_names_stay_one_line(bundle_dir, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    bad = folder / "line\nbreak \u202e.jpg"
    bad.write_text("not an image")
    assert run_cli(folder, "--names", NAMES, "--out", tmp_path / "out", bundle=bundle_dir) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(errors) == 1 and errors[0].startswith("error:") and "\\n" in errors[0]
    assert summary(tmp_path / "out")[0]["file"] == str(bad)  # JSON keeps the real name


@pytest.mark.parametrize("args, message", [
    (["{in}", "--out", "{out}"], "one of the arguments --names --names-file is required"),
    (["{in}/missing.jpg", "--names", "a", "--out", "{out}"], "no such file or folder"),
    (["{in}/*.webp", "--names", "a", "--out", "{out}"], "no file matches"),
    (["{in}", "--names", " , ,", "--out", "{out}"], "at least one class name"),
    (["{in}", "--names", "a", "--out", "{out}", "--gamma", "nan"], "finite number"),
    (["{in}", "--names", "a", "--out", "{out}", "--templates", "photo of {{0.__class__}}"], "template"),
    (["{in}", "--names-file", "{in}/none.txt", "--out", "{out}"], "No such file"),
    (["{in}", "--names", "a", "--out", "{in}/img0.jpg"], "--out"),
    (["{in}", "--names", "a", "--out", "{out}", "--bundle", "{in}"], "not a bundle folder"),
    (["{in}", "--names", "a", "--out", "{out}", "--precision", "int8", "--bundle", "{bundle}"], "precision 'int8'"),
    (["{in}", "--names", "a", "--out", "{out}", "--precision", "fp64"], "invalid choice"),
    (["{in}", "--names", "a", "--out", "{out}", "--batch", "0"], "--batch"),
])
def test_bad_arguments_are_one_line(bundle_dir, tmp_path, capsys, args, message):
    write_images(tmp_path / "in", 1)
    values = {"in": tmp_path / "in", "out": tmp_path / "out", "bundle": bundle_dir}
    try:
        code = predict.main([a.format(**values) for a in args])  # test-owned format strings, not user text
    except SystemExit as exit_:  # argparse
        code = exit_.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "summary.jsonl").exists()


def test_cuda_request_without_a_usable_gpu_is_one_line(bundle_dir, tmp_path, capsys):
    bundle = Bundle(bundle_dir, verbose=False)
    if bundle.provider == "CUDAExecutionProvider":
        pytest.skip("this machine has a usable GPU")
    write_images(tmp_path / "in", 1)
    code = run_cli(tmp_path / "in", "--names", "a", "--out", tmp_path / "out", "--device", "cuda", bundle=bundle_dir)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "CUDA" in err[0]


def test_predict_process_never_imports_torch(bundle_dir, tmp_path):
    write_images(tmp_path / "in", 2)
    code = f"""
import sys
from clipteacher.cli.predict import main
code = main([{str(tmp_path / 'in')!r}, "--names", "sky, cow", "--out", {str(tmp_path / 'out')!r},
             "--overlay", "--bundle", {str(bundle_dir)!r}])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "timm", "open_clip", "transformers"))
assert code == 0 and not bad, (code, bad)
print("torch-free")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "torch-free"


def test_hubness_correction_by_hand(bundle_dir):
    """Bundle.hubness_bias is -strength x logit_scale x (name . reference mean), and segmentation applies it by
    the bundle's default: a name aligned with the mean of training features (a hub) is pushed down."""
    bundle = Bundle(bundle_dir, verbose=False)
    d = bundle.embed_dim
    mean = np.zeros(d, np.float32)
    mean[0] = 0.5
    bundle.meta["hubness"] = {"mean": mean.tolist(), "strength": 2.0, "default": False}
    text = np.eye(d, dtype=np.float32)[:3]  # names along axes 0, 1, 2
    assert np.allclose(bundle.hubness_bias(text), 0.0)  # off by the bundle's default
    assert np.allclose(bundle.hubness_bias(text, on=True), [-2.0 * bundle.logit_scale * 0.5, 0.0, 0.0])
    bundle.meta["hubness"]["default"] = True
    assert np.allclose(bundle.hubness_bias(text), [-bundle.logit_scale, 0.0, 0.0])
    del bundle.meta["hubness"]
    with pytest.raises(ValueError, match="no hubness reference"):
        bundle.hubness_bias(text, on=True)


def test_exported_bundles_serve_the_hubness_correction_by_default(bundle_dir):
    """Chosen on train/val/probe (docs/RESULTS.md): the correction is on in every bundle exported from now on."""
    meta = json.loads((bundle_dir / "bundle.json").read_text())
    assert meta.get("hubness") is None or meta["hubness"]["default"] is True


@pytest.mark.parametrize("choice", [False, True, None])
def test_a_model_carries_its_own_hubness_default_into_its_bundles(bundle_dir, tmp_path, choice):
    """default_model --hubness off stores the choice in the model folder; every bundle exported from it serves
    that default (None: the model has no choice, the global default applies)."""
    import torch

    from clipteacher.checkpoint import load_checkpoint, save_model_folder
    from clipteacher.export.bundle import export_bundle
    from clipteacher.runtime.bundle import HUBNESS_DEFAULT

    ckpt = load_checkpoint(bundle_dir.parent / "app_ckpt.pt")
    ckpt["feature_mean"] = torch.nn.functional.normalize(torch.randn(ckpt["embed_dim"]), dim=0)
    ckpt["feature_mean_reference"] = "a test vector"
    if choice is not None:
        ckpt["hubness_default"] = choice
    save_model_folder(ckpt, tmp_path / "model")
    export_bundle(tmp_path / "model", tmp_path / "bundle", log=lambda *_: None)
    served = json.loads((tmp_path / "bundle" / "bundle.json").read_text())["hubness"]
    assert served["default"] is (HUBNESS_DEFAULT if choice is None else choice)
    assert served["reference"] == "a test vector"


@pytest.fixture(scope="module")
def hub_bundle(bundle_dir, tmp_path_factory):
    """The tiny bundle with a hubness reference that makes "sky" a hub (the reference mean is sky's own
    embedding) and a stored default of off."""
    from clipteacher.checkpoint import load_checkpoint, save_model_folder
    from clipteacher.export.bundle import export_bundle

    tmp = tmp_path_factory.mktemp("hub")
    ckpt = load_checkpoint(bundle_dir.parent / "app_ckpt.pt")
    ckpt["feature_mean"] = ckpt["text_cache"]["sky"].float()
    ckpt["feature_mean_reference"] = "sky's embedding"
    ckpt["hubness_default"] = False
    save_model_folder(ckpt, tmp / "model")
    export_bundle(tmp / "model", tmp / "bundle", log=lambda *_: None)
    return tmp / "bundle"


def test_predict_and_the_app_serve_the_hubness_correction_they_are_told(hub_bundle, bundle_dir, tmp_path, capsys):
    """--hubness on|off overrides the bundle's stored default in clipteacher-predict and in the app's Service."""
    names = ["sky", "grass", "cow"]
    paths = write_images(tmp_path / "in", 2, seed=3)
    bundle = Bundle(hub_bundle, verbose=False)
    assert not bundle.meta["hubness"]["default"]
    want = {}
    for on in (True, False):
        want[on] = [bundle.label_features(bundle.image_features(svc.load_image(p)[0]), names, (48, 64), None, None, on)[0]
                    for p in paths]
    assert any(not np.array_equal(a, b) for a, b in zip(want[True], want[False]))  # the correction matters here
    for choice, on in [("on", True), ("off", False), (None, False)]:
        out = tmp_path / f"out_{choice}"
        assert run_cli(*paths, "--names", ", ".join(names), "--out", out,
                       *(["--hubness", choice] if choice else []), bundle=hub_bundle) == 0
        for p, labels in zip(paths, want[on]):
            np.testing.assert_array_equal(np.asarray(Image.open(out / f"{p.stem}.png")), labels)
        service = svc.Service(bundle, hubness=None if choice is None else on)
        for p, labels in zip(paths, want[on]):
            np.testing.assert_array_equal(service.segment(svc.load_image(p)[0], ", ".join(names)).labels, labels)
        assert service.info()["hubness"] is on
    # the Ray Data actor's class (a plain class: no Ray needed to call it) passes the choice on too
    from clipteacher.serve.ray_data import Predictor

    actor = Predictor(str(hub_bundle), "fp32", names, None, None, False, 1, hubness=True)
    rows = actor({"path": np.array([str(p) for p in paths], dtype=object), "stem": np.array(["a", "b"], dtype=object)})
    for mask, labels in zip(rows["mask"], want[True]):
        np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(mask))), labels)

    import shutil

    plain = tmp_path / "plain"  # a bundle exported without a reference (hubness: null): asking for it is one line
    shutil.copytree(hub_bundle, plain)
    meta = json.loads((plain / "bundle.json").read_text())
    meta["hubness"] = None
    (plain / "bundle.json").write_text(json.dumps(meta))
    assert svc.Service(Bundle(plain, verbose=False)).info()["hubness"] is False
    capsys.readouterr()
    assert run_cli(paths[0], "--names", "sky", "--out", tmp_path / "x", "--hubness", "on", bundle=plain) == 2
    err = capsys.readouterr().err
    assert "no hubness reference" in err and err.count("\n") == 1
    assert run_cli(paths[0], "--names", "sky", "--out", tmp_path / "y", "--hubness", "off", bundle=plain) == 0
    with pytest.raises(ValueError, match="no hubness reference"):
        svc.Service(Bundle(plain, verbose=False), hubness=True)

"""Gradio app: service functions, every bad input, image-pass cache, GLM attention, pseudo labels,
the startup path, a gradio_client round trip and a torch-free app process."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from clipteacher.app import service as svc
from clipteacher.app import ui
from clipteacher.app.ui import Handlers, guarded
from clipteacher.cli import app as app_run
from clipteacher.runtime import resolve as resolver
from clipteacher.pseudo import regions_for_image, vis as pseudo_vis
from clipteacher.runtime import Bundle
from clipteacher.config import PLMConfig
from helpers import APP_CLASSES, APP_SEEN, ROOT, TINY_CLIP, free_port, inline_bytes, smoke_helpers, start_app

@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Image files of every kind the UI may receive."""
    d = tmp_path_factory.mktemp("files")
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(rgb[..., 0]).save(d / "grey.png")
    Image.fromarray(np.dstack([rgb, np.full((60, 80), 128, np.uint8)])).save(d / "rgba.png")
    Image.fromarray((rng.integers(0, 65536, (60, 80))).astype(np.uint16)).save(d / "grey16.png")
    Image.fromarray(rgb).resize((8000, 8000), Image.NEAREST).save(d / "huge.jpg", quality=60)
    (d / "notes.txt").write_text("this is not an image\n")
    (d / "truncated.png").write_bytes((d / "rgb.png").read_bytes()[:200])
    Image.fromarray(rgb[:, :5]).save(d / "strip.png")
    label = np.zeros((60, 80), np.uint8)
    label[20:50, 30:70] = 255
    Image.fromarray(label).save(d / "label.png")
    Image.fromarray(label[:40]).save(d / "label_small.png")
    Image.fromarray(rgb).save(d / "label_rgb.png")
    return d


# ---------------------------------------------------------------------------- inputs


@pytest.mark.parametrize("name", ["rgb.png", "grey.png", "rgba.png", "grey16.png"])
def test_load_image_converts_every_mode(files, name):
    image, notes = svc.load_image(files / name)
    assert image.shape == (60, 80, 3) and image.dtype == np.uint8 and notes == []
    if name == "grey16.png":  # 16-bit is rescaled to 8 bits, not clipped to white
        assert 0 < image.mean() < 255 and image.std() > 30


def test_huge_image_is_downscaled_with_a_notice(files):
    image, notes = svc.load_image(files / "huge.jpg")
    assert image.shape == (svc.MAX_SIDE, svc.MAX_SIDE, 3)
    assert len(notes) == 1 and "8000 x 8000" in notes[0] and "downscaled" in notes[0]
    code = f"""
import resource
from clipteacher.app.service import load_image
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
load_image({str(files / "huge.jpg")!r})
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert float(res.stdout.strip()) < 100  # MB: the 192 MB full-size decode never happens (JPEG draft mode)


@pytest.mark.parametrize("name, message", [
    ("notes.txt", "not an image"), ("truncated.png", "could not be decoded"), ("strip.png", "at least 16"),
    ("missing.png", "gone"), (None, "Upload an image"),
])
def test_bad_image_files(files, name, message):
    with pytest.raises(svc.UserError, match=message):
        svc.load_image(None if name is None else files / name)


def test_parse_names():
    assert svc.parse_names(" cow,grass \n\n sky ,, ") == (["cow", "grass", "sky"], [])
    names, notes = svc.parse_names("cow, Cow, grass, cow")
    assert names == ["cow", "grass"] and "Duplicate" in notes[0] and "cow" in notes[0].lower()
    names, notes = svc.parse_names("x" * 500 + ", cow")
    assert names == ["x" * svc.MAX_NAME_CHARS, "cow"] and "shortened" in notes[0]
    assert len(svc.parse_names(", ".join(f"class {i}" for i in range(200)))[0]) == 200
    for text in ["", "   ", " , \n ,", None]:
        with pytest.raises(svc.UserError, match="at least one class name"):
            svc.parse_names(text)
    with pytest.raises(svc.UserError, match="at most 255"):
        svc.parse_names(", ".join(f"c{i}" for i in range(300)))


def test_parse_templates_and_windows():
    assert svc.parse_templates("") is None and svc.parse_templates(" \n ") is None
    assert svc.parse_templates("a photo of a {}.\n\n{}\n{}") == ("a photo of a {}.", "{}")
    with pytest.raises(svc.UserError, match="exactly one '{}'"):
        svc.parse_templates("a photo of a cow")
    assert svc.parse_windows("3, 7") == (3, 7) and svc.parse_windows("2 2 5") == (2, 5)
    for bad in ["", "three", "0", "3, 7, 9, 11, 13", "99"]:
        with pytest.raises(svc.UserError, match="[Ww]indow"):
            svc.parse_windows(bad)


@pytest.mark.parametrize("template", ["{0:,>100000000}{{}}", "a photo of a {{}}", "{x} {}", "%s {} {}", "{0} {}"])
def test_format_string_templates_are_refused_in_one_line(template):
    """Templates used to go through str.format: the first asked for 10^8 characters, the second dropped the name."""
    with pytest.raises(svc.UserError) as err:
        svc.parse_templates(f"a photo of a {{}}.\n{template}")
    assert "\n" not in str(err.value) and "exactly one '{}'" in str(err.value)


def test_oversized_name_and_template_text_is_refused_before_parsing():
    with pytest.raises(svc.UserError, match="characters long"):
        svc.parse_names("cow, " * 100_000)
    with pytest.raises(svc.UserError, match="characters long"):
        svc.parse_templates("{}\n" * 100_000)


def test_invisible_characters_do_not_make_classes():
    names, _ = svc.parse_names("\u200b\u200b, cow\x00, \u200dgrass\ufeff, \x00")
    assert names == ["cow", "grass"]
    with pytest.raises(svc.UserError, match="at least one class name"):
        svc.parse_names("\u200b, \u2060\u200c, \x00")


def test_unseen_bias_ignores_case(service):
    """'Cow' is the training class 'cow': it must not get the unseen bias."""
    bias = service.bundle.unseen_bias(["Cow", "cow", " SKY ", "zebra"], gamma=2.0)
    assert bias.tolist() == [0.0, 0.0, 0.0, 2.0]


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways with an orientation tag is segmented as the user sees it."""
    stored = np.zeros((60, 80, 3), np.uint8)
    stored[:, :10] = 255  # white band on the stored left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    image, _ = svc.load_image(tmp_path / "phone.jpg")
    assert image.shape == (80, 60, 3)  # upright: taller than wide
    assert image[:10].mean() > 200 and image[-10:].mean() < 50  # the band is now on top
    assert svc.image_size(tmp_path / "phone.jpg") == (80, 60)
    Image.fromarray(np.full((80, 60), 255, np.uint8)).save(tmp_path / "upright_label.png")
    assert svc.load_label(tmp_path / "upright_label.png", (80, 60), (80, 60)).shape == (80, 60)


def test_huge_label_png_is_one_line(tmp_path):
    Image.new("L", (20000, 20000)).save(tmp_path / "bomb.png")  # compresses to a few hundred KB
    with pytest.raises(svc.UserError, match="too large"):
        svc.load_label(tmp_path / "bomb.png", (60, 80), (60, 80))


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), (1.5, 1.5), ("2", 2.0), (-1, -1.0)])
def test_gamma_values(value, expected):
    assert svc.parse_gamma(value) == expected


@pytest.mark.parametrize("value", ["abc", "nan", float("inf"), [1], {"a": 1}])
def test_bad_gamma_is_one_line(value):
    with pytest.raises(svc.UserError, match="gamma must be"):
        svc.parse_gamma(value)


def test_info_names_no_server_paths(service):
    info = service.info()
    assert "/" not in info["bundle"] and "/" not in info["checkpoint"]


# ---------------------------------------------------------------------------- model functions


def test_segment_and_vocabulary_change_reuses_the_image_pass(service, files):
    image, _ = svc.load_image(files / "rgb.png")
    before = service.passes["student"]
    seg = service.segment(image, "sky, grass, cow, zebra")
    assert seg.labels.shape == (60, 80) and seg.labels.max() < 4 and not seg.cached
    assert abs(sum(seg.shares.values()) - 1) < 1e-6 and set(seg.shares) <= set(seg.names)
    assert list(seg.shares.values()) == sorted(seg.shares.values(), reverse=True)
    expected = service.bundle.segment(image, ["sky", "grass", "cow", "zebra"])
    np.testing.assert_array_equal(seg.labels, expected)
    for names, gamma, templates in [("cat, dog", None, None), ("sky, grass", 0.0, "a photo of a {}."),
                                    ("zebra", 4.0, "{}\nitap of a {}")]:
        again = service.segment(image.copy(), names, templates, gamma)  # same content, new array
        assert again.cached and again.labels.shape == (60, 80)
    assert service.passes["student"] == before + 1
    service.segment(image[::-1].copy(), "sky")  # another image does run
    assert service.passes["student"] == before + 2


def test_the_cache_keeps_cache_images_per_graph(bundle_dir, files):
    """Each graph keeps the outputs of its last `cache_images` images: with only student passes the cache held twice
    as many (the bound was on all entries), and the vocabulary head's features are 10 MB an image."""
    service = svc.Service(Bundle(bundle_dir, verbose=False), cache_images=2)
    image, _ = svc.load_image(files / "rgb.png")
    images = [np.roll(image, 7 * k, axis=1) for k in range(4)]
    for picture in images:
        service.features(picture)
    assert service.passes["student"] == 4
    service.teacher_tokens(images[0])
    assert service.features(images[3])[1] and service.features(images[2])[1]  # the last two: cached
    assert not service.features(images[1])[1] and not service.features(images[0])[1]  # the first two: gone
    assert service.teacher_tokens(images[0])[1]  # student entries never push out the teacher's


def test_gamma_moves_pixels_to_unseen_names(service, files):
    image, _ = svc.load_image(files / "rgb.png")
    low = service.segment(image, "sky, grass, zebra", gamma=-svc.MAX_GAMMA)
    high = service.segment(image, "sky, grass, zebra", gamma=svc.MAX_GAMMA)
    assert "zebra" not in low.shares and high.shares == {"zebra": 1.0}


def test_glm_attention_matches_training(service, files):
    from clipteacher.config import GLMConfig
    from clipteacher.train.glm import GlobalLearningModule

    image, _ = svc.load_image(files / "rgb.png")
    att = service.attention(image, "sky, cow")
    feats, _ = service.features(image)
    (cls, _), _ = service.teacher_tokens(image)
    ref = GlobalLearningModule(GLMConfig(), feats.shape[1]).attention(torch.from_numpy(cls)[None] * 3.0,
                                                                       torch.from_numpy(feats))[0].numpy()
    np.testing.assert_allclose(att.weights, ref, rtol=1e-4, atol=1e-7)
    assert att.weights.shape == feats.shape[2:] and abs(att.weights.sum() - 1) < 1e-5
    assert att.similarity.shape == (2,) + feats.shape[2:] and np.abs(att.similarity).max() <= 1 + 1e-5
    assert service.attention(image, "").similarity.shape[0] == 0  # names are optional here


@pytest.mark.parametrize("scaled", [False, True])
def test_glm_attention_twin_follows_glm_scaled(service, files, scaled):
    """The numpy view and the training module agree with and without glm.scaled (the bundle records it)."""
    from clipteacher.config import GLMConfig
    from clipteacher.train.glm import GlobalLearningModule

    image, _ = svc.load_image(files / "rgb.png")
    feats, _ = service.features(image)
    (cls, _), _ = service.teacher_tokens(image)
    ref = GlobalLearningModule(GLMConfig(scaled=scaled), feats.shape[1]).attention(
        torch.from_numpy(cls)[None], torch.from_numpy(feats))[0].numpy()
    np.testing.assert_allclose(svc.glm_attention(cls, feats[0], scaled), ref, rtol=1e-4, atol=1e-7)
    assert service.bundle.meta["glm"] == {"scaled": False}  # the tiny bundle's config


def test_segment_tab_lists_the_example_images(service):
    """The Examples block exists and names the shipped pictures (they once vanished behind a wrong path)."""
    demo = ui.build_demo(service)
    block = demo.examples_block
    assert block is not None
    files = sorted(Path(row[0]).name for row in block.examples)
    assert files == ["farm.jpg", "garden.jpg", "lake.jpg", "street.jpg"]
    assert all(Path(row[0]).is_file() for row in block.examples)


def test_the_queue_does_not_summarise_every_request_in_pandas(service, monkeypatch):
    """Gradio rebuilt a pandas table of up to 10,000 past events after every request, for a monitoring dashboard
    the app never enables (CPU per request that grew with uptime); the app's queue does not."""
    monkeypatch.delenv("GRADIO_ANALYTICS_CACHE_FREQUENCY", raising=False)
    monkeypatch.delenv("GRADIO_ANALYTICS_MAX_EVENTS", raising=False)
    queue = ui.build_demo(service)._queue
    built = []
    monkeypatch.setattr(type(queue), "_get_df", staticmethod(lambda records: built.append(len(records))))
    records = [{"function": "segment", "status": "success", "process_time": 0.1}]
    for _ in range(50):
        queue.events_recorded += 1
        queue.compute_analytics_summary(records)
    assert built == [] and queue.ANALYTICS_MAX_EVENTS <= 100


def test_pseudo_labels_are_the_training_functions(service, files):
    image, _ = svc.load_image(files / "rgb.png")
    label = svc.load_label(files / "label.png", (60, 80), (60, 80))
    res = service.pseudo_labels(image, label, (2, 3), 0.8, "centroid")
    (_, dense), _ = service.teacher_tokens(image)
    maps, fused = regions_for_image(dense.transpose(1, 2, 0), label, **PLMConfig(windows=(2, 3)).region_kwargs())
    np.testing.assert_array_equal(res.fused, fused)
    for a, b in zip(res.maps, maps):
        np.testing.assert_array_equal(a, b)
    assert (res.fused[:2] == -1).all()  # rows 0-1 of the 8 x 8 grid have no ignored pixels: not clustered
    free = service.pseudo_labels(image, None, (2,), 0.9, "overlap")
    assert (free.maps[0] >= 0).all()  # without a label every token is clustered
    assert "nothing was clustered" in service.pseudo_labels(image, np.zeros((60, 80), np.uint8), (2,)).notes[0]
    with pytest.raises(svc.UserError, match="larger than the teacher"):
        service.pseudo_labels(image, None, (9,))


def test_wrong_label_files(files):
    with pytest.raises(svc.UserError, match="40 pixels but the image is 80 x 60"):
        svc.load_label(files / "label_small.png", (60, 80), (60, 80))
    with pytest.raises(svc.UserError, match="single-channel"):
        svc.load_label(files / "label_rgb.png", (60, 80), (60, 80))
    with pytest.raises(svc.UserError, match="cannot be read"):
        svc.load_label(files / "notes.txt", (60, 80), (60, 80))
    small = svc.load_label(files / "label.png", (60, 80), (30, 40))  # image was downscaled: label follows
    assert small.shape == (30, 40) and set(np.unique(small)) == {0, 255}


def test_mask_png_round_trip(service, files, tmp_path):
    image, _ = svc.load_image(files / "rgb.png")
    seg = service.segment(image, "sky, grass, cow")
    path = svc.mask_png(seg.labels, seg.names, seg.colors, tmp_path / "mask.png")
    with Image.open(path) as im:
        assert im.mode == "P" and json.loads(im.info["classes"]) == seg.names
        np.testing.assert_array_equal(np.asarray(im), seg.labels)
        assert im.getpalette()[:9] == seg.colors.ravel().tolist()
    assert seg.colors.tolist() == pseudo_vis.region_palette(3).tolist()


# ---------------------------------------------------------------------------- UI handlers


@pytest.fixture(scope="module")
def handlers(service):
    return Handlers(service)


def test_handlers_outputs(handlers, files):
    folders = set(handlers.mask_dir.iterdir())
    overlay, legend, shares, mask, status = guarded(handlers.segment)(str(files / "rgb.png"), "sky, grass, zebra",
                                                                       "", 1.0)
    assert set(handlers.mask_dir.iterdir()) == folders  # nothing written: both files travel in the response
    assert overlay.name == "rgb_overlay.jpg"  # sent inside the response (inline_image), named for a download
    with Image.open(io.BytesIO(overlay.data)) as im:  # one picture: the labels' colours over the image
        assert im.format == "JPEG" and im.size == (80, 60)
    assert legend.count('class="swatch"') == len(shares) and all(f"{n} " in legend for n in shares)
    assert mask.name == "rgb_mask.png" and mask.mime == "image/png"
    with Image.open(io.BytesIO(mask.data)) as im:
        assert im.mode == "P" and im.size == (80, 60) and json.loads(im.info["classes"]) == ["sky", "grass", "zebra"]
    assert " s**" in status and "zebra" in status  # request time; the unseen name is listed
    heat, gallery, status = guarded(handlers.attention)(str(files / "rgb.png"), "sky, grass", "")
    assert heat.shape == (60, 80, 3) and [c for _, c in gallery][0].startswith("sky: max cos ")
    gallery, regions, status = guarded(handlers.pseudo_labels)(str(files / "rgb.png"), str(files / "label.png"),
                                                               "2, 3", 0.8, "centroid")
    captions = [c for _, c in gallery]
    assert captions[0].startswith("k = 2: ") and captions[1].startswith("k = 3: ") and captions[2].startswith("fused")
    assert len(gallery) == 4 and "restricted" in status and 0 < sum(regions.values()) <= 1
    assert guarded(handlers.info)()["vocabulary"] == APP_SEEN


def test_every_bad_input_gives_a_clear_message(handlers, files, monkeypatch):
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: warnings.append(message))
    seg, plm = guarded(handlers.segment), guarded(handlers.pseudo_labels)
    errors = [
        (lambda: seg(str(files / "notes.txt"), "cow", "", 1.5), "not an image"),
        (lambda: seg(None, "cow", "", 1.5), "Upload an image"),
        (lambda: seg(str(files / "rgb.png"), "  \n , ", "", 1.5), "at least one class name"),
        (lambda: seg(str(files / "rgb.png"), "cow", "no placeholder", 1.5), "exactly one '{}'"),
        (lambda: plm(str(files / "rgb.png"), str(files / "label_small.png"), "3", 0.8, "centroid"), "80 x 60"),
        (lambda: plm(str(files / "rgb.png"), None, "3, x", 0.8, "centroid"), "whole numbers"),
    ]
    for call, message in errors:
        with pytest.raises(gr.Error) as err:
            call()
        assert message in err.value.message and "Traceback" not in err.value.message
    for name in ["grey.png", "rgba.png", "grey16.png", "huge.jpg"]:
        seg(str(files / name), "cow, grass", "", 1.5)
    seg(str(files / "rgb.png"), "cow, cow, " + "x" * 500 + ", " + ", ".join(f"n{i}" for i in range(200)), "", 1.5)
    assert any("downscaled" in w for w in warnings) and any("Duplicate" in w for w in warnings)
    assert any("shortened" in w for w in warnings)


def test_legend_escapes_names(service, files):
    image, _ = svc.load_image(files / "rgb.png")
    seg = service.segment(image, "<img src=x onerror=alert(1)>")  # the only class: present
    legend = svc.legend_html(seg.names, seg.colors, seg.shares)
    assert "<img" not in legend and "&lt;img src=x onerror=alert(1)&gt; 100%" in legend


def test_result_folders_of_dead_processes_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{ui.FOLDER_PREFIX}{int(dead.stdout)}_abc"
    live = tmp_path / f"{ui.FOLDER_PREFIX}{os.getpid()}_abc"
    for folder in (stale, live):
        (folder / "x").mkdir(parents=True)
    assert ui.remove_stale_folders() == [stale]
    assert not stale.exists() and live.exists()


def test_busy_beyond_the_queue_and_concurrent_answers_stay_apart(bundle_dir, files):
    """With 1 request computing and 1 waiting, a third is refused at once (HTTP 503: the browser says "busy,
    try again"); the admitted ones finish with their own answers once the first is let go."""
    import threading

    gate, entered = threading.Event(), threading.Event()
    service = svc.Service(Bundle(bundle_dir, verbose=False))
    image_features = service.bundle.image_features

    def held(image, size=None):
        entered.set()
        gate.wait(60)
        return image_features(image, size)

    service.bundle.image_features = held
    demo = ui.build_demo(service, ui.Serving(concurrency=1, queue=1))
    port = free_port()
    ui.launch(demo, "127.0.0.1", port, prevent_thread_lock=True)
    base = f"http://127.0.0.1:{port}/gradio_api"
    try:
        with httpx.Client(timeout=60) as http:
            path = http.post(f"{base}/upload", files={"files": ("rgb.png", (files / "rgb.png").read_bytes())}).json()[0]
            image = {"path": path, "meta": {"_type": "gradio.FileData"}}

            def call(names: str):
                return http.post(f"{base}/call/segment", json={"data": [image, names, "", None]})

            first = call("sky, grass")
            assert entered.wait(30)  # the first request is computing
            second = call("cow, zebra")  # waits
            third = call("sky")  # one too many
            assert first.status_code == second.status_code == 200
            assert third.status_code == 503 and "Queue is full" in third.text
            gate.set()
            for reply, names in ((first, ["sky", "grass"]), (second, ["cow", "zebra"])):
                stream = http.get(f"{base}/call/segment/{reply.json()['event_id']}").text
                data = json.loads(stream.split("event: complete\ndata: ")[1].splitlines()[0])
                with Image.open(io.BytesIO(inline_bytes(data[3]))) as im:
                    assert json.loads(im.info["classes"]) == names
    finally:
        gate.set()
        demo.close()


def test_unexpected_errors_are_one_line(handlers, files, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("onnxruntime blew up\nwith a long\ntraceback")

    monkeypatch.setattr(handlers.service.bundle, "classify", boom)
    with pytest.raises(gr.Error) as err:
        guarded(handlers.segment)(str(files / "rgb.png"), "cow", "", 1.5)
    assert err.value.message == "Internal error (RuntimeError); the server log has the details."


# ---------------------------------------------------------------------------- startup, API, torch-free


def test_startup_messages(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("CLIPTEACHER_BUNDLE", raising=False)
    assert app_run.main(["--bundle", str(tmp_path / "nope")]) == 2
    assert "not a bundle folder" in capsys.readouterr().err
    monkeypatch.setattr(resolver, "DEFAULT_BUNDLE", tmp_path / "bundles" / "default")
    monkeypatch.setattr(resolver, "DEFAULT_CHECKPOINT", tmp_path / "missing")
    assert app_run.main([]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no default checkpoint" in err[0] and "--bundle" in err[0]


def test_default_bundle_is_built_once_from_the_checkpoint(bundle_dir, tmp_path):
    out = resolver.build_default_bundle(bundle_dir.parent / "app_ckpt.pt", tmp_path / "bundles" / "default")
    assert (out / "bundle.json").is_file()
    assert Bundle(out, verbose=False).vocabulary == APP_SEEN
    with pytest.raises(resolver.StartupError, match="already exists"):  # export/run.py's one line is passed on
        resolver.build_default_bundle(bundle_dir.parent / "app_ckpt.pt", out)


def test_default_bundle_is_rebuilt_when_the_default_model_changes(bundle_dir, tmp_path, monkeypatch, capsys):
    from clipteacher.checkpoint import load_checkpoint, save_model_folder
    from clipteacher.export.bundle import write_untrained_checkpoint
    from clipteacher.config import Config

    model = tmp_path / "default"  # the default model is a model folder, as shipped (assets/default)
    save_model_folder(load_checkpoint(bundle_dir.parent / "app_ckpt.pt"), model)
    monkeypatch.setattr(resolver, "DEFAULT_BUNDLE", tmp_path / "bundles" / "default")
    monkeypatch.setattr(resolver, "DEFAULT_CHECKPOINT", model)
    first = resolver.resolve_bundle(None)
    assert Bundle(first, verbose=False).vocabulary == APP_SEEN
    assert resolver.resolve_bundle(None) == first and "not the one" not in capsys.readouterr().out  # unchanged: kept
    cfg = Config()  # a new default model with another vocabulary, as after a pull
    cfg.teacher.kind, cfg.teacher.clip_config, cfg.teacher.input_size = "clip", TINY_CLIP, 64
    cfg.student.pretrained, cfg.student.head_dim, cfg.data.eval_size = False, 32, 64
    write_untrained_checkpoint(cfg, APP_CLASSES, ["sky", "tree"], tmp_path / "new.pt")
    save_model_folder(load_checkpoint(tmp_path / "new.pt"), model, replace=True)
    again = resolver.resolve_bundle(None)
    assert again == first and "not the one" in capsys.readouterr().out
    assert Bundle(again, verbose=False).vocabulary == ["sky", "tree"]
    assert sorted(p.name for p in (tmp_path / "bundles").iterdir()) == ["default"]


def test_app_process_does_not_import_torch(bundle_dir, files):
    code = f"""
import sys
from clipteacher.runtime.resolve import resolve_bundle
from clipteacher.app.service import Service
from clipteacher.app.ui import Handlers, build_demo, guarded
from clipteacher.runtime import Bundle
service = Service(Bundle(resolve_bundle({str(bundle_dir)!r}), verbose=False))
build_demo(service)
h = Handlers(service)
guarded(h.segment)({str(files / "rgb.png")!r}, "cow, zebra", "", 1.5)
guarded(h.attention)({str(files / "rgb.png")!r}, "cow", "")
guarded(h.pseudo_labels)({str(files / "rgb.png")!r}, {str(files / "label.png")!r}, "2, 3", 0.8, "centroid")
bad = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not bad, bad
print("torch-free")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().splitlines()[-1] == "torch-free"


def test_gradio_client_segments_through_the_api(bundle_dir, files, tmp_path):
    from gradio_client import Client, handle_file

    port = free_port()
    temp = tmp_path / "temp"
    temp.mkdir()
    proc = start_app(bundle_dir, port, tmp_path / "app.log", "--max-upload-mb", "2", env={"TMPDIR": str(temp)})
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        overlay, legend, shares, mask, status = client.predict(handle_file(str(files / "rgb.png")),
                                                               "sky, grass, zebra", "", 1.5, api_name="/segment")
        assert mask["orig_name"] == "rgb_mask.png"
        with Image.open(io.BytesIO(inline_bytes(mask))) as im:
            labels = np.asarray(im)
            assert labels.shape == (60, 80) and json.loads(im.info["classes"]) == ["sky", "grass", "zebra"]
        assert {c["label"] for c in shares["confidences"]} == {["sky", "grass", "zebra"][i] for i in np.unique(labels)}
        assert overlay["url"].startswith("data:image/jpeg;base64,")  # inside the reply: nothing more to fetch
        with Image.open(io.BytesIO(inline_bytes(overlay))) as im:
            assert im.size == (80, 60)
        assert legend.count('class="swatch"') == len(shares["confidences"])
        # docker/smoke.sh's own check of a running container (it read file paths and broke when the outputs moved
        # inside the response)
        assert smoke_helpers.api(f"http://127.0.0.1:{port}/", str(files / "rgb.png"), "sky, grass, zebra").startswith(
            "provider=CPUExecutionProvider mask=80x60")
        # gamma as null means the bundle's default; text is refused in one line (Gradio's own slider check
        # answered both with an unexplained error)
        default = client.predict(handle_file(str(files / "rgb.png")), "sky, grass, zebra", "", None, api_name="/segment")
        assert "+γ = 1.5" in default[4] or "γ" not in default[4]
        with pytest.raises(Exception, match="gamma must be a number"):
            client.predict(handle_file(str(files / "rgb.png")), "sky, zebra", "", "lots", api_name="/segment")
        # uploads over the cap are refused by the server before they are stored
        big = tmp_path / "big.png"
        big.write_bytes(b"\x89PNG" + bytes(3 * 2**20))
        reply = httpx.post(f"http://127.0.0.1:{port}/gradio_api/upload", files={"files": ("big.png", big.read_bytes())})
        assert reply.status_code == 413 and str(2 * 2**20) in reply.text
        with pytest.raises(Exception, match="at least one class name"):  # a clear error, and the app keeps serving
            client.predict(handle_file(str(files / "rgb.png")), " , ", "", 1.5, api_name="/segment")
        with pytest.raises(Exception, match="not an image"):
            client.predict(handle_file(str(files / "notes.txt")), "cow", "", 1.5, api_name="/segment")
        gallery, regions, _ = client.predict(handle_file(str(files / "rgb.png")), None, "2", 0.8, "centroid",
                                             api_name="/pseudo_labels")
        assert len(gallery) == 3
        heat, sims, _ = client.predict(handle_file(str(files / "rgb.png")), "sky", "", api_name="/attention")
        assert Path(heat).is_file() and len(sims) == 1
        assert client.predict(api_name="/info")["provider"] == "CPUExecutionProvider"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert list(temp.glob(f"{ui.FOLDER_PREFIX}*")) == []  # `kill` lets the app remove its result folders
    assert "Traceback" not in (tmp_path / "app.log").read_text()


@pytest.mark.skipif(not (ROOT / "bundles" / "default" / "bundle.json").is_file(), reason="no bundles/default here")
def test_default_bundle_segments_an_example():
    service = svc.Service(Bundle(ROOT / "bundles" / "default", verbose=False))
    image, _ = svc.load_image(ui.examples_dir() / "farm.jpg")
    seg = service.segment(image, "building, grass, tree, cow, sky")
    assert len(seg.shares) >= 2


# ---------------------------------------------------------------------------- a Ray Serve deployment as the backend


class FakeReplica:
    """The Serve replica's request path (clipteacher.serve.api and clipteacher.batch, as ray_serve.Segmenter runs
    them) behind a stdlib HTTP server, without Ray; `mode` makes it misbehave. tests/test_scale.py runs the real
    deployment."""

    def __init__(self, bundle):
        import http.server
        import threading

        from clipteacher.batch import encode_outputs, student_passes
        from clipteacher.serve import api

        replica, self.mode, self.calls = self, "ok", 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def reply(self, status: int, body: bytes):
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self.reply(200, json.dumps({"bundle": bundle.folder.name, "provider": bundle.provider,
                                            "vocabulary": bundle.vocabulary, "gamma": bundle.gamma}).encode())

            def do_POST(self):
                replica.calls += 1
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if replica.mode == "garbage":
                    return self.reply(200, b"<html>not the API</html>")
                if replica.mode == "crash":
                    return self.reply(500, b'{"error": "internal error (RuntimeError)"}')
                if replica.mode == "blank":  # an error status with an empty message
                    return self.reply(503, b'{"error": "  "}')
                try:
                    job = api.parse_request(body)
                    if replica.mode == "small":  # decodes to another size than the app (another version)
                        job.image = np.ascontiguousarray(job.image[::2, ::2])
                    feats = student_passes(bundle, [job.image])[0]
                    enc = encode_outputs(bundle, job.image, job.notes, feats, job.names, job.gamma, job.templates)
                    out = api.answer(job, enc, 0.0) | {"replica": "fake-1"}
                    if replica.mode == "torn":  # a reply whose mask does not fit its own size fields
                        out["height"] = out["height"] // 2
                    self.reply(200, json.dumps(out).encode())
                except Exception as err:  # noqa: BLE001
                    status, payload = api.error_body(err)
                    self.reply(status, json.dumps(payload).encode())

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/segment"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def replica(bundle_dir):
    fake = FakeReplica(Bundle(bundle_dir, verbose=False))
    yield fake
    fake.server.shutdown()


def test_the_segment_view_runs_on_a_serve_backend_and_draws_the_same_answer(bundle_dir, replica, files, handlers):
    from clipteacher.serve.client import ServeClient

    remote = Handlers(svc.Service(Bundle(bundle_dir, verbose=False), backend=ServeClient(replica.url)))
    before = replica.calls
    for name, names, gamma in [("rgb.png", "sky, grass, zebra", 1.0), ("huge.jpg", "cow, lamp", None)]:
        got = guarded(remote.segment)(str(files / name), names, "", gamma)
        want = guarded(handlers.segment)(str(files / name), names, "", gamma)
        with Image.open(io.BytesIO(got[3].data)) as a, Image.open(io.BytesIO(want[3].data)) as b:  # the mask PNGs
            assert a.size == b.size and a.info["classes"] == b.info["classes"] and a.getpalette() == b.getpalette()
            assert float((np.asarray(a) == np.asarray(b)).mean()) > 0.99
        assert got[2].keys() == want[2].keys() and "Serve replica fake-1" in got[4]
    assert replica.calls == before + 2
    assert remote.info()["backend"] == replica.url


@pytest.mark.parametrize("mode, message", [
    ("crash", "backend failed (internal error (RuntimeError)); try again"),
    ("garbage", "did not answer with JSON"),
    ("small", "decoded the image or the names differently"),
    ("torn", "does not match its own mask"),
    ("blank", "backend failed (HTTP 503 Service Unavailable); try again"),
])
def test_a_misbehaving_backend_is_one_line(bundle_dir, replica, files, mode, message):
    from clipteacher.serve.client import ServeClient

    remote = Handlers(svc.Service(Bundle(bundle_dir, verbose=False), backend=ServeClient(replica.url)))
    replica.mode = mode
    try:
        with pytest.raises(gr.Error) as err:
            guarded(remote.segment)(str(files / "rgb.png"), "sky, cow", "", None)
    finally:
        replica.mode = "ok"
    assert message in str(err.value) and "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_the_backend_refusal_comes_through_as_its_own_line(bundle_dir, replica):
    """A 4xx from the backend is its message as it wrote it (here: names the app would also refuse, sent
    past the app's own check)."""
    from clipteacher.serve.client import BackendError, ServeClient

    with pytest.raises(BackendError, match="^Type at least one class name"):
        ServeClient(replica.url).segment((ROOT / "clipteacher/app/examples/farm.jpg").read_bytes(), " , ")


def test_bad_input_fails_before_any_round_trip(bundle_dir, replica, files):
    from clipteacher.serve.client import ServeClient

    service = svc.Service(Bundle(bundle_dir, verbose=False), backend=ServeClient(replica.url))
    image, _ = svc.load_image(files / "rgb.png")
    before = replica.calls
    for names, templates, gamma in [("", None, None), ("cow", "{0.__class__}", None), ("cow", None, "nan")]:
        with pytest.raises(svc.UserError):
            service.segment_remote(image, (files / "rgb.png").read_bytes(), names, templates, gamma)
    assert replica.calls == before


@pytest.mark.parametrize("url, message", [("http://127.0.0.1:{port}/segment", "did not answer"),
                                          ("ftp://x/segment", "must be an http(s):// URL")])
def test_an_unusable_backend_stops_the_app_in_one_line(bundle_dir, capsys, url, message):
    code = app_run.main(["--bundle", str(bundle_dir), "--backend", url.format(port=free_port())])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --backend: ") and message in err and err.count("\n") == 1


def test_hubness_on_without_a_reference_stops_the_app_in_one_line(bundle_dir, tmp_path, capsys):
    import shutil

    plain = tmp_path / "plain"
    shutil.copytree(bundle_dir, plain)
    meta = json.loads((plain / "bundle.json").read_text())
    meta["hubness"] = None  # as exported without training images, or for ZegCLIP / TagCLIP
    (plain / "bundle.json").write_text(json.dumps(meta))
    code = app_run.main(["--bundle", str(plain), "--hubness", "on"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: --hubness on: ") and "no hubness reference" in err
    assert err.count("\n") == 1

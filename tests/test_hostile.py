"""Hostile input, as a new user or an attacker sends it (docs/DESIGN.md#reliability): every case gets a
one-line answer or a correct result, nothing the user gave is overwritten, and the app keeps serving."""
from __future__ import annotations

import fcntl
import json
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from clipteacher import batch
from clipteacher.app import service as svc
from clipteacher.app import ui
from clipteacher.cli import predict
from clipteacher.request import MAX_GAMMA, UserError, parse_gamma
from clipteacher.runtime import Bundle
from helpers import free_port


def write_image(path: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(path)
    return path


def test_out_linked_to_the_input_folder_is_refused_before_writing(tmp_path, capsys):
    """--out LINK where LINK -> the input folder overwrote the images with masks (abspath, not realpath)."""
    folder = tmp_path / "b"
    folder.mkdir()
    image = write_image(folder / "some.png")
    before = image.read_bytes()
    (tmp_path / "blink").symlink_to(folder)
    code = predict.main([str(folder), "--names", "cow", "--out", str(tmp_path / "blink"), "--bundle", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "both an input folder and --out" in err[0]
    assert image.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["some.png"]


def test_a_symlink_loop_in_the_input_folder_is_skipped_with_one_line(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    write_image(folder / "a.png")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    paths, notes = batch.collect_inputs([str(folder)], tmp_path / "out")
    assert [p.name for p in paths] == ["a.png"]
    assert len(notes) == 1 and "loop.jpg skipped" in notes[0] and "\n" not in notes[0]


def test_a_second_run_on_the_same_out_says_so_in_one_line(tmp_path, capsys):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    write_image(folder / "a.png")
    with open(out / batch.LOCK, "a+") as held:  # another run holds the folder
        held.write("4242")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        code = predict.main([str(folder), "--names", "cow", "--out", str(out), "--bundle", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "in use by another clipteacher-predict run (pid 4242)" in err[0]
    assert not (out / batch.SUMMARY).exists()


def test_summary_has_one_line_per_image_after_interrupted_and_resumed_runs(bundle_dir, tmp_path):
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    for i in range(4):
        write_image(folder / f"i{i}.png", i)
    args = [str(folder), "--names", "cow, sky", "--out", str(out), "--bundle", str(bundle_dir)]
    assert predict.main(args) == 0
    with open(out / batch.SUMMARY, "a") as f:  # a killed run: a repeated line and half a line
        f.write((out / batch.SUMMARY).read_text().splitlines()[0] + "\n" + '{"file": "x", "ma')
    (out / "i2.png").unlink()
    for _ in range(2):
        assert predict.main(args + ["--skip-existing"]) == 0
    lines = [json.loads(x) for x in (out / batch.SUMMARY).read_text().splitlines()]
    assert sorted(x["mask"] for x in lines) == [f"i{i}.png" for i in range(4)]


@pytest.mark.parametrize("value", ["1e308", "-1e308", str(MAX_GAMMA + 0.5), "inf", "nan"])
def test_gamma_outside_its_range_is_one_line(value):
    with pytest.raises(UserError, match="from -20 to 20"):
        parse_gamma(value)
    assert parse_gamma(str(MAX_GAMMA)) == MAX_GAMMA and parse_gamma("-3") == -3.0


def test_palette_picture_as_label_explains_zero_regions(bundle_dir):
    service = svc.Service(Bundle(bundle_dir, verbose=False))
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    label = np.random.default_rng(1).integers(0, 255, (64, 64)).astype(np.uint8)  # colours, not class ids
    label[0, 0] = 255
    res = service.pseudo_labels(image, label, (2,), 0.8, "centroid")
    assert not (res.fused >= 0).any()
    assert any("only 0.0% of the label's pixels are 255" in n for n in res.notes)


@pytest.fixture
def app(bundle_dir):
    """The app in this process with one image slot; `hold` blocks the video's frames until released."""
    service = svc.Service(Bundle(bundle_dir, verbose=False))
    demo = ui.build_demo(service, ui.Serving(concurrency=1, queue=8, long_jobs=2))
    port = free_port()
    ui.launch(demo, "127.0.0.1", port, prevent_thread_lock=True, quiet=True)
    yield service, f"http://127.0.0.1:{port}/gradio_api"
    demo.close()


def result(http, base: str, api: str, data: list) -> str:
    reply = http.post(f"{base}/call/{api}", json={"data": data})
    assert reply.status_code == 200, reply.text
    return http.get(f"{base}/call/{api}/{reply.json()['event_id']}").text


def upload(http, base: str, path: Path) -> dict:
    name = http.post(f"{base}/upload", files={"files": (path.name, path.read_bytes())}).json()[0]
    return {"path": name, "meta": {"_type": "gradio.FileData"}}


@pytest.mark.parametrize("payload", [{"video": {"x": 1}}, "hello", 42])
def test_malformed_file_payloads_are_one_line(app, payload, capfd):
    _, base = app
    with httpx.Client(timeout=60) as http:
        for api, data in (("video", [payload, "cow", "", None]), ("segment", [payload, "cow", "", None])):
            stream = result(http, base, api, data)
            message = json.loads(stream.split("event: error\ndata: ")[1].splitlines()[0])["error"]
            assert "must be an uploaded file" in message and "\n" not in message
    assert "Traceback" not in capfd.readouterr().err


def test_segment_is_admitted_while_videos_run(app, tmp_path):
    """Videos have slots of their own: with two videos computing, a /segment request is answered (it used to
    wait for a model slot that a video held for the whole clip)."""
    import cv2

    service, base = app
    clip = tmp_path / "clip.webm"
    writer = cv2.VideoWriter(str(clip), cv2.VideoWriter_fourcc(*"VP80"), 10, (64, 48))
    for i in range(5):
        writer.write(np.full((48, 64, 3), 20 * i, np.uint8))
    writer.release()
    release, running = threading.Event(), threading.Semaphore(0)
    live_frame = service.live_frame

    def held(*args, **kwargs):  # every video frame waits until the image request has been answered
        running.release()
        release.wait(120)
        return live_frame(*args, **kwargs)

    service.live_frame = held
    image = write_image(tmp_path / "rgb.png")
    with httpx.Client(timeout=120) as http:
        video = upload(http, base, clip)
        picture = upload(http, base, image)
        threads = [threading.Thread(target=result, args=(http, base, "video", [video, "cow", "", None]))
                   for _ in range(2)]
        for t in threads:
            t.start()
        try:
            assert running.acquire(timeout=60) and running.acquire(timeout=60)  # both videos are computing
            stream = result(http, base, "segment", [picture, "cow, sky", "", None])
            assert "event: complete" in stream
        finally:
            release.set()
            for t in threads:
                t.join(120)

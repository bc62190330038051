"""The app's Compare view, Live (camera) frames and video files: service, handlers and API."""
from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from clipteacher.app import service as svc
from clipteacher.app.ui import Handlers, guarded
from helpers import free_port, inline_bytes, start_app


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """A 96 x 128 picture and a 12-frame clip of it moving (MJPG AVI, 10 frames per second)."""
    d = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(1)
    picture = np.kron(rng.integers(0, 256, (6, 8, 3)), np.ones((16, 16, 1))).astype(np.uint8)
    Image.fromarray(picture).save(d / "picture.png")
    writer = cv2.VideoWriter(str(d / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (128, 96))
    for i in range(12):
        writer.write(cv2.cvtColor(np.roll(picture, 4 * i, axis=1), cv2.COLOR_RGB2BGR))
    writer.release()
    (d / "notes.avi").write_text("not a video\n")
    return d


def test_compare_gives_the_teachers_own_prediction(service, media):
    image, _ = svc.load_image(media / "picture.png")
    cmp = service.compare(image, "sky, grass, zebra")
    assert cmp.names == ["sky", "grass", "zebra"] and cmp.teacher.shape == cmp.student.labels.shape == (96, 128)
    # the teacher row of the benchmarks, computed here with numpy: cos(dense token, name), bilinear, argmax
    _, dense = service.bundle.teacher_tokens(image)
    text = service.bundle.embed_text(cmp.names)
    scores = np.einsum("cd,dhw->hwc", text, dense).astype(np.float32)
    expected = cv2.resize(scores, (128, 96), interpolation=cv2.INTER_LINEAR).argmax(-1)
    assert (cmp.teacher == expected).mean() > 0.99
    assert cmp.teacher_seconds > 0 and cmp.student_seconds > 0 and not cmp.cached
    assert service.compare(image, "sky, grass").cached  # a new vocabulary reuses both image passes


def test_live_frame_runs_at_the_students_input_size(service, media):
    frame = np.asarray(Image.open(media / "picture.png"))
    big = cv2.resize(frame, (512, 384), interpolation=cv2.INTER_NEAREST)
    overlay, seg = service.live_frame(big, "sky, grass")
    size = service.bundle.eval_size
    assert min(overlay.shape[:2]) == size and overlay.shape[:2] == seg.labels.shape
    assert abs(overlay.shape[1] / overlay.shape[0] - 512 / 384) < 0.02  # aspect kept
    passes = dict(service.passes)
    service.live_frame(big, "sky, grass")
    assert dict(service.passes) == passes  # frames are not cached (they would push out the uploads)


def test_video_is_segmented_frame_by_frame(service, media, tmp_path):
    seen = []
    out, frames, notes = service.segment_video(media / "clip.avi", "sky, grass", tmp_path / "out.webm",
                                               progress=lambda done, total: seen.append((done, total)))
    reader = cv2.VideoCapture(str(out))
    count = 0
    while reader.read()[0]:
        count += 1
    assert frames == count == 12 and notes == [] and seen[-1][0] == 12
    assert abs(reader.get(cv2.CAP_PROP_FRAME_WIDTH) / reader.get(cv2.CAP_PROP_FRAME_HEIGHT) - 128 / 96) < 0.03


def test_long_videos_are_cut_and_bad_ones_explained(service, media, tmp_path, monkeypatch):
    monkeypatch.setattr(svc, "MAX_VIDEO_SECONDS", 0.5)  # 5 frames at 10 frames per second
    _, frames, notes = service.segment_video(media / "clip.avi", "sky", tmp_path / "cut.webm")
    assert frames == 5 and "first 0.5 s" in notes[0]
    with pytest.raises(svc.UserError, match="not a video"):
        service.segment_video(media / "notes.avi", "sky", tmp_path / "x.webm")
    with pytest.raises(svc.UserError, match="at least one class name"):
        service.segment_video(media / "clip.avi", " , ", tmp_path / "x.webm")
    with pytest.raises(svc.UserError, match="Upload a video"):
        service.segment_video(None, "sky", tmp_path / "x.webm")


def test_handlers(service, media):
    h = Handlers(service)
    teacher, student, legend, status, others = guarded(h.compare)(str(media / "picture.png"), "sky, grass", "", None)
    assert others == []  # no --compare-bundle
    for picture, who in ((teacher, "teacher"), (student, "student")):  # inside the response (Inline)
        assert picture.name == f"picture_{who}.jpg"
        with Image.open(io.BytesIO(picture.data)) as im:
            assert im.size == (128, 96)
    assert "teacher" in status and "student" in status and "agree on" in status and 'class="swatch"' in legend
    frame = np.asarray(Image.open(media / "picture.png"))
    times = []
    for _ in range(3):
        overlay, status, times = guarded(h.live)(frame, "sky, grass", "", None, times)
    assert overlay.shape[2] == 3 and len(times) == 3 and "frames/s" in status
    assert guarded(h.live)(None, "sky", "", None, [])[0] is None  # the camera is not started yet


def test_solo_passes_leave_videos_alone_and_compare_times_both_passes_alike(bundle_dir, media, tmp_path):
    """With solo sessions (clipteacher-app --solo-threads), a lone Segment pass runs on both threads; video frames never
    do (a long job must not hold every core), and Compare times the student on the teacher's thread count (the
    teacher has no solo copy), once per image."""
    from clipteacher.runtime import Bundle

    service = svc.Service(Bundle(bundle_dir, verbose=False, threads=1, spin=False, solo_threads=2))
    before = service.bundle.solo_calls
    _, frames, _ = service.segment_video(media / "clip.avi", "sky, grass", tmp_path / "clip.webm")
    assert frames == 12 and service.bundle.solo_calls == before
    h = Handlers(service)
    guarded(h.segment)(str(media / "picture.png"), "sky, grass", "", None)
    assert service.bundle.solo_calls == before + 2  # the student and the classifier, alone
    cmp = service.compare(svc.load_image(media / "picture.png")[0], "sky, grass")
    assert cmp.student_threads == cmp.teacher_threads == 1  # the student's pass timed again, as the teacher's ran
    again = service.compare(svc.load_image(media / "picture.png")[0], "cow, sky")
    assert again.student_threads == 1 and again.student_seconds == cmp.student_seconds  # kept: not timed again
    status = guarded(h.compare)(str(media / "picture.png"), "sky, grass", "", None)[3]
    assert "x)" in status.split("·")[0] and " thread" not in status.split("·")[0]  # a ratio of passes run alike
    from clipteacher.app.ui import threads_note

    assert threads_note(1, alike=True) == "" and threads_note(2, alike=False) == " on 2 threads"
    assert threads_note(None, alike=False) == " on all threads"


def test_api_compare_and_video(bundle_dir, media, tmp_path):
    """/compare and /video through gradio_client (its client cannot drive the streaming /live endpoint;
    the browser test does)."""
    from gradio_client import Client, handle_file

    port = free_port()
    proc = start_app(bundle_dir, port, tmp_path / "app.log")
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        teacher, student, legend, status, others = client.predict(handle_file(str(media / "picture.png")), "sky, grass", "",
                                                          None, api_name="/compare")
        with Image.open(io.BytesIO(inline_bytes(teacher))) as a, Image.open(io.BytesIO(inline_bytes(student))) as b:
            assert a.size == b.size == (128, 96)
        video, status = client.predict(handle_file(str(media / "clip.avi")), "sky, grass", "", None,
                                       api_name="/video")
        path = video["video"] if isinstance(video, dict) else video
        assert str(path).endswith(".webm") and "12 frames" in status
        with pytest.raises(Exception, match="not a video"):
            client.predict(handle_file(str(media / "notes.avi")), "sky", "", None, api_name="/video")
        assert json.dumps(client.predict(api_name="/info"))  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "Traceback" not in (tmp_path / "app.log").read_text()

"""Live-tab speed: frames per second of the model + overlay on a sequence of real frames (no network).

    python bench/live.py [--bundle bundles/default] [--frames 200] [--threads N]

Frames are real MSRC-21 images (the app's examples when the shared data is absent) scaled to a
640 x 480 camera frame; each goes through `Service.live_frame` exactly as the Live tab calls it:
shrink to the student's input size, student pass, classifier, overlay. Also times a short video
through `Service.segment_video` (decode, the same per-frame work, VP8 encode).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "msrc21" / "images"
NAMES = "building, grass, tree, cow, sky, water, road, car, person, dog"


def frames(n: int) -> list[np.ndarray]:
    paths = sorted(DATA.glob("*.jpg")) or sorted((ROOT / "clipteacher" / "app" / "examples").glob("*.jpg"))
    out = []
    for i in range(n):
        image = cv2.cvtColor(cv2.imread(str(paths[i % len(paths)])), cv2.COLOR_BGR2RGB)
        out.append(cv2.resize(image, (640, 480), interpolation=cv2.INTER_LINEAR))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="bundle folder (default: the app's default bundle)")
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    args = parser.parse_args()

    from clipteacher.app.service import Service
    from clipteacher.runtime.resolve import resolve_bundle
    from clipteacher.runtime import Bundle

    bundle = Bundle(resolve_bundle(args.bundle), verbose=False, threads=args.threads)
    service = Service(bundle)
    clip = frames(args.frames)
    for frame in clip[:5]:  # warm-up
        service.live_frame(frame, NAMES)
    times = []
    start = time.perf_counter()
    for frame in clip:
        t = time.perf_counter()
        overlay, _ = service.live_frame(frame, NAMES)
        times.append(time.perf_counter() - t)
    fps = len(clip) / (time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "clip.avi"
        writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 25, (640, 480))
        for frame in clip[:100]:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        t = time.perf_counter()
        _, written, _ = service.segment_video(video, NAMES, Path(tmp) / "out.webm")
        video_fps = written / (time.perf_counter() - t)

    print(f"bench/live.py  bundle={bundle.folder.name}  {len(clip)} real frames 640 x 480 -> "
          f"{overlay.shape[1]} x {overlay.shape[0]} (student input short side {bundle.eval_size}), "
          f"{len(NAMES.split(','))} names, threads={args.threads or 'default'}")
    print(f"  live frame (model + overlay): median {1000 * statistics.median(times):.1f} ms, "
          f"p95 {1000 * float(np.percentile(times, 95)):.1f} ms -> {fps:.1f} frames/s   target >= 10: "
          f"{'met' if fps >= 10 else 'MISSED'}")
    print(f"  video file (decode + the same + VP8 encode): {written} frames at {video_fps:.1f} frames/s")


if __name__ == "__main__":
    main()

"""Mixed load: how long a new image waits while videos are being segmented.

    python bench/mixed.py                       # default bundle, 2 videos of 30 s, 20 new images
    python bench/mixed.py --videos 8 --long-jobs 2 --images 40

The app is started the README way (`app/run.py`, default serving settings plus `--long-jobs`). Phases,
in one run on this machine (compare the ratio, not the milliseconds):
  1. idle: `--images` sequential new-image requests (upload + /segment + the overlay, as the
     browser does), nothing else running;
  2. mixed: `--videos` /video requests of `--seconds`-long clips are started; once the first frames
     have come back, the same kind of requests are sent again, and only those that finish while
     every video is still computing are counted.
Target (issue 25): mixed p50 within 3x the idle p50.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _serve_bench():
    """bench/serve.py as a module (its driver, image maker and server start are shared)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_serve", Path(__file__).resolve().parent / "serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_serve = _serve_bench()
NAMES, Driver, make_images, ms, percentile, start_server = (_serve.NAMES, _serve.Driver, _serve.make_images, _serve.ms,
                                                            _serve.percentile, _serve.start_server)


def make_clip(path: Path, sources: list[Path], seconds: float, fps: int = 10, side: int = 320) -> Path:
    """A WebM clip of `seconds` at `fps`, panning across real images (content changes every frame)."""
    import cv2
    from PIL import Image

    frames = []
    for src in sources:
        with Image.open(src) as im:
            im = im.convert("RGB").resize((side + 64, side * 3 // 4))
            frames.append(np.asarray(im)[:, :, ::-1])
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"VP80"), fps, (side, side * 3 // 4))
    for i in range(int(seconds * fps)):
        frame = frames[(i // fps) % len(frames)]
        shift = i % 64
        writer.write(np.ascontiguousarray(frame[:, shift:shift + side]))
    writer.release()
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="bundle folder (default: the app's default bundle)")
    parser.add_argument("--videos", type=int, default=2, help="videos running during the mixed phase")
    parser.add_argument("--long-jobs", type=int, default=2, help="the app's --long-jobs (videos computed at once)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each clip (the app's cap is 30 s)")
    parser.add_argument("--images", type=int, default=20, help="new-image requests per phase")
    parser.add_argument("--app-args", default="", help="more clipteacher-app arguments")
    args = parser.parse_args()

    from clipteacher.runtime import Bundle
    from clipteacher.runtime.resolve import resolve_bundle

    tmp = Path(tempfile.mkdtemp(prefix="bench_mixed_"))
    images = make_images(tmp, 2 * args.images + 2)
    clips = [make_clip(tmp / f"clip{k}.webm", images[k::3][:6], args.seconds) for k in range(args.videos)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bundle_dir = resolve_bundle(args.bundle)
    extra = ["--long-jobs", str(args.long_jobs), *args.app_args.split()]
    proc = start_server(port, str(bundle_dir) if args.bundle else None, tmp / "app.log", extra)
    url = f"http://127.0.0.1:{port}/"
    try:
        gamma = Bundle(bundle_dir, verbose=False).gamma
        d = Driver(url, gamma)
        d.segment(images[-1], NAMES)  # warm-up
        idle = [d.segment(images[i], NAMES)[0] for i in range(args.images)]

        running, finished, errors = [0], [], []
        lock, started = threading.Lock(), threading.Event()

        def video_job(clip: Path):
            drv = Driver(url, gamma)
            ref = drv.upload(clip)
            with lock:
                running[0] += 1
                if running[0] == args.videos:
                    started.set()
            t = time.perf_counter()
            try:
                drv.call("video", [ref, ", ".join(NAMES), "", gamma])
            except Exception as err:  # noqa: BLE001 - reported
                errors.append(str(err).splitlines()[0][:200])
            with lock:
                running[0] -= 1
                finished.append(time.perf_counter() - t)

        threads = [threading.Thread(target=video_job, args=(c,)) for c in clips]
        for t in threads:
            t.start()
        started.wait(120)
        time.sleep(3.0)  # the videos' first frames are computing
        mixed, late = [], 0
        for i in range(args.images):
            with lock:
                all_running = running[0] == args.videos
            if not all_running:
                break
            seconds, _ = d.segment(images[args.images + i], NAMES)
            with lock:
                if running[0] == args.videos:
                    mixed.append(seconds)
                else:
                    late += 1
        for t in threads:
            t.join()

        i50, m50 = statistics.median(idle), (statistics.median(mixed) if mixed else float("nan"))
        print(f"bench/mixed.py  bundle={bundle_dir.name}  cores={os.cpu_count()}  {args.videos} videos of "
              f"{args.seconds:g} s (320 x 240, 10 frames/s)  --long-jobs {args.long_jobs}  {args.app_args or ''}")
        print(f"  new image, idle            p50 {ms(i50)}  p95 {ms(percentile(idle, 95))}  ({len(idle)} requests)")
        if mixed:
            print(f"  new image, {args.videos} videos running  p50 {ms(m50)}  p95 {ms(percentile(mixed, 95))}  max "
                  f"{ms(max(mixed))}  ({len(mixed)} requests while every video computed; {late} finished after one ended)")
            ratio = m50 / i50
            print(f"  ratio mixed / idle p50     {ratio:.2f}x   target <= 3x: {'met' if ratio <= 3 else 'MISSED'}")
        else:
            print("  no request finished while every video computed (clips too short for this machine?)")
        print(f"  videos                     {len(finished)} done in {', '.join(f'{s:.1f} s' for s in sorted(finished))}"
              f"  errors {len(errors)}" + (f": {errors[0]}" if errors else ""))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except Exception:  # noqa: BLE001
            proc.kill()


if __name__ == "__main__":
    main()

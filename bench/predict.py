"""Throughput of clipteacher-predict on real images, and whether batching same-size images would help.

    python bench/predict.py                               # 200 SIFT Flow val images, the default bundle
    python bench/predict.py --images 100 --bundle bundles/msrc21 --precision int8

Rows:
  clipteacher-predict    images/s of the whole command (reading, student, classifier, mask PNG, summary
                         line) over --images files, model loading excluded (it is timed on its own)
  student batch B        ms per image of the student graph alone on B same-size images stacked into one
                         run, B = 1, 2, 4, 8; rounds interleave the batch sizes so load from other jobs on
                         this machine hits every size alike. clipteacher-predict runs one image at a time:
                         batching is only worth adding where these rows show it is faster.
Images: SIFT Flow val (256 x 256, all one size); random images when the data is not on this machine.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "siftflow"
NAMES = "sky, building, tree, road, sea, mountain, car, person, grass, field"


def inputs(n: int, work: Path) -> tuple[Path, str]:
    """A folder of n real val images (symlinks, nothing copied), or of random images when the data is absent."""
    folder = work / "images"
    folder.mkdir()
    ids = (DATA / "splits" / "val.txt").read_text().split() if (DATA / "splits" / "val.txt").is_file() else []
    if ids:
        for i in ids[:n]:
            (folder / f"{i}.jpg").symlink_to(DATA / "images" / f"{i}.jpg")
        return folder, f"{min(n, len(ids))} SIFT Flow val images"
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(folder / f"r{i}.png")
    return folder, f"{n} random 256 x 256 images (no SIFT Flow data at {DATA})"


def batch_rows(bundle, folder: Path, rounds: int) -> list[tuple[int, float]]:
    """(B, median ms per image) of the student graph on B stacked same-size images."""
    import onnxruntime as ort

    from clipteacher.app.service import load_image
    from clipteacher.io import resize_short
    from clipteacher.runtime.bundle import to_input

    sess = ort.InferenceSession(str(bundle.folder / bundle.meta["files"][bundle_key(bundle)]),
                                providers=[bundle.provider])
    xs = [to_input(resize_short(load_image(p)[0], bundle.eval_size)) for p in sorted(folder.iterdir())[:8]]
    xs = [x for x in xs if x.shape == xs[0].shape]
    sizes = [b for b in (1, 2, 4, 8) if b <= len(xs)]
    times = {b: [] for b in sizes}
    sess.run(None, {"image": np.concatenate(xs[: sizes[-1]])})  # warm-up
    for _ in range(rounds):
        for b in sizes:
            batch = np.concatenate(xs[:b])
            t = time.perf_counter()
            sess.run(None, {"image": batch})
            times[b].append(1000 * (time.perf_counter() - t) / b)
    return [(b, statistics.median(times[b])) for b in sizes]


def bundle_key(bundle) -> str:
    return {"fp32": "student", "int8": "student_int8", "fp16": "student_fp16"}[bundle.precision]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="how many images to segment")
    parser.add_argument("--bundle", help="bundle folder (default: bundles/msrc21, built on first use)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16"])
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the batching comparison")
    args = parser.parse_args(argv)

    from clipteacher.cli import predict
    from clipteacher.cli.app import resolve_bundle
    from clipteacher.runtime import Bundle

    bundle_dir = resolve_bundle(args.bundle)
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        folder, what = inputs(args.images, work)
        t = time.perf_counter()
        bundle = Bundle(bundle_dir, precision=args.precision, verbose=False)
        load_s = time.perf_counter() - t
        t = time.perf_counter()
        code = predict.main([str(folder), "--names", NAMES, "--out", str(work / "out"), "--bundle", str(bundle_dir),
                             "--precision", args.precision])
        wall = time.perf_counter() - t
        lines = [json.loads(x) for x in (work / "out" / "summary.jsonl").read_text().splitlines()]
        done = [x for x in lines if "mask" in x]
        per_image = sum(x["seconds"] for x in done)
        print(f"\n{what}, bundle {bundle_dir}, {args.precision} student on {bundle.provider}, "
              f"{len(NAMES.split(','))} class names")
        print(f"  clipteacher-predict   {len(done) / per_image:7.1f} images/s  ({1000 * per_image / len(done):.1f} ms "
              f"per image; whole command {len(done) / wall:.1f} images/s incl. {wall - per_image:.1f} s start-up, "
              f"model load alone {load_s:.1f} s; exit code {code})")
        rows = batch_rows(bundle, folder, args.rounds)
        for b, ms in rows:
            print(f"  student batch {b}       {ms:7.1f} ms/image  ({rows[0][1] / ms:.2f}x batch 1)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

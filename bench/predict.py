"""Throughput of clipteacher-predict on real images, one image per student run against batches.

    python bench/predict.py                               # 200 SIFT Flow val images, the default bundle
    python bench/predict.py --images 100 --bundle bundles/default --precision int8

Rows:
  clipteacher-predict --batch B   images/s of the whole command (reading, student, classifier, mask PNG,
                                  summary line) over --images files, from the summary's per-image seconds
                                  (model loading excluded; it is timed on its own), B = 1 and 8; the two
                                  alternate for --command-rounds rounds so load from other jobs hits both alike
  student batch B                 ms per image of the student graph alone (Bundle.batch_features) on B
                                  same-size images, B = 1, 2, 4, 8, rounds interleaved the same way
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
    from clipteacher.request import load_image

    images = [load_image(p)[0] for p in sorted(folder.iterdir())[:8]]
    images = [x for x in images if x.shape == images[0].shape]
    sizes = [b for b in (1, 2, 4, 8) if b <= len(images)]
    times = {b: [] for b in sizes}
    bundle.batch_features(images[: sizes[-1]])  # warm-up
    for _ in range(rounds):
        for b in sizes:
            t = time.perf_counter()
            bundle.batch_features(images[:b])
            times[b].append(1000 * (time.perf_counter() - t) / b)
    return [(b, statistics.median(times[b])) for b in sizes]


def command_run(predict, folder: Path, out: Path, bundle_dir, precision: str, batch: int) -> tuple[float, int, int]:
    """(sum of per-image seconds, images done, exit code) of one clipteacher-predict run into a fresh `out`."""
    shutil.rmtree(out, ignore_errors=True)
    code = predict.main([str(folder), "--names", NAMES, "--out", str(out), "--bundle", str(bundle_dir),
                         "--precision", precision, "--batch", str(batch)])
    lines = [json.loads(x) for x in (out / "summary.jsonl").read_text().splitlines()]
    done = [x for x in lines if "mask" in x]
    return sum(x["seconds"] for x in done), len(done), code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200, help="how many images to segment")
    parser.add_argument("--bundle", help="bundle folder (default: bundles/default, built on first use)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "int8", "fp16"])
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the student-graph comparison")
    parser.add_argument("--command-rounds", type=int, default=3, help="runs of the command per batch size")
    args = parser.parse_args(argv)

    from clipteacher.cli import predict
    from clipteacher.runtime.resolve import resolve_bundle
    from clipteacher.runtime import Bundle

    bundle_dir = resolve_bundle(args.bundle)
    work = Path(tempfile.mkdtemp(prefix="bench_predict_"))
    try:
        folder, what = inputs(args.images, work)
        t = time.perf_counter()
        bundle = Bundle(bundle_dir, precision=args.precision, verbose=False)
        load_s = time.perf_counter() - t
        per = {1: [], 8: []}
        for _ in range(args.command_rounds):
            for b in per:
                per[b].append(command_run(predict, folder, work / "out", bundle_dir, args.precision, b))
        print(f"\n{what}, bundle {bundle_dir}, {args.precision} student on {bundle.provider}, "
              f"{len(NAMES.split(','))} class names, model load alone {load_s:.1f} s")
        rate = {b: statistics.median(n / s for s, n, _ in runs) for b, runs in per.items()}
        for b, runs in per.items():
            print(f"  clipteacher-predict --batch {b}   {rate[b]:7.1f} images/s  ({1000 / rate[b]:.1f} ms per image, "
                  f"median of {len(runs)} runs; {rate[b] / rate[1]:.2f}x --batch 1; exit codes "
                  f"{sorted({c for *_, c in runs})})")
        rows = batch_rows(bundle, folder, args.rounds)
        for b, ms in rows:
            print(f"  student batch {b}                 {ms:7.1f} ms/image  ({rows[0][1] / ms:.2f}x batch 1)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

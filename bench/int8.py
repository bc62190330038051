"""The int8 student against fp32: speed and pixel-label agreement on the val images of MSRC-21 and SIFT Flow.

    python bench/int8.py                            # exports assets/default with --int8 to a temp bundle
    python bench/int8.py --bundle bundles/default    # a bundle exported with --int8
    python bench/int8.py --sweep                    # which layers cost accuracy: each group quantised alone

Agreement: every val image of each dataset at the app's resolution (short side eval_size), labelled
with that dataset's class names (dataset.json) and the bundle's gamma, by the fp32 and the int8
student through the same classifier; the share of all pixels whose labels agree, and the mean cosine
of the two feature maps. Target (issue 13): >= 99% on both datasets. For scale, the same measure
for fp32 itself with +-0.5 grey levels of uniform noise on its input (less than the 8-bit rounding
every image already carries).
Speed: ms per 512 x 512 image (Bundle.image_features, as bench/latency.py), fp32 and int8 runs
interleaved so load from other jobs hits both alike, at 1 thread and at all cores.
--sweep: the student's convolutions in groups (backbone stem and stages, the head's stage maps, its
embed), each quantised alone exactly as the export quantises, with the labels it flips on
--sweep-images val images per dataset and the time it saves (512 x 512, 1 thread, fastest run): the measurement
behind clipteacher.export.bundle.INT8_MODULES (docs/DESIGN.md#int8-student).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DATASETS = ("msrc21", "siftflow")
SIZE = 512


def val_set(name: str, limit: int | None = None) -> tuple[list[np.ndarray], list[str]] | None:
    """(val images as H x W x 3 uint8, class names) of a shared dataset, or None when it is not here.
    limit: that many images, evenly spaced."""
    from clipteacher.io import read_image_file

    root = DATA / name
    if not (root / "splits" / "val.txt").is_file():
        return None
    info = json.loads((root / "dataset.json").read_text())
    ids = (root / "splits" / "val.txt").read_text().split()
    if limit:
        ids = [ids[i] for i in np.linspace(0, len(ids) - 1, min(limit, len(ids))).astype(int)]
    images = [read_image_file(root / info["image_dir"] / f"{i}{info['image_suffix']}", upright=False) for i in ids]
    return images, info["classes"]


def agreement(base, features, images: list[np.ndarray], classes: list[str]) -> tuple[float, float]:
    """(share of pixels whose label agrees with the fp32 bundle `base`, mean feature cosine);
    features(image) -> 1 x D x h x w is the graph under test."""
    text, bias = base.embed_text(classes), base.unseen_bias(classes)
    same = total = 0
    cosines = []
    for image in images:
        ref, got = base.image_features(image), features(image)
        a, _ = base.classify(ref, text, bias, image.shape[:2])
        b, _ = base.classify(got, text, bias, image.shape[:2])
        same += int((a == b).sum())
        total += a.size
        cosines.append(float(((ref * got).sum(1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(got, axis=1)).mean()))
    return same / total, float(np.mean(cosines))


def interleaved_ms(fns: dict, runs: int, stat=statistics.median) -> dict[str, float]:
    """ms per call of each function (stat over the runs), the functions taking turns (one warm-up call each)."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: 1000 * stat(v) for k, v in times.items()}


def session_features(path: Path, eval_size: int, threads: int = 1, noise: float = 0.0):
    """features(image) of a student ONNX file, preprocessed as Bundle.image_features; noise > 0 adds
    uniform noise of +-noise grey levels to the input (seeded)."""
    import onnxruntime as ort

    from clipteacher.io import resize_short
    from clipteacher.runtime.bundle import to_input

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)

    def features(image):
        x = to_input(resize_short(image, eval_size))
        if noise:
            x = np.clip(x + rng.uniform(-noise / 255, noise / 255, x.shape).astype(np.float32), 0, 1)
        return sess.run(None, {"image": x})[0]

    return features


def conv_groups(student: Path) -> dict[str, tuple[str, ...]]:
    """Group name -> node-name prefix, in graph order: the backbone's stem and each stage, and the head's
    stage maps (each projection composed with its slice of the fuse, `MLPHead`; all four together) and embed."""
    import onnx

    groups = {}
    for node in onnx.load(str(student)).graph.node:
        parts = node.name.split("/")  # '', 'student', 'backbone' | 'head', module, ..., 'Conv'
        if node.op_type == "Conv" and parts[2:3] == ["head"] and len(parts) == 4:  # /student/head/Conv_i
            groups.setdefault("head stage maps", ("/student/head/Conv",))
        elif node.op_type == "Conv" and len(parts) > 4:
            key = parts[3].split(".")[0] if parts[2] == "head" else parts[3]  # proj.0 .. proj.3 as one group
            tail = "" if parts[2] == "head" else "/"  # blocks.1/ must not match blocks.10
            groups.setdefault(f"{parts[2]} {key}", (f"/student/{parts[2]}/{key}{tail}",))
    return groups


def sweep(folder: Path, checkpoint: str, sets: dict, work: Path, runs: int) -> None:
    from clipteacher.export.bundle import INT8_MODULES, calibration_images, quantize_int8
    from clipteacher.predictor import Segmenter
    from clipteacher.runtime import Bundle

    base = Bundle(folder, verbose=False)
    images, origin = calibration_images(Segmenter.from_checkpoint(checkpoint).cfg, log=print)
    student = folder / base.meta["files"]["student"]
    groups = {**conv_groups(student), "export default": INT8_MODULES, "every convolution": ("/student/",)}
    square = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    fp32 = session_features(student, SIZE)
    print(f"\nsweep: each group quantised alone (calibration: {origin}); labels flipped vs fp32 on "
          f"{', '.join(f'{len(v[0])} {k}' for k, v in sets.items())} val images; ms saved at {SIZE} x {SIZE}, 1 thread "
          f"(fastest of {runs} runs each)")
    print(f"  {'group':<22} {'convs':>5} " + " ".join(f"{k + ' flipped':>17}" for k in sets) + f" {'ms saved':>9}")
    for name, prefixes in groups.items():
        path = work / "sweep.onnx"
        quantised = quantize_int8(student, path, images, prefixes)
        flips = [100 * (1 - agreement(base, session_features(path, base.eval_size), *v)[0]) for v in sets.values()]
        int8 = session_features(path, SIZE)
        # the fastest run: one group saves a few ms, less than the medians move under other jobs' load
        ms = interleaved_ms({"fp32": partial(fp32, square), "int8": partial(int8, square)}, runs, stat=min)
        print(f"  {name:<22} {len(quantised):>5} " + " ".join(f"{f:16.2f}%" for f in flips)
              + f" {ms['fp32'] - ms['int8']:9.1f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="bundle exported with --int8 (default: export --checkpoint to a temp folder)")
    parser.add_argument("--checkpoint", default=str(ROOT / "assets" / "default"))
    parser.add_argument("--runs", type=int, default=20, help="timed runs per precision and thread count")
    parser.add_argument("--sweep", action="store_true", help="also quantise each group of layers alone")
    parser.add_argument("--sweep-images", type=int, default=24, help="val images per dataset in the sweep")
    args = parser.parse_args(argv)

    from clipteacher.export.bundle import export_bundle
    from clipteacher.runtime import Bundle

    work = Path(tempfile.mkdtemp(prefix="bench_int8_"))
    try:
        folder = Path(args.bundle) if args.bundle else export_bundle(args.checkpoint, work / "bundle", int8=True)
        base = Bundle(folder, verbose=False)
        notes = base.meta.get("notes", {}).get("int8", {})
        print(f"\nbundle {folder}: int8 {notes or '(exported before bundle.json recorded how)'}")
        rows = {}
        for name in DATASETS:
            found = val_set(name)
            if found is None:
                print(f"  {name}: not found under {DATA}; skipped")
                continue
            int8 = Bundle(folder, precision="int8", verify=False, verbose=False)
            # the reference: fp32 itself when its input moves by less than the 8-bit rounding of the image
            noisy = session_features(folder / base.meta["files"]["student"], base.eval_size, noise=0.5)
            rows[name] = (len(found[0]), *agreement(base, int8.image_features, *found), agreement(base, noisy, *found)[0])
        square = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        speed = {}
        for threads in sorted({1, len(os.sched_getaffinity(0))}):
            b = {p: Bundle(folder, precision=p, verify=False, verbose=False, threads=threads) for p in ("fp32", "int8")}
            speed[threads] = interleaved_ms({p: partial(m.image_features, square, size=SIZE) for p, m in b.items()},
                                            args.runs)
        print(f"\nint8 vs fp32 student, {base.provider}")
        for name, (n, agree, cos, noisy) in rows.items():
            verdict = "met" if agree >= 0.99 else "NOT met"
            print(f"  {name:<9} val {n:>4} images: labels agree {100 * agree:6.2f}%  feature cos {cos:.5f}  "
                  f"(target >= 99%: {verdict}; fp32 with +-0.5 grey-level input noise agrees {100 * noisy:.2f}%)")
        for threads, ms in speed.items():
            print(f"  {SIZE} x {SIZE}, {threads} thread(s): fp32 {ms['fp32']:7.1f} ms  int8 {ms['int8']:7.1f} ms  "
                  f"int8 {ms['fp32'] / ms['int8']:.2f}x faster")
        best = {p: min(ms[p] for ms in speed.values()) for p in ("fp32", "int8")}
        print(f"  best of both thread counts: fp32 {best['fp32']:.1f} ms, int8 {best['int8']:.1f} ms, "
              f"int8 {best['fp32'] / best['int8']:.2f}x faster")
        if args.sweep:
            sets = {k: v for k in DATASETS if (v := val_set(k, args.sweep_images))}
            sweep(folder, args.checkpoint, sets, work, max(5, args.runs // 2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

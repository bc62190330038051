"""The image pass of two or more models, side by side in one run: does a new default cost more per request?

    python bench/image_pass.py --model assets/default --model OLD_MODEL_FOLDER_OR_CHECKPOINT [--runs 30]
    python bench/image_pass.py --bundle NEW_BUNDLE --bundle OLD_BUNDLE      # bundles exported already


Each model is exported to a temporary fp32 bundle; `Bundle.image_features` on a 512 x 512 image and
`Bundle.classify` on 20 names (the vocabulary change) are timed in interleaved rounds (one timing of each
model per round, 1 thread; --bundle takes exported bundles as they are, e.g. one exported by an older
checkout, to compare serving code as well as models), so that the load of this shared machine falls on every model alike. Prints the
median ms of each and its ratio to the first model (issue 22: the new default's image pass may grow by at
most 10%).
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import tempfile
import time
from pathlib import Path

_spec = importlib.util.spec_from_file_location("bench_latency", Path(__file__).resolve().parent / "latency.py")
latency = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(latency)
SIZE, test_image = latency.SIZE, latency.test_image

NAMES = ["person", "dog", "cat", "car", "bicycle", "bus", "chair", "sofa", "table", "bottle",
         "pizza", "banana", "horse", "sheep", "cow", "bird", "boat", "tree", "grass", "sky"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", default=[], help="checkpoint or model folder (repeatable)")
    ap.add_argument("--bundle", action="append", default=[], help="exported bundle folder (repeatable)")
    ap.add_argument("--runs", type=int, default=30, help="interleaved rounds")
    args = ap.parse_args(argv)
    if len(args.model) + len(args.bundle) < 2:
        ap.error("give two or more --model / --bundle to compare")
    from clipteacher.export.bundle import export_bundle
    from clipteacher.runtime import Bundle

    image = test_image()
    with tempfile.TemporaryDirectory() as tmp:
        bundles = []
        for i, model in enumerate(args.model):
            out = Path(tmp) / f"b{i}"
            export_bundle(model, out, log=lambda *_: None)
            bundles.append(Bundle(out, verify=False, verbose=False, threads=1))
        bundles += [Bundle(b, verify=False, verbose=False, threads=1) for b in args.bundle]
        calls = []
        for b in bundles:
            feats = b.image_features(image, size=SIZE)  # warm-up, and the features the classifier reads
            text, bias = b.embed_text(NAMES), b.unseen_bias(NAMES)
            calls.append((lambda b=b: b.image_features(image, size=SIZE),
                          lambda b=b, f=feats, t=text, s=bias: b.classify(f, t, s, image.shape[:2])))
        times = [([], []) for _ in bundles]
        for _ in range(args.runs):
            for (image_call, names_call), (image_t, names_t) in zip(calls, times):
                for call, sink in ((image_call, image_t), (names_call, names_t)):
                    t = time.perf_counter()
                    call()
                    sink.append(1000 * (time.perf_counter() - t))
    base_image, base_names = (statistics.median(x) for x in times[0])
    print(f"{SIZE} x {SIZE} image, 1 thread, median of {args.runs} interleaved rounds")
    print("| model | image pass, ms | x first | classify 20 names, ms | x first |")
    print("|---|---|---|---|---|")
    for model, (image_t, names_t) in zip(args.model + args.bundle, times):
        im, nm = statistics.median(image_t), statistics.median(names_t)
        print(f"| {model} | {im:.1f} | {im / base_image:.2f} | {nm:.1f} | {nm / base_names:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

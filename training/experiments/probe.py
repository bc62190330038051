"""The open-vocabulary probe: does the model find an image's own name among K names it never trained on?

    python -m training.experiments.probe --checkpoint assets/default [--checkpoint OTHER ...] [--bundle DIR ...]

The probe images are 200 of the unlabelled ImageNet pool (`clipteacher.train.sources.probe_ids`, by a
hash of the file name), left out of every training run. Each is segmented with its own class name
(images.json) and K others drawn from the other ImageNet names (fixed seed per image and K); it counts as
correct when its own name wins the largest share of pixels. The teacher row is the bundle's teacher
alone (its dense tokens against the same names, no bias: the app's Compare view). Hubness: over all probe
images at the largest K, the share of pixels won by the 5 names that win most.

Everything runs on the exported ONNX bundle (the serving path), so the figures include what serving
does (gamma, hubness correction). A checkpoint is exported to a temporary bundle first.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

from clipteacher.io import read_image_file
from clipteacher.runtime import Bundle
from clipteacher.train.sources import name_hash, pool_names, probe_ids

POOL = Path("../shared/data/imagenet_samples")
KS = (9, 49)
TOP = 5  # names counted in the hubness figure


def probe_names(names: dict[str, str], file: str, k: int, seed: int = 0,
                vocabulary: list[str] | None = None) -> tuple[list[str], int]:
    """(K + 1 names in a fixed shuffled order, index of the image's own name); distractors are other
    ImageNet names (never a duplicate of the own name), drawn with a seed fixed by (seed, k, file).
    vocabulary: sorted(set(names.values())), when the caller has it already."""
    own = names[file]
    others = [n for n in (vocabulary or sorted(set(names.values()))) if n != own]
    rng = np.random.default_rng([seed, k, int(name_hash(file) * 2**32)])
    chosen = [own] + [others[i] for i in rng.choice(len(others), size=k, replace=False)]
    order = rng.permutation(len(chosen))
    return [chosen[i] for i in order], int(np.argmax(order == 0))


def winner(labels: np.ndarray, count: int) -> tuple[int, np.ndarray]:
    """(name index with the most pixels, pixels per name)."""
    pixels = np.bincount(labels.ravel(), minlength=count)
    return int(pixels.argmax()), pixels


def run_probe(bundle: Bundle, pool: Path = POOL, ks: tuple[int, ...] = KS, seed: int = 0, limit: int = 0,
              teacher: bool = True, hubness: bool | None = None) -> dict:
    """{"student": {...}, "teacher": {...}} with top1@K (percent) and hubness (top-5 share at max K, percent).

    hubness: force the bundle's hubness correction on/off for the student (None: the bundle's default)."""
    names = pool_names(pool)
    if not names:
        raise SystemExit(f"error: {pool} has no images.json naming its images")
    files = probe_ids(list(names))[: limit or None]
    vocabulary = sorted(set(names.values()))  # sorted once, not per image and K
    hub_k = max(ks)
    rows = {"student": {"correct": Counter(), "pixels": Counter()}}
    if teacher:
        rows["teacher"] = {"correct": Counter(), "pixels": Counter()}
    image_dir = pool / "images" if (pool / "images").is_dir() else pool
    for file in files:
        image = read_image_file(image_dir / file)
        features = bundle.image_features(image)
        dense = bundle.teacher_tokens(image)[1][None] if teacher else None
        for k in ks:
            chosen, own = probe_names(names, file, k, seed, vocabulary)
            text = bundle.embed_text(chosen)
            runs = {"student": (features, bundle.unseen_bias(chosen) + bundle.hubness_bias(text, hubness), "classifier")}
            if teacher:  # the teacher's tokens are D-dim cosines, whatever the student's classifier reads
                runs["teacher"] = (dense, None, "cosine")
            for row, (feats, bias, graph) in runs.items():
                labels, _ = bundle.classify(feats, text, bias, image.shape[:2], graph=graph)
                best, pixels = winner(labels, len(chosen))
                rows[row]["correct"][k] += best == own
                if k == hub_k:
                    for name, p in zip(chosen, pixels):
                        rows[row]["pixels"][name] += int(p)
    out = {}
    for row, r in rows.items():
        total = sum(r["pixels"].values())
        top = r["pixels"].most_common(TOP)
        out[row] = {**{f"top1@{k}": 100.0 * r["correct"][k] / len(files) for k in ks},
                    f"hub{TOP}@{hub_k}": 100.0 * sum(p for _, p in top) / max(total, 1),
                    "hubs": [[n, round(100.0 * p / max(total, 1), 2)] for n, p in top], "images": len(files)}
    return out


def open_bundle(checkpoint: str | None, bundle: str | None, workdir: Path) -> Bundle:
    if bundle:
        return Bundle(bundle, verbose=False)
    from clipteacher.export.bundle import export_bundle

    out = workdir / f"bundle{len(list(workdir.iterdir()))}"
    export_bundle(checkpoint, out, log=lambda *a: None)
    return Bundle(out, verbose=False)


def fmt_row(label: str, r: dict, ks=KS) -> str:
    hubs = ", ".join(f"{n} {p:.1f}" for n, p in r["hubs"])
    return (f"| {label} | " + " | ".join(f"{r[f'top1@{k}']:.1f}" for k in ks) +
            f" | {r[f'hub{TOP}@{max(ks)}']:.1f} | {hubs} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=[], help="model checkpoint (repeatable)")
    ap.add_argument("--bundle", action="append", default=[], help="exported bundle folder (repeatable)")
    ap.add_argument("--pool", default=str(POOL), help="pool folder with images.json (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", type=int, default=0, help="first N probe images only (quick looks; 0 = all 200)")
    ap.add_argument("--hubness", choices=["default", "on", "off", "both"], default="default",
                    help="the student's hubness correction (default: as the bundle says)")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    models = [("checkpoint", c) for c in args.checkpoint] + [("bundle", b) for b in args.bundle]
    if not models:
        ap.error("give --checkpoint CKPT or --bundle DIR")
    modes = {"default": [None], "on": [True], "off": [False], "both": [False, True]}[args.hubness]
    results, teacher_done = {}, False
    print(f"| model | top-1 K={KS[0]} | top-1 K={KS[1]} | top-{TOP} names' pixel share K={KS[1]} | most-winning names (%) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind, path in models:
            try:
                bundle = open_bundle(path if kind == "checkpoint" else None, path if kind == "bundle" else None, Path(tmp))
            except (OSError, ValueError) as err:
                print(f"error: {kind} {path}: {err}", file=sys.stderr)
                return 2
            for mode in modes:
                t0 = time.time()
                res = run_probe(bundle, Path(args.pool), seed=args.seed, limit=args.limit, teacher=not teacher_done,
                                hubness=mode)
                if "teacher" in res:
                    teacher_done = True
                    results["teacher"] = res.pop("teacher")
                    print(fmt_row("teacher (training-free)", results["teacher"]))
                label = path + ("" if mode is None else f" (hubness {'on' if mode else 'off'})")
                results[label] = res["student"]
                print(fmt_row(label, res["student"]) + f"  <!-- {time.time() - t0:.0f} s -->", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

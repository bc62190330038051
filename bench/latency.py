"""Latency at 512 x 512 on this machine: the exported student vs PyTorch vs the training-free ViT-B/16 path.

    python bench/latency.py                      # exports the shipped default model assets/default (+ int8, fp16)
    python bench/latency.py --checkpoint runs/msrc21/last.pt
    python bench/latency.py --untrained          # an untrained MSRC-21 student (speed only: its int8 agreement misleads)
    python bench/latency.py --bundle bundles/default   # PyTorch row needs the bundle's source checkpoint

Rows (ms per image, median of --runs runs after a warm-up):
  student ONNX fp32 / int8 / fp16   Bundle.image_features on a 512 x 512 uint8 image
  student PyTorch                   clipteacher.models.student.Student
  ViT-B/16 dense (MaskCLIP)         clipteacher.models.teachers.ClipTeacher with RANDOM open_clip ViT-B-16 weights at
                                    input 512 (1024 tokens): the training-free teacher path; speed only
  text 20 / 200 names               Bundle.embed_text on names not in the cache (tokenizer + ONNX text encoder)
  --baselines: ZegCLIP / TagCLIP    bundles of untrained ZegCLIP and TagCLIP (training/configs/zegclip_voc.yaml,
                                    tagclip_voc.yaml) around RANDOM ViT-B/16 weights, speed only: the image pass
                                    (prompted CLIP, cached per image like the student's) and the decoder on 20
                                    names (it runs on every vocabulary change, where the student's classifier is
                                    one matrix product); with each model's parameters and trainable parameters
Image rows take the faster of 1 thread and all cores: with other jobs on this CPU, all-core OpenMP
runs can be 10x slower than one thread, which would distort the ratios either way.
Variants also get their parity with the fp32 graph on a real image: mean feature cosine and the
share of pixels whose argmax label agrees. Goal (issue 5): student ONNX >= 10x faster than ViT-B/16.
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
from pathlib import Path

import numpy as np


SIZE = 512
MSRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "msrc21"
DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "assets" / "default"


def median_ms(fn, runs: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def best_torch_ms(fn, runs: int) -> tuple[float, int]:
    """(median ms, threads) at the faster of 1 thread and all cores: with other jobs on the machine,
    torch's OpenMP threads can be 10x slower than one thread, which would flatter the ONNX rows."""
    import torch

    default = torch.get_num_threads()
    best = (float("inf"), default)
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        with torch.no_grad():
            best = min(best, (median_ms(fn, runs), threads))
    torch.set_num_threads(default)
    return best


def test_image() -> np.ndarray:
    """A real MSRC-21 image resized to SIZE x SIZE (random pixels when the data is absent)."""
    import cv2

    paths = sorted((MSRC / "images").glob("*.jpg"))
    if not paths:
        return np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    image = cv2.cvtColor(cv2.imread(str(paths[len(paths) // 2])), cv2.COLOR_BGR2RGB)
    return cv2.resize(image, (SIZE, SIZE), interpolation=cv2.INTER_LINEAR)


def make_bundle(checkpoint: str | None, work: Path) -> tuple[Path, str]:
    """Export `checkpoint` (None: an untrained student with the MSRC-21 config) with int8 and fp16."""
    from clipteacher.export.bundle import export_bundle, write_untrained_checkpoint
    from clipteacher.config import load_config

    teacher = None
    if checkpoint is None:
        cfg = load_config(Path(__file__).resolve().parents[1] / "training" / "configs" / "msrc21.yaml")
        cfg.data.root = str(MSRC)
        info = json.loads((MSRC / "dataset.json").read_text()) if (MSRC / "dataset.json").is_file() else None
        classes = info["classes"] if info else ["building", "grass", "tree", "cow", "sky", "water"]
        seen = [c for c in classes if c not in (info["unseen"] if info else [])]
        checkpoint = str(work / "untrained.pt")
        teacher = write_untrained_checkpoint(cfg, classes, seen, checkpoint)
    out = work / "bundle"
    export_bundle(checkpoint, out, int8=True, fp16=True, teacher=teacher, log=lambda *_: None)
    return out, checkpoint


def count_params(model) -> tuple[int, int]:
    """(all parameters, those that train): the student trains everything; ZegCLIP only prompts and decoder."""
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder.visual."))
    return total, total - frozen


def baseline_rows(args, work: Path, image: np.ndarray, names: list[str], params: list) -> list[tuple[str, float, str]]:
    """ZegCLIP and TagCLIP bundles around a random ViT-B/16 at SIZE: image pass and 20-name decoder rows."""
    import torch

    from clipteacher.config import load_config
    from clipteacher.export.bundle import export_bundle, write_untrained_checkpoint
    from clipteacher.predictor import Segmenter
    from clipteacher.runtime import Bundle

    rows = []
    configs = Path(__file__).resolve().parents[1] / "training" / "configs"
    for label, config in (("ZegCLIP", "zegclip_voc.yaml"), ("TagCLIP", "tagclip_voc.yaml")):
        cfg = load_config(configs / config, ["teacher.clip_pretrained=random", f"data.eval_size={SIZE}",
                                             f"teacher.input_size={SIZE}"])
        classes = ["aeroplane", "bicycle", "bird", "boat", "bottle"]
        t = time.perf_counter()
        teacher = write_untrained_checkpoint(cfg, classes, classes[:3], work / f"{label}.pt")
        export_bundle(work / f"{label}.pt", work / label, teacher=teacher, log=lambda *_: None)
        print(f"exported {label} (random ViT-B/16) in {time.perf_counter() - t:.0f} s")
        del teacher
        params.append((label, count_params(Segmenter.from_checkpoint(work / f"{label}.pt").student)))
        timings = []
        for threads in sorted({1, len(os.sched_getaffinity(0))}):
            b = Bundle(work / label, verify=False, verbose=False, threads=threads)
            feats = b.image_features(image, size=SIZE)
            text = b.embed_text(names)
            bias = b.unseen_bias(names)
            unseen = bias != 0
            timings.append((median_ms(lambda: b.image_features(image, size=SIZE), max(3, args.runs // 3)),
                            median_ms(lambda: b.classify(feats, text, bias, image.shape[:2], unseen), args.runs),
                            threads))
        image_ms, _, threads = min(timings)
        _, decoder_ms, dthreads = min(timings, key=lambda r: r[1])
        rows.append((f"{label} ONNX image pass (random)", image_ms, f"{(SIZE // 16) ** 2} tokens + "
                     f"{cfg.zegclip.prompt_tokens} prompts, best at {threads} thread(s)"))
        rows.append((f"{label} ONNX decoder, 20 names", decoder_ms, f"per vocabulary change; best at {dthreads} thread(s)"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="existing bundle folder")
    parser.add_argument("--checkpoint", help=f"checkpoint or model folder to export (and time in PyTorch); "
                                             f"default: {DEFAULT_MODEL} (the bundle's source with --bundle)")
    parser.add_argument("--untrained", action="store_true",
                        help="an untrained MSRC-21 student instead (speed rows only; int8 agreement is not meaningful)")
    parser.add_argument("--baselines", action="store_true",
                        help="also export and time ZegCLIP and TagCLIP bundles (random ViT-B/16; a few minutes more)")
    parser.add_argument("--runs", type=int, default=10, help="timed runs per row (ViT-B/16: a third of it, >= 3)")
    args = parser.parse_args(argv)
    if args.untrained:
        args.checkpoint = None
    elif not args.bundle:
        args.checkpoint = args.checkpoint or str(DEFAULT_MODEL)
    if args.checkpoint and not Path(args.checkpoint).exists():
        parser.error(f"--checkpoint {args.checkpoint} not found (use --untrained for a speed-only run)")
    work = Path(tempfile.mkdtemp(prefix="latency_"))
    try:
        return run(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run(args: argparse.Namespace, work: Path) -> int:
    import torch

    from clipteacher.runtime import Bundle

    if args.bundle:
        folder = Path(args.bundle)
        checkpoint = args.checkpoint or json.loads((folder / "bundle.json").read_text())["source"]["checkpoint"]
    else:
        t = time.perf_counter()
        folder, checkpoint = make_bundle(args.checkpoint, work)
        print(f"exported {folder} in {time.perf_counter() - t:.0f} s")

    image = test_image()
    x = np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0
    rows: list[tuple[str, float, str]] = []
    base = Bundle(folder, verbose=True)
    ref_feats = base.image_features(image, size=SIZE)
    names = base.meta["text_cache"]["names"]
    ref_labels = base.segment(image, names, size=SIZE)
    for precision in ("fp32", "int8", "fp16"):
        if f"student_{precision}" not in base.meta["files"] and precision != "fp32":
            rows.append((f"student ONNX {precision}", float("nan"), "not in the bundle"))
            continue
        timings = []
        for threads in sorted({1, len(os.sched_getaffinity(0))}):  # the faster, as for PyTorch (see best_torch_ms)
            b = Bundle(folder, precision=precision, verify=False, verbose=False, threads=threads)
            timings.append((median_ms(lambda: b.image_features(image, size=SIZE), args.runs), threads))
        ms, threads = min(timings)  # image_features includes the uint8 -> float input
        note = f"best at {threads} thread(s)"
        if precision != "fp32":
            f = b.image_features(image, size=SIZE)
            cos = ((f * ref_feats).sum(1) / np.linalg.norm(f, axis=1) / np.linalg.norm(ref_feats, axis=1)).mean()
            agree = (b.segment(image, names, size=SIZE) == ref_labels).mean()
            note += f"; vs fp32: feature cos {cos:.4f}, labels agree {100 * agree:.2f}%"
        rows.append((f"student ONNX {precision}", ms, note))

    if Path(checkpoint).exists():  # a .pt file or a model folder
        from clipteacher.predictor import Segmenter

        student = Segmenter.from_checkpoint(checkpoint).student.eval()
        xt = torch.from_numpy(x)
        ms, threads = best_torch_ms(lambda: student(xt), args.runs)
        rows.append(("student PyTorch", ms, f"best at {threads} torch thread(s)"))
    else:
        rows.append(("student PyTorch", float("nan"), f"checkpoint {checkpoint} not found"))

    import open_clip

    from clipteacher.models.teachers import ClipTeacher

    torch.manual_seed(0)
    vit = ClipTeacher(input_size=SIZE, clip_config=open_clip.get_model_config("ViT-B-16"))
    xt = torch.from_numpy(x)
    ms, threads = best_torch_ms(lambda: vit(xt), max(3, args.runs // 3))
    rows.append(("ViT-B/16 dense (MaskCLIP, random)", ms, f"{(SIZE // 16) ** 2} tokens, best at {threads} torch thread(s)"))
    del vit

    from clipteacher.models.teachers import imagenet_class_names

    imagenet = imagenet_class_names()
    text20, bias20 = base.embed_text(imagenet[:20]), base.unseen_bias(imagenet[:20])
    rows.append(("student ONNX classifier, 20 names", median_ms(
        lambda: base.classify(ref_feats, text20, bias20, image.shape[:2]), args.runs), "per vocabulary change"))
    params = []
    if Path(checkpoint).exists():
        params.append(("student", count_params(student)))
    if args.baselines:
        rows += baseline_rows(args, work, image, imagenet[:20], params)
    for n in (20, 200):
        def embed():
            base.clear_text_cache()
            base.embed_text(imagenet[:n])
        rows.append((f"text {n} names ({base.teacher_kind})", median_ms(embed, max(3, args.runs // 2)),
                     f"{len(base.templates)} template(s)"))

    if params:
        print("\nparameters (total / trainable in training):")
        for name, (total, trainable) in params:
            print(f"  {name:<10} {total / 1e6:8.2f} M / {trainable / 1e6:8.2f} M")
    print(f"\nlatency at {SIZE} x {SIZE}, provider {base.provider}, median ms per image")
    width = max(len(r[0]) for r in rows)
    for name, ms, note in rows:
        print(f"  {name:<{width}}  {ms:9.1f}  {note}")
    ms = {name: v for name, v, _ in rows}
    vit_ms = ms["ViT-B/16 dense (MaskCLIP, random)"]
    print("\nratios (ViT-B/16 dense / student):")
    for name in [r[0] for r in rows if r[0].startswith("student") and "classifier" not in r[0]]:
        if ms[name] == ms[name]:  # not nan
            print(f"  {name:<{width}}  {vit_ms / ms[name]:6.1f}x")
    fp32 = ms["student ONNX fp32"]
    for label in ("ZegCLIP", "TagCLIP"):
        if f"{label} ONNX image pass (random)" in ms:
            print(f"{label} / student: image pass {ms[f'{label} ONNX image pass (random)'] / fp32:.1f}x, vocabulary "
                  f"change (20 names) {ms[f'{label} ONNX decoder, 20 names'] / ms['student ONNX classifier, 20 names']:.1f}x")
    verdict = "met" if vit_ms / fp32 >= 10 else "NOT met"
    print(f"goal student ONNX >= 10x faster than ViT-B/16 dense: {verdict} ({vit_ms / fp32:.1f}x)")
    if ms.get("student PyTorch", float("nan")) == ms.get("student PyTorch"):
        print(f"student ONNX fp32 vs PyTorch: {ms['student PyTorch'] / fp32:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Score a checkpoint on a split of any dataset folder in the msrc21 layout (or VOC / COCO-Stuff / Context).

    python training/evaluate.py --checkpoint CKPT --data DIR [--split val] [--gamma G] [--out FILE]

Prints pAcc, mIoU(S), mIoU(U), hIoU and per-class IoU, and writes them as JSON to --out, by default
eval_<dataset>_<split>.json in the checkpoint's run folder when it is one (a config.yaml beside it, as
training writes) and in the current directory otherwise (so scoring a shipped model leaves assets/ clean).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from clipteacher.io import DatasetError
from clipteacher.models.weights import WeightsError
from clipteacher.train.datasets import DATASET_KINDS


def default_output(checkpoint: Path, name: str) -> Path:
    """Inside the checkpoint's run folder when it is one (training wrote config.yaml there), else here."""
    return checkpoint.with_name(name) if (checkpoint.parent / "config.yaml").is_file() else Path(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipteacher-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--data", required=True, help="dataset root folder")
    parser.add_argument("--kind", default="folder", choices=DATASET_KINDS, help="dataset layout")
    parser.add_argument("--split", default="val")
    parser.add_argument("--gamma", type=float, default=None, help="unseen bias (default: the checkpoint's)")
    parser.add_argument("--size", type=int, default=None, help="short side at test time (default: config eval_size)")
    parser.add_argument("--window", type=int, default=0, help="sliding-window side for large images (0 = whole image)")
    parser.add_argument("--out", default=None, help="JSON output path")
    parser.add_argument("--absent", default="mmseg", choices=["mmseg", "gt_only"],
                        help="mmseg: a class predicted but absent from the ground truth counts with IoU 0 (default); "
                             "gt_only: the old rule, only ground-truth classes are averaged")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the student runs")
    parser.add_argument("--hubness", type=float, default=0.0, metavar="STRENGTH",
                        help="hubness correction as served (Bundle.hubness_bias): subtract STRENGTH x logit scale x "
                             "(name . mean reference feature); 0 = off (default); the app's strength is 1")
    parser.add_argument("--distractors", type=int, default=0, metavar="N",
                        help="also offer N ImageNet class names (fixed seed, none equal to a dataset class) that no "
                             "pixel is labelled with: pixels they win are errors (what many typed names do to a "
                             "model); reports distractor_share too")
    args = parser.parse_args(argv)
    if not 0 <= args.distractors <= 900:
        parser.error("--distractors must be in 0..900")
    try:
        from clipteacher.train.datasets import build_dataset
        from clipteacher.train.engine import evaluate, resolve_device
        import torch

        from clipteacher.predictor import Segmenter, unseen_bias
        from clipteacher.prompts import outside_vocabulary

        folder = build_dataset(args.kind, args.data, args.split)
        folder.validate()
        device = resolve_device(args.device, "--device")
        seg = Segmenter.from_checkpoint(args.checkpoint, device)
        classes = list(folder.info.classes)
        names = classes + distractor_names(classes, args.distractors)
        gamma = seg.gamma if args.gamma is None else args.gamma
        text = seg.text_embeddings(names)
        bias = unseen_bias(names, seg.vocabulary, gamma)
        if args.hubness:
            bias = bias + hubness_bias(seg, text, args.hubness)
        result = evaluate(seg.student, folder, text, bias,
                          seg.cfg.student.logit_scale, args.size or seg.cfg.data.eval_size, args.window, device=device,
                          absent=args.absent, unseen=torch.tensor(outside_vocabulary(names, seg.vocabulary)))
    except (DatasetError, FileNotFoundError, ValueError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    result.update({"checkpoint": str(args.checkpoint), "data": str(args.data), "split": args.split, "gamma": gamma,
                   "hubness": args.hubness,
                   "absent": args.absent, "seen_in_training": seg.vocabulary})
    if args.distractors:  # name -> share of the labelled pixels it won, largest first
        wins = dict(zip(names[len(classes):], result.pop("distractor_wins")))
        result["distractors"] = dict(sorted(wins.items(), key=lambda kv: -kv[1]))
    out = Path(args.out) if args.out else default_output(Path(args.checkpoint), f"eval_{folder.info.name}_{args.split}.json")
    out.write_text(json.dumps(result, indent=2))
    print(f"{folder.info.name}/{args.split} ({len(folder)} images, gamma {gamma}"
          + (f", hubness {args.hubness:g}" if args.hubness else "") + "): " + "  ".join(
        f"{k} {result[k]:.2f}" for k in ("pAcc", "mIoU(S)", "mIoU(U)", "hIoU"))
        + (f"  with {args.distractors} distractor names: they won {result['distractor_share']:.2f}% of the pixels ("
           + ", ".join(f"{n} {v:.1f}" for n, v in list(result["distractors"].items())[:5]) + ")"
           if args.distractors else ""))
    for name, iou in result["per_class"].items():
        tag = "unseen" if name in folder.info.unseen else "seen"
        print(f"  {name:20s} {tag:6s} " + ("  n/a" if iou is None else f"{iou:5.1f}"))
    print(f"wrote {out}")
    return 0


def distractor_names(classes: list[str], n: int, seed: int = 0) -> list[str]:
    """n ImageNet class names, drawn with a fixed seed, none equal to a class of the dataset (ignoring case)."""
    import random

    from clipteacher.models.teachers import imagenet_class_names

    taken = {c.strip().lower() for c in classes}
    pool = [name for name in dict.fromkeys(imagenet_class_names()) if name.strip().lower() not in taken]
    return random.Random(seed).sample(pool, n)


def hubness_bias(seg, text, strength: float):
    """C: the served hubness correction for these class embeddings (C x D), from the model's stored reference
    or, like clipteacher-export, from the mean student feature over training images."""
    import torch

    mean = seg.feature_mean
    if mean is None:
        from clipteacher.export.bundle import feature_mean, reference_images

        images, origin = reference_images(seg.cfg)
        if not images:
            raise ValueError("--hubness: the model has no hubness reference and its training images are not here")
        import copy

        # on a CPU copy: feature_mean feeds CPU tensors, and the student being evaluated stays on its device
        mean = torch.from_numpy(feature_mean(copy.deepcopy(seg.student).cpu().eval(), images))
        print(f"hubness reference: {origin}", file=sys.stderr)
    return -strength * seg.cfg.student.logit_scale * (text.float().cpu() @ mean.float().cpu())


if __name__ == "__main__":
    sys.exit(main())

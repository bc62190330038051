"""The zero-shot ablation runner shared by every benchmark (`training.experiments.msrc21`, `.siftflow`).

    python -m training.experiments.<benchmark> [--iters 200] [--rows full,no_glm,...] [--resume] [overrides ...]

A benchmark (`Benchmark`) names its config, data, pseudo-unseen classes and figure images; the rows are
the same for all: full (NEL + GLM + PLM), no_glm, no_plm, seen_only (NEL alone), supervised (every class
labelled, the upper bound), teacher (the teacher's own training-free dense prediction), full_pool (full
plus the unlabelled image pool, beyond the paper), full_online (full with the teacher run on every crop
instead of the cache), full_dense (full plus dense distillation on unlabelled pixels, beyond the paper), and
full_long / full_dense_long (full / full_dense on a 6x schedule), full_dense_vocab (full_dense plus vocabulary
distillation over the ImageNet and dataset names, beyond the paper); and the seed baselines maskclip_plus
(the student on the teacher's dense pseudo labels, then self-training; transductive), zegclip and tagclip
(CLIP at inference with deep prompts and a decoder: `teacher.clip_pretrained=<weights>` on a machine that has them).

gamma is chosen without unseen labels and without the images that are scored (docs/DESIGN.md, unseen
bias): for every zero-shot row a calibration model is trained with the benchmark's pseudo-unseen classes
also hidden (`data.holdout`) and a hash-chosen slice of `train` held aside (`data.heldout_fraction`,
never trained on by that model); on that held-aside slice hIoU between the remaining seen and the
pseudo-unseen classes is measured for every gamma (real unseen pixels ignored), and gamma is the value
nearest 0 within one bootstrap standard error of the best (`choose_gamma`). The row's own model then
trains on all of `train`. `--rescore` chooses gamma again from the calibration models it finds. The real
unseen labels are used only for the final scores on `val` and for an oracle sweep that is reported as such.

Writes <out>/<row>_result.json per row, <out>/results.json, the benchmark's section of docs/RESULTS.md
(between its begin/end markers; text outside them is kept), docs/<name>_predictions.png and, for the
full method's row (`SHIPPED`), an fp16 model folder assets/benchmarks/<name>_zeroshot/. The app's default model is
made by training.experiments.default_model.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from dataclasses import dataclass, field

from clipteacher.checkpoint import inference_copy, load_checkpoint, save_model_folder
from clipteacher.config import load_config, save_config
from clipteacher.train.datasets import build_dataset
from clipteacher.train.engine import train
from clipteacher.train.metrics import ConfusionMatrix, summarize
from clipteacher.predictor import Segmenter
from clipteacher.models.teachers import build_teacher
from clipteacher.train.gamma import GAMMAS, choose_gamma, gamma_confusions, sweep_gamma
from clipteacher.train.sources import heldout_split

POOL = "{pool}"  # stands for the --pool folder in row overrides
NO_STUDENT_LOSSES = ["loss.glm_weight=0", "loss.ce_weight=0", "loss.gen_weight=0"]  # GLM and PLM are CLIPTeacher's
ROWS = {
    "full": [],
    "no_glm": ["loss.glm_weight=0"],
    "no_plm": ["loss.ce_weight=0", "loss.gen_weight=0"],
    "seen_only": ["loss.glm_weight=0", "loss.ce_weight=0", "loss.gen_weight=0"],
    "supervised": ["data.zero_shot=false"],
    "teacher": None,
    "full_pool": ["data.extra=[{kind: images, root: " + POOL + ", weight: 0.5}]"],  # 1/3 of each batch from the pool
    "full_online": ["teacher.mode=online"],
    "full_dense": ["loss.dense_weight=1"],  # beyond the paper: student pulled to the teacher's dense tokens
    "full_long": ["train.iters=1200"],  # the full row on a 6x schedule (rare SIFT Flow classes need more steps)
    "full_dense_long": ["loss.dense_weight=1", "train.iters=1200"],  # full_dense on the same 6x schedule
    "full_dense_vocab": ["loss.dense_weight=1", "loss.vocab_weight=1"],  # full_dense plus vocabulary distillation
    # the seed baselines (docs/METHOD.md#baselines). MaskCLIP+ runs with either teacher (transductive: the
    # unseen names label pixels); ZegCLIP and TagCLIP run CLIP at inference, so they need CLIP weights.
    "maskclip_plus": ["method=maskclip_plus"] + NO_STUDENT_LOSSES + ["loss.focal_weight=0", "loss.dice_weight=0"],
    # guided learning only (MaskCLIP Table 3's middle row): on a 200-step schedule the self-training switch at a
    # tenth comes after 20 steps, before the student knows the unseen names
    "maskclip_plus_guided": ["method=maskclip_plus", "maskclip.self_train_after=1"] + NO_STUDENT_LOSSES
                            + ["loss.focal_weight=0", "loss.dice_weight=0"],
    "zegclip": ["method=zegclip", "teacher.kind=clip"] + NO_STUDENT_LOSSES + ["loss.focal_weight=100",
                "optim.lr=0.0002", "optim.poly_power=0.9", "train.gamma=0"],
    "tagclip": ["method=zegclip", "teacher.kind=clip", "zegclip.trusty=true", "zegclip.cls_weight=1"]
               + NO_STUDENT_LOSSES + ["optim.lr=0.0002", "optim.poly_power=0.9", "train.gamma=0"],
}
SHIPPED = ("full_dense_long", "full_long", "full_dense", "full")  # benchmark checkpoint: the first row that has run
METRICS = ("pAcc", "mIoU(S)", "mIoU(U)", "hIoU")


@dataclass
class Benchmark:
    """What differs between benchmarks; everything else is this module."""

    name: str  # short name: output folders, RESULTS.md section, figure and checkpoint names
    title: str  # section heading in docs/RESULTS.md
    config: str  # training config every row starts from
    data: str  # default dataset folder (msrc21 layout)
    holdout: list[str]  # pseudo-unseen seen classes hidden from the calibration model (choose gamma)
    figure_ids: list[str]  # val images shown in the prediction figure
    heldout_fraction: float  # share of train held aside from the calibration model, gamma chosen there
    default_rows: list[str]  # rows run when --rows is not given
    notes: list[str] = field(default_factory=list)  # lines under the section's table (data description)


@torch.no_grad()
def teacher_predictions(cfg, folder, figure_ids: list[str]) -> tuple[dict, dict]:
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
        if folder.ids[i] in figure_ids:
            preds[folder.ids[i]] = pred
    return summarize(cm.matrix, info.classes, info.unseen), preds


def colorize(label: np.ndarray, palette: list[list[int]]) -> np.ndarray:
    pal = np.zeros((256, 3), dtype=np.uint8)
    pal[: len(palette)] = palette
    pal[255] = (0, 0, 0)
    return pal[label]


def prediction_figure(folder, columns: dict[str, dict[str, np.ndarray]], path: Path, figure_ids: list[str]) -> None:
    """Grid: one row per val image; columns image, ground truth, then each experiment row."""
    info = folder.info
    tile = 160
    names = ["image", "ground truth"] + list(columns)
    ids = [i for i in figure_ids if i in folder.ids]
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


def predict_ids(seg: Segmenter, folder, gamma: float, figure_ids: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for sid in figure_ids:
        if sid in folder.ids:
            image = folder.read_image(folder.ids.index(sid))
            out[sid] = seg.predict(image, list(folder.info.classes), gamma=gamma).numpy()
    return out


def train_row(cfg, args) -> float | None:
    """Train (or, with --resume, continue or skip a finished run); returns the wall time spent here
    (None for a run found finished: it was timed elsewhere)."""
    last = Path(cfg.train.out_dir) / "last.pt"
    resume = None
    if args.resume and last.is_file():
        if load_checkpoint(last)["step"] >= cfg.train.iters:
            return None
        resume = "auto"
    start = time.time()
    train(cfg, resume=resume, verbose=args.verbose)
    return time.time() - start


def subset(folder, indices: list[int]):
    """The same reader restricted to `indices` of its split."""
    part = copy.copy(folder)
    part.ids = [folder.ids[i] for i in indices]
    return part


def calibration_dir(bench: Benchmark, out: Path, name: str, holdout: list[str]) -> Path:
    # Another pseudo-unseen set means another calibration model: its own folder, the row's result replaced.
    return out / (f"{name}_calibration" + ("" if holdout == bench.holdout else "_" + "_".join(holdout)))


def calibrate(record: dict, checkpoint: Path, holdout: list[str], args, val) -> float:
    """gamma by the one-standard-error rule on the held-aside train slice the calibration model (at
    `checkpoint`) never trained on, scored over the seen classes with `holdout` as pseudo-unseen; the
    sweep goes into `record`."""
    seg = Segmenter.from_checkpoint(checkpoint)
    train_set = build_dataset("folder", args.data, "train")
    # The slice this model never trained on, from its own config (a --rescore may pass another fraction).
    held = subset(train_set, heldout_split(train_set.ids, seg.cfg.data.heldout_fraction)[1])
    classes = list(val.info.seen)
    per_image = np.stack(list(gamma_confusions(seg, held, classes, seg.vocabulary, GAMMAS)))
    gamma, sweep = choose_gamma(per_image, GAMMAS, classes, holdout)
    record.update(calibration=sweep, calibration_images=len(held), holdout=holdout, gamma_rule="one_se")
    return gamma


def run_row(bench: Benchmark, name: str, overrides: list[str], args, out: Path, val) -> dict:
    base = [f"train.iters={args.iters}", "train.val_every=0", f"train.ckpt_every={min(50, args.iters)}",
            f"teacher.cache_dir={out / 'teacher_cache'}", f"data.root={args.data}"] + list(args.overrides)
    overrides = [o.replace(POOL, args.pool) for o in overrides]
    record: dict = {"overrides": overrides, "iters": args.iters}
    zero_shot = "data.zero_shot=false" not in overrides
    if zero_shot:
        holdout = args.holdout.split(",")  # checked in main before any row trains
        cal = load_config(bench.config, base + overrides + [f"train.out_dir={calibration_dir(bench, out, name, holdout)}",
                                                            f"data.holdout={json.dumps(holdout)}",
                                                            f"data.heldout_fraction={args.heldout_fraction}"])
        record["calibration_seconds"] = train_row(cal, args)
        gamma = calibrate(record, Path(cal.train.out_dir) / "last.pt", holdout, args, val)
    else:
        gamma = 0.0  # every class is in the training vocabulary: gamma has nothing to act on
    cfg = load_config(bench.config, base + overrides + [f"train.out_dir={out / name}", f"train.gamma={gamma}"])
    record["train_seconds"] = train_row(cfg, args)
    record["iters"] = cfg.train.iters  # a row may override the schedule
    save_config(cfg, out / name / "config.yaml")
    return score_row(record, out / name / "last.pt", gamma, val, bench.figure_ids)


def score_row(record: dict, checkpoint: Path, gamma: float, val, figure_ids: list[str]) -> dict:
    """Final scores at the chosen gamma over all classes (unseen = the data set's), the oracle sweep, the figure."""
    seg = Segmenter.from_checkpoint(checkpoint)
    classes = list(val.info.classes)
    oracle = sweep_gamma(seg, val, classes, seg.vocabulary, sorted(set(GAMMAS + [gamma])), list(val.info.unseen))
    record.update(gamma=gamma, metrics=oracle[gamma],
                  oracle={str(g): {k: oracle[g][k] for k in ("mIoU(S)", "mIoU(U)", "hIoU")} for g in oracle})
    record["figure"] = predict_ids(seg, val, gamma, figure_ids)
    return record


def fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.1f}"


def section(bench: Benchmark, results: dict, args) -> str:
    """This benchmark's part of docs/RESULTS.md: the table, the calibration note, the figure, the oracle sweep."""
    command = " ".join(["python -m training.experiments." + bench.name, f"--iters {args.iters}"] + list(args.overrides))
    lines = [f"## {bench.title}", "",
             f"Produced by `{command}` (rows may run in separate processes with `--rows`; {time.strftime('%Y-%m-%d')}), "
             f"config `{bench.config}` plus the per-row overrides below; machine: {platform.machine()}, "
             f"{os.cpu_count()} CPU cores, no GPU (Python {platform.python_version()}, torch {torch.__version__}). "
             "Training times are wall-clock and depend on what else shared the cores.", ""] + bench.notes + [
             "", "| row | overrides | gamma | pAcc | mIoU(S) | mIoU(U) | hIoU | train time |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["metrics"]
        t = "–" if r.get("train_seconds") is None else f"{r['train_seconds'] / 60:.1f} min"
        ov = "training-free" if r.get("overrides") is None else (" ".join(f"`{o}`" for o in r["overrides"]) or "–")
        if r.get("holdout", bench.holdout) != bench.holdout:  # calibrated on other pseudo-unseen classes
            ov = (ov if ov != "–" else "") + f" `--holdout {','.join(r['holdout'])}`"
        lines.append(f"| {name} | {ov} | {r.get('gamma', '–')} | " + " | ".join(fmt(m[k]) for k in METRICS) + f" | {t} |")
    lines += ["", f"gamma is chosen per row by a calibration model trained with the pseudo-unseen classes "
              f"{', '.join(bench.holdout)} (unless the row names its `--holdout`) also hidden and "
              f"{args.heldout_fraction:.0%} of `train` held aside "
              "(hash of the image id). On that held-aside slice its hIoU (remaining seen vs pseudo-unseen) is measured "
              "for every gamma, and gamma is the value nearest 0 whose hIoU is within one bootstrap standard error "
              "(200 resamples of the images) of the best gamma's (the one-standard-error rule; table below). "
              "No unseen label and no val image is used to choose it. Training time excludes the "
              "calibration model (same cost again). Means follow MMSeg: a class predicted but absent from the "
              "ground truth counts with IoU 0.", "",
              "| row | calibration images | best gamma | its hIoU ± SE | chosen gamma | its hIoU |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        c = r.get("calibration", {})
        if "best" in c:
            best, chosen = c[str(c["best"])], c[str(r["gamma"])]
            lines.append(f"| {name} | {r['calibration_images']} | {c['best']} | {fmt(best['hIoU'])} ± {fmt(c['se'])} | "
                         f"{r['gamma']} | {fmt(chosen['hIoU'])} |")
    lines += ["",
              f"![predictions]({bench.name}_predictions.png)", "",
              "Predictions on val images; classes marked * in the legend are unseen.", "",
              "Oracle gamma sweep (uses unseen labels: for analysis only, not for selection):", "",
              "| row | " + " | ".join(f"γ={g}" for g in GAMMAS) + " |", "|---|" + "---|" * len(GAMMAS)]
    for name, r in results.items():
        if "oracle" in r:
            lines.append(f"| {name} hIoU | " + " | ".join(fmt(r["oracle"].get(str(g), {}).get("hIoU"))
                                                         for g in GAMMAS) + " |")
    return "\n".join(lines) + "\n"


def write_section(path: Path, name: str, text: str) -> None:
    """Replace the text between this benchmark's markers in `path` (appended when absent); the rest stays."""
    begin, end = f"<!-- begin {name}: written by training/experiments -->", f"<!-- end {name} -->"
    old = path.read_text() if path.exists() else "# Results\n"
    block = f"{begin}\n{text}{end}"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(new)


def main(bench: Benchmark, argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m training.experiments.{bench.name}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=300)
    parser.add_argument("--rows", default=",".join(bench.default_rows), help=f"any of {', '.join(ROWS)}")
    parser.add_argument("--data", default=bench.data)
    parser.add_argument("--pool", default="../shared/data/imagenet_samples", help="unlabelled image folder (full_pool row)")
    parser.add_argument("--heldout-fraction", type=float, default=bench.heldout_fraction,
                        help="share of train the calibration model never trains on; gamma is chosen there")
    parser.add_argument("--holdout", default=",".join(bench.holdout),
                        help="pseudo-unseen classes of the calibration models, comma-separated (seen classes)")
    parser.add_argument("--out", default=f"runs/{bench.name}_experiments")
    parser.add_argument("--docs", default="docs")
    parser.add_argument("--assets", default="assets")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--resume", action="store_true", help="skip rows with a result file; continue unfinished trainings")
    parser.add_argument("--report-only", action="store_true", help="only rebuild docs and checkpoints from finished rows")
    parser.add_argument("--rescore", action="store_true", help="re-evaluate the --rows' existing checkpoints, gamma chosen again (no training)")
    parser.add_argument("overrides", nargs="*", help="extra config overrides for every row")
    args = parser.parse_args(argv)
    out, docs = Path(args.out), Path(args.docs)
    out.mkdir(parents=True, exist_ok=True)
    docs.mkdir(parents=True, exist_ok=True)
    val = build_dataset("folder", args.data, "val")
    rows = [] if args.report_only else args.rows.split(",")
    # Bad arguments are answered before the first row trains, not hours later when a row reaches them.
    unknown_rows = [n for n in rows if n not in ROWS]
    if unknown_rows:
        raise SystemExit(f"unknown row '{unknown_rows[0]}'; rows: {', '.join(ROWS)}")
    unknown = sorted(set(args.holdout.split(",")) - set(val.info.seen))
    if unknown:
        raise SystemExit(f"--holdout: {', '.join(unknown)} not seen classes of {args.data}")
    reported = False  # a report after a row reads every row's result file: enough at the end
    for name in rows:
        if args.resume and (out / f"{name}_result.json").exists():
            print(f"== {name}: done already ({out / f'{name}_result.json'})", flush=True)
            continue
        print(f"== {name}", flush=True)
        if ROWS[name] is None:
            metrics, preds = teacher_predictions(load_config(bench.config, list(args.overrides)), val, bench.figure_ids)
            record = {"overrides": None, "metrics": metrics, "figure": preds}
        elif args.rescore:
            if not (out / f"{name}_result.json").is_file():
                raise SystemExit(f"--rescore {name}: no result at {out / f'{name}_result.json'}; train the row first")
            old = json.loads((out / f"{name}_result.json").read_text())
            gamma = old["gamma"]
            if "data.zero_shot=false" not in old["overrides"]:  # choose gamma again, by today's rule
                holdout = old.get("holdout", bench.holdout)  # results from before the holdout was recorded
                cal = calibration_dir(bench, out, name, holdout) / "last.pt"
                if not cal.is_file():
                    raise SystemExit(f"--rescore {name}: no calibration model at {cal}")
                gamma = calibrate(old, cal, holdout, args, val)
            record = score_row(old, out / name / "last.pt", gamma, val, bench.figure_ids)
        else:
            record = run_row(bench, name, ROWS[name], args, out, val)
        # One file per row, so rows can run in separate processes and the report gathers them.
        np.savez_compressed(out / f"{name}_figure.npz", **record.pop("figure"))
        (out / f"{name}_result.json").write_text(json.dumps(record, indent=1))
        m = record["metrics"]
        print(f"{name}: " + " ".join(f"{k} {m[k]:.1f}" for k in METRICS), flush=True)
        report(bench, args, val)  # after every row, so a long background run shows what it has so far
        reported = True
    if not reported:
        report(bench, args, val)


def report(bench: Benchmark, args, val) -> None:
    """results.json, the figure, the RESULTS.md section and the fp16 full-row checkpoint from the finished rows."""
    out, docs = Path(args.out), Path(args.docs)
    ordered = {n: json.loads((out / f"{n}_result.json").read_text()) for n in ROWS if (out / f"{n}_result.json").exists()}
    (out / "results.json").write_text(json.dumps(ordered, indent=1))
    figures = {n: dict(np.load(out / f"{n}_figure.npz")) for n in ordered}
    prediction_figure(val, figures, docs / f"{bench.name}_predictions.png", bench.figure_ids)
    write_section(docs / "RESULTS.md", bench.name, section(bench, ordered, args))
    # The benchmark checkpoint is the full method's row: the longest schedule that has run, with dense
    # distillation when that row has run (on both benchmarks it is the better zero-shot row, docs/RESULTS.md).
    shipped = next((n for n in SHIPPED if n in ordered and (out / n / "last.pt").exists()), None)
    if shipped:
        small = Path(args.assets) / "benchmarks" / f"{bench.name}_zeroshot"
        card = (f"# Zero-shot benchmark model: `{small.name}`\n\nThe {shipped} row of {bench.title} "
                f"(docs/RESULTS.md), gamma {ordered[shipped]['gamma']} (one-standard-error rule on a held-aside slice). "
                f"See [../README.md](../README.md).\n")
        save_model_folder(inference_copy(load_checkpoint(out / shipped / "last.pt"), ordered[shipped]["gamma"]), small,
                          card, half=True, replace=True)
        print(f"zero-shot benchmark model ({shipped} row) -> {small}")
    print(f"wrote {docs / 'RESULTS.md'}")

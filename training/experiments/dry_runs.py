"""Full-size dry runs of paper configs on this CPU, before GPUs are rented (docs/RESULTS.md, Baselines).

    python -m training.experiments.dry_runs                                 # every baseline config, synthetic data
    python -m training.experiments.dry_runs zegclip_voc tagclip_voc --data /data/VOCdevkit/VOC2012

Each config runs `clipteacher.train.engine.dry_run` at its real sizes (CLIP ViT-B/16 at 512 px, its decoder,
prompts, class lists, templates, batch and student backbone) with `teacher.clip_pretrained=random`: 2 steps, a
checkpoint, a resume, one validation on 2 val images. Without --data each dataset is a synthetic one in its
official layout (2 train and 2 val images of 512 x 512, `write_synthetic_layout`), so the check needs no
download. Prints one JSON line per config (wall seconds and the validation summary) and appends it to
<out>/results.jsonl; the dry run's checkpoints are removed afterwards (a ViT-B/16 checkpoint is large).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from clipteacher.config import load_config
from clipteacher.train.datasets import write_synthetic_layout
from clipteacher.train.engine import dry_run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
BASELINES = ["zegclip_voc", "tagclip_voc", "maskclip_plus_voc", "zegclip_context", "zegclip_coco_stuff",
             "tagclip_coco_stuff", "maskclip_plus_context", "maskclip_plus_coco_stuff"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", default=BASELINES, help="config names in training/configs")
    parser.add_argument("--data", help="a real dataset root for every config (default: synthetic layouts)")
    parser.add_argument("--out", default="runs/dry_runs")
    args = parser.parse_args(argv)
    out = Path(args.out)
    for name in args.configs:
        path = CONFIGS / f"{name}.yaml"
        if not path.is_file():
            parser.error(f"no config {path}")
        kind = load_config(path).data.kind
        root = Path(args.data) if args.data else out / "data" / kind
        if not args.data and not root.exists():
            write_synthetic_layout(kind, root, h=512, w=512)
        cfg = load_config(path, [f"data.root={root}", f"train.out_dir={out / name}", "teacher.clip_pretrained=random",
                                 "data.num_workers=0"])
        start = time.perf_counter()
        metrics = dry_run(cfg, verbose=False)
        record = {"config": name, "seconds": round(time.perf_counter() - start, 1),
                  **{k: round(metrics[k], 2) for k in ("pAcc", "mIoU(S)", "mIoU(U)", "hIoU")}}
        print(json.dumps(record), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        shutil.rmtree(out / name / "dry_run", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

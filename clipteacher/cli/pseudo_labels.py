"""Look at PLM pseudo labels: K-Means clusters per window size, the fused regions and an overlay.

    python training/pseudo_labels.py --image IMG [--label LBL] --out DIR
    python training/pseudo_labels.py --data DIR --split val [--limit 8] --out DIR

The teacher sees the whole image (as in cached mode). With a label, clustering is restricted to
its ignored area, as in training (with --data, unseen-class pixels count as ignored, as in
zero-shot training); without one, every token is clustered. Writes per image:
<id>_k<k>.png for each window, <id>_fused.png, <id>_overlay.png and <id>_panel.png (all of
them side by side with a legend of region sizes). The Gradio app calls the same functions.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from clipteacher.pseudo import regions_for_image, vis as pseudo_vis
from clipteacher.config import Config, ConfigError, apply_overrides


def write_views(out: Path, name: str, image: np.ndarray, maps: list[np.ndarray], fused: np.ndarray,
                windows, label: np.ndarray | None) -> Path:
    """Save the per-window maps, fused map, overlay and panel for one image; returns the panel path."""
    size = (image.shape[1], image.shape[0])
    for k, m in zip(windows, maps):
        Image.fromarray(pseudo_vis.colorize(m)).resize(size, Image.NEAREST).save(out / f"{name}_k{k}.png")
    Image.fromarray(pseudo_vis.colorize(fused)).resize(size, Image.NEAREST).save(out / f"{name}_fused.png")
    Image.fromarray(pseudo_vis.overlay(image, fused)).save(out / f"{name}_overlay.png")
    panel = out / f"{name}_panel.png"
    Image.fromarray(pseudo_vis.pseudo_label_panel(image, maps, fused, windows, label)).save(panel)
    return panel


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipteacher-pseudo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", help="one image file")
    parser.add_argument("--label", help="its label PNG (class ids, 255 = ignore)")
    parser.add_argument("--data", help="dataset folder (msrc21 layout) instead of --image")
    parser.add_argument("--split", default="val")
    parser.add_argument("--limit", type=int, default=8, help="images from the split (0 = all)")
    parser.add_argument("--out", required=True)
    parser.add_argument("overrides", nargs="*", help="teacher.* / plm.* overrides, e.g. plm.windows=[3,7]")
    args = parser.parse_args(argv)
    try:
        cfg = apply_overrides(Config(), args.overrides)
        if (args.image is None) == (args.data is None):
            raise ConfigError("give either --image or --data")
        jobs = []  # (name, image, label or None)
        if args.image:
            from clipteacher.io import read_image_file, read_label_file

            image = read_image_file(Path(args.image))
            label = read_label_file(Path(args.label)) if args.label else None
            if label is not None and label.shape != image.shape[:2]:
                raise ValueError(f"label {args.label} is {label.shape[1]}x{label.shape[0]}, image is "
                                 f"{image.shape[1]}x{image.shape[0]}")
            jobs.append((Path(args.image).stem, image, label))
        else:
            from clipteacher.train.datasets import build_dataset, zero_shot_label

            folder = build_dataset(cfg.data.kind, args.data, args.split)
            folder.validate(check_labels=False)
            n = len(folder) if args.limit <= 0 else min(args.limit, len(folder))
            # As in zero-shot training: unseen-class pixels are part of the ignored region.
            jobs = [(folder.ids[i], folder.read_image(i), zero_shot_label(folder.read_label(i), folder.info))
                    for i in range(n)]
        import torch
        from tqdm import tqdm

        from clipteacher.predictor import to_tensor
        from clipteacher.models.teachers import build_teacher

        teacher = build_teacher(cfg.teacher)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, image, label in tqdm(jobs, desc="pseudo labels", disable=len(jobs) < 2):
            with torch.no_grad():
                dense = teacher(to_tensor(image)[None]).dense[0]
            maps, fused = regions_for_image(dense.permute(1, 2, 0).numpy(), label, **cfg.plm.region_kwargs())
            panel = write_views(out, name, image, maps, fused, cfg.plm.windows, label)
            sizes = ", ".join(f"{n} {s * 100:.0f}%" for n, s, _ in pseudo_vis.legend(fused)[:6])
            print(f"{name}: {int(fused.max()) + 1} regions ({sizes}) -> {panel}")
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

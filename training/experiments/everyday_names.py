"""The figure of what a user can type: 20+ everyday names on probe images, teacher beside student.

    python -m training.experiments.everyday_names [--bundle BUNDLE] [--out docs/everyday_names.png]

Every image is one of the open-vocabulary probe's 200 pool images (never trained on since the probe was
split off; `clipteacher.train.sources.probe_ids`), segmented through the serving path (the app's Compare
view: `Service.compare`) with the same list of everyday names: people, animals, vehicles, food, furniture,
and a few kinds of background. The names were written down as a user might, not chosen by looking at any
evaluation data. Each panel lists the three names that won the most pixels.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from clipteacher.app.service import Service
from clipteacher.io import read_image_file
from clipteacher.pseudo.vis import overlay
from clipteacher.runtime import Bundle
from clipteacher.runtime.resolve import resolve_bundle

POOL = Path("../shared/data/imagenet_samples")
NAMES = ["person", "dog", "cat", "horse", "zebra", "bear", "bird", "car", "bus", "truck", "train", "airplane",
         "boat", "bicycle", "pizza", "orange", "banana", "cake", "chair", "table", "sofa", "bed", "bottle", "cup",
         "grass", "sky", "road", "water", "tree", "wall"]
IMAGES = ["n02391049.jpg", "n02690373.jpg", "n02917067.jpg", "n03417042.jpg", "n07873807.jpg", "n02109047.jpg",
          "n03376595.jpg", "n07747607.jpg", "n02132136.jpg", "n03201208.jpg"]  # probe images, everyday subjects
TILE = 200


def top(labels: np.ndarray, names: list[str], k: int = 3) -> list[tuple[str, float]]:
    shares = np.bincount(labels.ravel(), minlength=len(names)) / labels.size
    return [(names[i], float(shares[i])) for i in np.argsort(-shares)[:k] if shares[i] > 0]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None, help="bundle folder (default: the app's default bundle)")
    ap.add_argument("--out", default="docs/everyday_names.png")
    args = ap.parse_args(argv)
    from clipteacher.train.sources import probe_ids

    meta = json.loads((POOL / "images.json").read_text())["images"]
    probe = set(probe_ids(list(meta)))
    assert all(f in probe for f in IMAGES), "every image of the figure must be a probe image"
    service = Service(Bundle(resolve_bundle(args.bundle), verbose=False))
    rows = []
    for file in IMAGES:
        image = read_image_file(POOL / "images" / file)
        cmp = service.compare(image, ", ".join(NAMES))
        rows.append((file, image, cmp))
    def shown_height(image) -> int:  # the thumbnail's height
        h, w = image.shape[:2]
        return round(h * min(1.0, TILE / max(h, w)))

    heights = [shown_height(image) + 48 for _, image, _ in rows]  # picture + three caption lines
    width = 3 * (TILE + 6) + 8
    canvas = Image.new("RGB", (width, 60 + sum(heights)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    half = len(NAMES) // 2
    draw.text((6, 4), f"{len(NAMES)} names typed for every image: {', '.join(NAMES[:half])},", fill=(0, 0, 0))
    draw.text((6, 17), ", ".join(NAMES[half:]), fill=(0, 0, 0))
    draw.text((6, 32), "probe image (ImageNet class) | teacher (training-free) | student (serving path)", fill=(0, 0, 0))
    summary = []
    for r, (file, image, cmp) in enumerate(rows):
        y = 54 + sum(heights[:r])
        panels = [(image, [(meta[file]["name"], 1.0)]),
                  (overlay(image, cmp.teacher, 0.55, cmp.colors), top(cmp.teacher, cmp.names)),
                  (overlay(image, cmp.student.labels, 0.55, cmp.colors), top(cmp.student.labels, cmp.names))]
        for j, (pic, caption) in enumerate(panels):
            im = Image.fromarray(pic)
            im.thumbnail((TILE, TILE))
            x = 6 + j * (TILE + 6)
            canvas.paste(im, (x, y))
            for k, (name, share) in enumerate(caption):
                yy = y + im.height + 2 + 13 * k
                if j:
                    rgb = tuple(int(c) for c in cmp.colors[cmp.names.index(name)])
                    draw.rectangle([x, yy + 2, x + 9, yy + 11], fill=rgb)
                draw.text((x + (13 if j else 0), yy), f"{name} {100 * share:.0f}%" if j else name, fill=(0, 0, 0))
        summary.append({"file": file, "class": meta[file]["name"], "teacher": top(cmp.teacher, cmp.names),
                        "student": top(cmp.student.labels, cmp.names)})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out)
    for row in summary:
        print(f"{row['file']} ({row['class']}): teacher " + ", ".join(f"{n} {100 * s:.0f}%" for n, s in row["teacher"])
              + " | student " + ", ".join(f"{n} {100 * s:.0f}%" for n, s in row["student"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

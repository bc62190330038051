"""Draw the app's example images (synthetic scenes; no dataset images may be shipped in the repo).

    python app/make_examples.py [--out clipteacher/app/examples]

Writes farm.jpg, lake.jpg, street.jpg, garden.jpg (400 x 300) and farm_label.png: an msrc21-style
label of farm.jpg (palette PNG, class ids, 255 = ignore) whose cow and tree are left unlabelled, so
the Pseudo labels tab clusters only there. Deterministic: the same files every run.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

W, H = 400, 300
# msrc21 class ids (training/configs/msrc21.yaml's dataset), used by farm_label.png
BUILDING, GRASS, TREE, COW, SKY, IGNORE = 0, 1, 2, 3, 5, 255


def _textured(rgb, rng: np.random.Generator, amount: int = 14, blur: float = 1.2) -> Image.Image:
    """A W x H canvas of one colour with blurred noise, so regions are not perfectly flat."""
    noise = rng.integers(-amount, amount + 1, (H, W, 3))
    im = Image.fromarray(np.clip(np.array(rgb)[None, None] + noise, 0, 255).astype(np.uint8))
    return im.filter(ImageFilter.GaussianBlur(blur))


def _sky(rng: np.random.Generator, top=(70, 130, 210), bottom=(175, 210, 240)) -> Image.Image:
    t = np.linspace(0, 1, H)[:, None, None]
    grad = (1 - t) * np.array(top) + t * np.array(bottom)
    grad = np.broadcast_to(grad, (H, W, 3)) + rng.normal(0, 2, (H, W, 3))
    return Image.fromarray(np.clip(grad, 0, 255).astype(np.uint8))


def _paste(base: Image.Image, layer: Image.Image, shape) -> Image.Image:
    """Paste `layer` onto `base` through a mask drawn by shape(draw)."""
    mask = Image.new("L", (W, H), 0)
    shape(ImageDraw.Draw(mask))
    base.paste(layer, (0, 0), mask)
    return base


def farm(rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    im = _sky(rng)
    label = Image.new("L", (W, H), SKY)
    horizon = 170

    def ground(d):
        d.rectangle((0, horizon, W, H), fill=255)

    def house(d):
        d.rectangle((40, 105, 140, horizon + 5), fill=255)
        d.polygon([(30, 108), (90, 60), (150, 108)], fill=255)

    def trunk(d):
        d.rectangle((305, 110, 320, horizon + 12), fill=255)

    def crown(d):
        d.ellipse((265, 45, 360, 130), fill=255)

    def cow(d):
        d.ellipse((170, 185, 265, 240), fill=255)
        d.ellipse((250, 180, 285, 208), fill=255)
        for x in (182, 200, 232, 250):
            d.rectangle((x, 228, x + 8, 268), fill=255)

    layers = [(ground, _textured((70, 140, 50), rng, 22), GRASS),
              (house, _textured((185, 170, 150), rng, 8), BUILDING),
              (trunk, _textured((90, 60, 35), rng), TREE),
              (crown, _textured((40, 100, 40), rng, 25, 2.0), TREE),
              (cow, _textured((120, 75, 40), rng), COW)]
    for shape, layer, cls in layers:
        _paste(im, layer, shape)
        _paste(label, Image.new("L", (W, H), cls), shape)
    d = ImageDraw.Draw(im)
    d.polygon([(30, 108), (90, 60), (150, 108)], fill=(160, 50, 40))  # roof
    d.rectangle((75, 130, 105, horizon + 5), fill=(80, 55, 40))  # door
    for x in (50, 115):
        d.rectangle((x, 120, x + 18, 140), fill=(150, 190, 220))
    for box in ((190, 195, 215, 215), (235, 200, 252, 222)):  # patches on the cow
        d.ellipse(box, fill=(245, 240, 230))
    # The cow and the tree are "unseen": left unlabelled, so pseudo labels are made there.
    lab = np.array(label)
    lab[np.isin(lab, [COW, TREE])] = IGNORE
    out = Image.fromarray(lab, "P")
    palette = [0] * 768
    for cls, rgb in {BUILDING: (128, 0, 0), GRASS: (0, 128, 0), SKY: (128, 128, 128), IGNORE: (0, 0, 0)}.items():
        palette[3 * cls: 3 * cls + 3] = rgb
    out.putpalette(palette)
    return im, out


def lake(rng: np.random.Generator) -> Image.Image:
    im = _sky(rng, (95, 150, 220), (200, 220, 240))
    hills = [(0, 150)] + [(x, 130 + 12 * np.sin(x / 23.0)) for x in range(0, W + 1, 20)] + [(W, 160), (0, 160)]
    _paste(im, _textured((45, 90, 50), rng, 25, 2.5), lambda d: d.polygon(hills, fill=255))
    water = np.array(_textured((40, 90, 140), rng, 10))
    water[::6] = np.clip(water[::6].astype(int) + 30, 0, 255)  # ripples
    _paste(im, Image.fromarray(water), lambda d: d.rectangle((0, 158, W, H), fill=255))
    d = ImageDraw.Draw(im)
    d.polygon([(150, 215), (270, 215), (250, 240), (170, 240)], fill=(235, 235, 230))  # hull
    d.polygon([(210, 120), (210, 210), (265, 210)], fill=(250, 250, 250))  # sail
    d.line([(208, 115), (208, 215)], fill=(60, 50, 40), width=3)
    return im


def street(rng: np.random.Generator) -> Image.Image:
    im = _sky(rng, (110, 150, 200), (190, 205, 225))
    _paste(im, _textured((150, 120, 100), rng, 10), lambda d: d.rectangle((0, 40, 180, 200), fill=255))
    _paste(im, _textured((200, 195, 180), rng, 8), lambda d: d.rectangle((180, 70, W, 200), fill=255))
    _paste(im, _textured((90, 90, 95), rng, 10), lambda d: d.rectangle((0, 200, W, H), fill=255))
    d = ImageDraw.Draw(im)
    for x0, x1, top in ((0, 180, 40), (180, W, 70)):
        for x in range(x0 + 12, x1 - 20, 34):
            for y in range(top + 14, 185, 36):
                d.rectangle((x, y, x + 18, y + 22), fill=(70, 95, 120))
    for x in range(10, W, 60):
        d.rectangle((x, 250, x + 30, 255), fill=(235, 235, 225))  # lane marks
    d.rounded_rectangle((120, 200, 290, 245), 10, fill=(190, 30, 35))  # car body
    d.polygon([(150, 200), (170, 175), (245, 175), (265, 200)], fill=(170, 25, 30))
    d.polygon([(160, 199), (175, 180), (240, 180), (255, 199)], fill=(140, 175, 200))
    for x in (150, 255):
        d.ellipse((x - 16, 230, x + 16, 262), fill=(25, 25, 25))
    return im


def garden(rng: np.random.Generator) -> Image.Image:
    im = _textured((60, 135, 55), rng, 25, 1.0)
    d = ImageDraw.Draw(im)
    colours = [(220, 40, 60), (250, 210, 40), (230, 120, 200), (250, 250, 250), (120, 80, 220)]
    for _ in range(26):
        x, y = int(rng.integers(15, W - 15)), int(rng.integers(15, H - 15))
        r = int(rng.integers(7, 15))
        c = colours[int(rng.integers(len(colours)))]
        for a in range(0, 360, 60):  # petals
            dx, dy = r * np.cos(np.radians(a)), r * np.sin(np.radians(a))
            d.ellipse((x + dx - r * 0.6, y + dy - r * 0.6, x + dx + r * 0.6, y + dy + r * 0.6), fill=c)
        d.ellipse((x - r * 0.45, y - r * 0.45, x + r * 0.45, y + r * 0.45), fill=(240, 180, 30))
    return im


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "clipteacher" / "app" / "examples"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    image, label = farm(np.random.default_rng(0))
    image.save(out / "farm.jpg", quality=88)
    label.save(out / "farm_label.png")
    for seed, (name, draw) in enumerate((("lake", lake), ("street", street), ("garden", garden)), start=1):
        draw(np.random.default_rng(seed)).save(out / f"{name}.jpg", quality=88)
    print(f"wrote examples to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Pictures of PLM pseudo regions: cluster maps, fused regions, overlays, one summary panel.

Torch-free (numpy, PIL, cv2) so the Gradio app can import it. Region maps are h x w int
arrays with -1 = no region; they are upsampled with `clipteacher.pseudo.kmeans.resize_nearest`, the
same geometry the pseudo labels use, so what you see is where the labels go.
"""
from __future__ import annotations

import colorsys

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from clipteacher.pseudo.kmeans import resize_nearest

NONE_RGB = (64, 64, 64)  # cells without a region / cluster
BACKGROUND = (24, 24, 24)
TEXT_RGB = (235, 235, 235)
IGNORE_OUTLINE = (255, 220, 0)
TILE_HEIGHT = 240
TITLE_HEIGHT = 22
GAP = 6
LEGEND_MAX = 24  # largest regions listed; the tail is summed into one entry


def region_palette(n: int) -> np.ndarray:
    """n x 3 uint8 colours; golden-angle hue steps so neighbouring ids look different."""
    colours = []
    for i in range(max(0, int(n))):
        hue = (i * 0.618033988749895) % 1.0
        sat = (0.85, 0.55, 0.95)[i % 3]
        val = (0.95, 0.85, 0.70)[(i // 3) % 3]
        colours.append([round(255 * c) for c in colorsys.hsv_to_rgb(hue, sat, val)])
    return np.asarray(colours, dtype=np.uint8).reshape(-1, 3)


def _palette_for(ids: np.ndarray, palette) -> np.ndarray:
    if palette is not None:
        palette = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)
        if len(palette):
            return palette
    return region_palette(max(1, int(ids.max(initial=-1)) + 1))


def colorize(ids: np.ndarray, palette=None) -> np.ndarray:
    """h x w int (-1 = none) -> h x w x 3 uint8; ids beyond the palette wrap around."""
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"colorize: need an h x w id map, got shape {ids.shape}")
    palette = _palette_for(ids, palette)
    table = np.vstack([palette, np.asarray(NONE_RGB, np.uint8)[None]])  # the last row for -1
    if ids.size and 0 <= ids.min() and ids.max() < len(palette):  # the app's labels: no -1, no wrap
        return np.take(table, ids, axis=0)  # 10x faster than table[idx]; the where/modulo below is 4x the take
    return np.take(table, np.where(ids >= 0, ids % len(palette), len(palette)), axis=0)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    if image.ndim != 3 or image.shape[2] not in (3, 4):
        raise ValueError(f"pseudo_vis: image must be H x W x 3 (RGB), got shape {image.shape}")
    if image.dtype != np.uint8:
        image = np.clip(image, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image[..., :3])


def _boundaries(ids: np.ndarray) -> np.ndarray:
    """H x W bool, True on pixels whose right or lower neighbour has another id."""
    edge = np.zeros(ids.shape, dtype=bool)
    edge[:, :-1] |= ids[:, :-1] != ids[:, 1:]
    edge[:-1, :] |= ids[:-1, :] != ids[1:, :]
    return edge


def overlay(image: np.ndarray, ids: np.ndarray, alpha: float = 0.5, palette=None) -> np.ndarray:
    """Blend region colours onto an H x W x 3 uint8 image; -1 cells stay untouched.

    ids: any h x w map, nearest-resized to H x W. Region borders are drawn in white so
    one can judge whether they follow object edges.
    """
    image = _as_rgb(image)
    ids = np.asarray(ids)
    up = ids if ids.shape == image.shape[:2] else resize_nearest(ids, image.shape[:2])
    colours = colorize(up, _palette_for(ids, palette))
    out = cv2.addWeighted(image, 1 - alpha, colours, alpha, 0)  # the app draws one per request: kept cheap
    none = up < 0
    out[none] = image[none]
    out[_boundaries(up) & ~none] = 255
    return out


def legend(ids: np.ndarray, names: list[str] | None = None, palette=None) -> list[tuple[str, float, tuple]]:
    """(name, share of all cells, rgb) for every id present, largest first.

    Shares are of the whole map (cells with -1 included), so they read as "share of the image".
    """
    ids = np.asarray(ids)
    palette = _palette_for(ids, palette)
    present, counts = np.unique(ids[ids >= 0], return_counts=True)
    entries = []
    for i in np.argsort(-counts, kind="stable"):
        r = int(present[i])
        name = names[r] if names is not None and r < len(names) else f"region {r}"
        rgb = tuple(int(c) for c in palette[r % len(palette)])
        entries.append((name, float(counts[i]) / max(ids.size, 1), rgb))
    return entries


def _font(size: int = 14):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _fit(tile: np.ndarray, hw: tuple[int, int], nearest: bool) -> np.ndarray:
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_AREA
    return cv2.resize(tile, (hw[1], hw[0]), interpolation=interp)


def _image_tile(image: np.ndarray, hw: tuple[int, int], label, ignore_index: int) -> np.ndarray:
    tile = _fit(image, hw, nearest=False)
    if label is None:
        return tile
    ignored = resize_nearest(np.asarray(label) == ignore_index, hw)
    # Dim the ignored area (where K-Means runs) and outline it, so seen pixels stay readable.
    tile = np.where(ignored[..., None], (0.55 * tile).astype(np.uint8), tile)
    contours, _ = cv2.findContours(ignored.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
    tile = np.ascontiguousarray(tile)
    cv2.drawContours(tile, contours, -1, IGNORE_OUTLINE, 1)
    return tile


def pseudo_label_panel(image: np.ndarray, scale_maps: list[np.ndarray], fused: np.ndarray, windows,
                       label: np.ndarray | None = None, ignore_index: int = 255) -> np.ndarray:
    """One RGB uint8 picture: image | clusters per window | fused regions | overlay, plus a legend.

    image: H x W x 3 uint8; scale_maps: h x w int per window in `windows`; fused: h x w int;
    label: optional H x W int, its `ignore_index` area is dimmed and outlined on the image.
    """
    image = _as_rgb(image)
    scale_maps = list(scale_maps)
    windows = list(windows)
    if len(windows) != len(scale_maps):
        raise ValueError(f"pseudo_label_panel: {len(scale_maps)} scale maps but {len(windows)} windows")
    H, W = image.shape[:2]
    hw = (TILE_HEIGHT, max(1, round(W * TILE_HEIGHT / max(H, 1))))
    fused = np.asarray(fused)
    fused_palette = region_palette(max(1, int(fused.max(initial=-1)) + 1))

    tiles = [("image" + (" (ignored dimmed)" if label is not None else ""),
              _image_tile(image, hw, label, ignore_index))]
    for k, m in zip(windows, scale_maps):
        n = len(np.unique(m[m >= 0]))
        tiles.append((f"k={k}: {n} clusters", colorize(resize_nearest(m, hw))))
    n_regions = len(np.unique(fused[fused >= 0]))
    tiles.append((f"fused: {n_regions} regions", colorize(resize_nearest(fused, hw), fused_palette)))
    tiles.append(("overlay", overlay(_fit(image, hw, nearest=False), fused, 0.5, fused_palette)))

    font = _font(14)
    entries = legend(fused, palette=fused_palette)
    unassigned = float((fused < 0).sum()) / max(fused.size, 1)
    shown = entries[:LEGEND_MAX]
    labels = [f"{name}: {share:.1%}" for name, share, _ in shown]
    swatches = [rgb for _, _, rgb in shown]
    if len(entries) > len(shown):
        rest = sum(share for _, share, _ in entries[len(shown):])
        labels.append(f"{len(entries) - len(shown)} more: {rest:.1%}")
        swatches.append(BACKGROUND)
    labels.append(f"no region: {unassigned:.1%}")
    swatches.append(NONE_RGB)

    width = len(tiles) * (hw[1] + GAP) + GAP
    col_w = 150
    per_row = max(1, (width - GAP) // col_w)
    legend_rows = -(-len(labels) // per_row)
    height = GAP + TITLE_HEIGHT + hw[0] + GAP + legend_rows * 20 + GAP
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for i, (title, tile) in enumerate(tiles):
        x = GAP + i * (hw[1] + GAP)
        draw.text((x, GAP + 3), title, fill=TEXT_RGB, font=font)
        canvas.paste(Image.fromarray(np.ascontiguousarray(tile)), (x, GAP + TITLE_HEIGHT))
    top = GAP + TITLE_HEIGHT + hw[0] + GAP
    for i, (text, rgb) in enumerate(zip(labels, swatches)):
        x = GAP + (i % per_row) * col_w
        y = top + (i // per_row) * 20
        draw.rectangle((x, y + 2, x + 14, y + 16), fill=tuple(rgb), outline=TEXT_RGB)
        draw.text((x + 20, y + 1), text, fill=TEXT_RGB, font=font)
    return np.asarray(canvas)

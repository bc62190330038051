"""The request layer of the app and `clipteacher-predict`: what a person sends, checked and decoded, and
what they get back, drawn and encoded. numpy, Pillow and OpenCV only (no torch, no Gradio).

    image, notes = load_image("cow.jpg")        # H x W x 3 uint8 RGB, capped and downscaled before decoding
    names, notes = parse_names("cow, grass")    # cleaned, deduplicated, bounded
    gamma = parse_gamma("1.5")                  # a finite number within +-MAX_GAMMA, or None (the bundle's)
    mask_png(labels, names, colors, path)       # 8-bit palette PNG, names in its "classes" text chunk

Bad input raises `UserError` with one line meant for the person who sent it.
"""
from __future__ import annotations

import html
import json
import re
import unicodedata
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from clipteacher.io import DatasetError, make_upright, orientation, read_label_file, to_rgb, upright_size
from clipteacher.prompts import MAX_TEMPLATE_CHARS, MAX_TEMPLATES, TemplateError, check_templates

MAX_SIDE = 1024  # longer image side the app works at (the student sees a short side of eval_size anyway)
MAX_PIXELS = 80_000_000  # larger uploads are refused before decoding (8000 x 8000 passes)
MIN_SIDE = 16
MAX_ASPECT = 8.0  # the student's input keeps the aspect ratio: a 1 x 8000 strip would be huge
MAX_CLASSES = 255  # mask PNGs are 8-bit palette images
MAX_NAME_CHARS = 100
MAX_WINDOWS = 4
MAX_GAMMA = 20.0  # |gamma| beyond this is refused: at logit scale 20 it already outweighs any cosine difference


class UserError(ValueError):
    """Bad input, explained in one line for the UI."""


def _open(path, name: str | None = None) -> Image.Image:
    if path is None or (name is None and str(path) == ""):
        raise UserError("Upload an image first (or pick one of the examples).")
    name = name or Path(str(path)).name
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path)
            im.size  # noqa: B018 - header parsed
    except FileNotFoundError:
        raise UserError(f"The uploaded file {name} is gone; upload it again.") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{name} is larger than {MAX_PIXELS // 1_000_000} megapixels; "
                        f"upload a smaller image.") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise UserError(f"{name} is not an image that can be read; upload a PNG, JPEG or WebP file.") from None
    return im


def load_image(path, name: str | None = None) -> tuple[np.ndarray, list[str]]:
    """Image file (or a binary file object, with `name` for messages) -> (H x W x 3 uint8 RGB at most
    MAX_SIDE on its longer side, notes).

    Grey, palette, RGBA and 16-bit files are converted as the training data is (clipteacher.train.datasets).
    JPEGs are decoded at reduced size when they are large, so memory stays bounded."""
    im = _open(path, name)
    name = name or Path(str(path)).name
    notes = []
    with im:
        tag = orientation(im)  # phone photos are stored sideways with a tag; the user sees them upright
        w, h = upright_size(im)
        if w * h > MAX_PIXELS:
            raise UserError(f"The image is {w} x {h} pixels (over {MAX_PIXELS // 1_000_000} megapixels); "
                            f"upload a smaller one.")
        if min(w, h) < MIN_SIDE:
            raise UserError(f"The image is {w} x {h} pixels; each side needs at least {MIN_SIDE}.")
        if max(w, h) / min(w, h) > MAX_ASPECT:
            raise UserError(f"The image is {w} x {h} pixels; sides more than {MAX_ASPECT:g}:1 apart are not supported.")
        try:
            if max(w, h) > MAX_SIDE:
                s = MAX_SIDE / max(w, h)
                size = (max(1, round(w * s)), max(1, round(h * s)))
                if tag >= 5:  # resize in stored orientation, then turn upright
                    size = size[::-1]
                im.draft("RGB", size)  # JPEG: decode at 1/2, 1/4 or 1/8 scale directly
                if im.mode.startswith("I;16"):
                    im = im.convert("I")  # Pillow resizes 32-bit integer images, keeping 16-bit depth
                im = im.resize(size, Image.BILINEAR, reducing_gap=2.0)
                shown = size[::-1] if tag >= 5 else size
                notes.append(f"The image is {w} x {h} pixels; it was downscaled to {shown[0]} x {shown[1]}.")
            image = to_rgb(make_upright(im, tag))
        except (OSError, SyntaxError, ValueError) as err:
            raise UserError(f"{name} could not be decoded ({err}).") from None
    return image, notes


def load_label(path, original_hw: tuple[int, int], work_hw: tuple[int, int]) -> np.ndarray:
    """Label PNG (class ids, 255 = ignore) of the uploaded image -> H x W uint8 at the working size."""
    try:
        label = read_label_file(Path(str(path)))
    except (DatasetError, FileNotFoundError) as err:
        raise UserError(str(err).replace(str(path), Path(str(path)).name)) from None
    if label.shape != tuple(original_hw):
        raise UserError(f"The label is {label.shape[1]} x {label.shape[0]} pixels but the image is "
                        f"{original_hw[1]} x {original_hw[0]}; upload the label PNG of this image.")
    if label.shape != tuple(work_hw):
        label = cv2.resize(label, (work_hw[1], work_hw[0]), interpolation=cv2.INTER_NEAREST)
    return label


def image_size(path) -> tuple[int, int]:
    """(H, W) of an image file as the user sees it (EXIF orientation applied)."""
    with _open(path) as im:
        w, h = upright_size(im)
        return h, w


def clean_name(raw: str) -> str:
    """Drop control and invisible format characters (NUL, zero-width spaces, ...) and fold white space."""
    return " ".join("".join(c for c in raw if unicodedata.category(c) not in ("Cc", "Cf")).split())


def parse_names(text: str | None) -> tuple[list[str], list[str]]:
    """'cow, grass\\nsky' -> (names, notes). Commas and newlines separate; blanks are dropped,
    duplicates (ignoring case) kept once, over-long names cut."""
    text = text or ""
    if len(text) > MAX_CLASSES * (MAX_NAME_CHARS + 2):
        raise UserError(f"The class names are {len(text)} characters long; at most {MAX_CLASSES} names of "
                        f"{MAX_NAME_CHARS} characters are supported.")
    notes = []
    names, seen, dupes, cut = [], set(), [], []
    for raw in re.split(r"[,\n]", text):
        name = clean_name(raw)
        if not name:
            continue
        if len(name) > MAX_NAME_CHARS:
            cut.append(name[:20] + "...")
            name = name[:MAX_NAME_CHARS].rstrip()
        if name.lower() in seen:
            dupes.append(name)
            continue
        seen.add(name.lower())
        names.append(name)
    if not names:
        raise UserError("Type at least one class name (separate names with commas or new lines).")
    if len(names) > MAX_CLASSES:
        raise UserError(f"{len(names)} class names given; at most {MAX_CLASSES} are supported.")
    if cut:
        notes.append(f"{len(cut)} class name(s) longer than {MAX_NAME_CHARS} characters were shortened: "
                     f"{', '.join(cut)}")
    if dupes:
        notes.append(f"Duplicate class names were used once: {', '.join(sorted(set(dupes)))}")
    return names, notes


def parse_templates(text: str | None) -> tuple[str, ...] | None:
    """One prompt template per line, each literal text with one '{}' for the name; empty -> None (the bundle's)."""
    text = text or ""
    if len(text) > MAX_TEMPLATES * (MAX_TEMPLATE_CHARS + 1):
        raise UserError(f"The prompt templates are {len(text)} characters long; at most {MAX_TEMPLATES} templates of "
                        f"{MAX_TEMPLATE_CHARS} characters are supported.")
    lines = [" ".join(t.split()) for t in text.splitlines()]
    lines = list(dict.fromkeys(t for t in lines if t))
    if not lines:
        return None
    try:
        return check_templates(lines)
    except TemplateError as err:
        message = str(err)
        raise UserError(message[:1].upper() + message[1:] + ".") from None


def parse_gamma(value) -> float | None:
    """The unseen bias from the UI or the API: a finite number, or None / '' for the bundle's default."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        gamma = float(value)
    except (TypeError, ValueError):
        raise UserError(f"The unseen bias gamma must be a number, got {str(value)[:40]!r}.") from None
    if not np.isfinite(gamma) or abs(gamma) > MAX_GAMMA:
        raise UserError(f"The unseen bias gamma must be a finite number from {-MAX_GAMMA:g} to {MAX_GAMMA:g}, "
                        f"got {str(value)[:40]}.")
    return gamma


def parse_windows(text) -> tuple[int, ...]:
    """'3, 7' -> (3, 7): K-Means window sizes (k*k centres each)."""
    try:
        windows = tuple(int(t) for t in re.split(r"[,\s]+", str(text or "").strip()) if t)
    except ValueError:
        raise UserError(f"Window sizes must be whole numbers separated by commas, got {text!r}.") from None
    if not windows or len(windows) > MAX_WINDOWS or any(k < 1 or k > 16 for k in windows):
        raise UserError(f"Give 1 to {MAX_WINDOWS} window sizes between 1 and 16 (e.g. 3, 7), got {text!r}.")
    return tuple(dict.fromkeys(windows))


# ---------------------------------------------------------------------------- pictures


def mask_png(labels: np.ndarray, names: list[str], colors: np.ndarray, path):
    """Save H x W class indices as an 8-bit palette PNG (pixel = index into names; the names
    are stored in the PNG's 'classes' text chunk as JSON)."""
    from PIL import PngImagePlugin

    im = Image.fromarray(labels.astype(np.uint8), "P")
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(colors)] = colors
    im.putpalette(palette.ravel().tolist())
    info = PngImagePlugin.PngInfo()
    info.add_itxt("classes", json.dumps(names, ensure_ascii=False))
    # a path or a binary file object; level 1: a third of the default's time for a file ~15% larger (a few KB)
    im.save(path, format="PNG", pnginfo=info, compress_level=1)
    return path


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """H x W x 3 uint8 RGB -> JPEG bytes (OpenCV's encoder: a few ms for a 1024-px picture)."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for an image of shape {image.shape}")
    return data.tobytes()


def save_jpeg(image: np.ndarray, path: Path, quality: int = 90) -> Path:
    """H x W x 3 uint8 RGB -> JPEG file."""
    path.write_bytes(encode_jpeg(image, quality))
    return path


def hex_color(rgb) -> str:
    r, g, b = (int(c) for c in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def legend_html(names: list[str], colors: np.ndarray, shares: dict[str, float]) -> str:
    """The overlay's colour key: a swatch, the (escaped) name and its share for each present class."""
    by_name = dict(zip(names, colors))
    entries = []
    for name, share in shares.items():
        swatch = f'<span class="swatch" style="background:{hex_color(by_name[name])}"></span>'
        entries.append(f'<span class="legend-entry">{swatch}{html.escape(name)} '
                       f'{f"{share:.0%}" if share >= 0.005 else "&lt;1%"}</span>')
    return "".join(entries)


def shares_of(labels: np.ndarray, names: list[str]) -> dict[str, float]:
    """H x W indices into names -> share of pixels per present name, largest first."""
    counts = np.bincount(labels.ravel(), minlength=len(names))
    return {names[i]: float(counts[i]) / labels.size for i in np.argsort(-counts, kind="stable") if counts[i] > 0}


def heat_overlay(image: np.ndarray, values: np.ndarray, vmin: float | None = None, vmax: float | None = None,
                 alpha: float = 0.55) -> np.ndarray:
    """Blend an h x w map (bilinearly upsampled, scaled to [vmin, vmax]) as a colour map onto the image."""
    lo = float(values.min()) if vmin is None else vmin
    hi = float(values.max()) if vmax is None else vmax
    scaled = np.clip((values - lo) / max(hi - lo, 1e-12), 0, 1)
    up = cv2.resize(scaled.astype(np.float32), (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    heat = cv2.cvtColor(cv2.applyColorMap(np.uint8(np.round(up * 255)), cv2.COLORMAP_INFERNO), cv2.COLOR_BGR2RGB)
    return np.uint8(np.round((1 - alpha) * image + alpha * heat))


def fit(image: np.ndarray, long_side: int) -> np.ndarray:
    """Downscale so the longer side is at most long_side (for gallery thumbnails)."""
    h, w = image.shape[:2]
    if max(h, w) <= long_side:
        return image
    s = long_side / max(h, w)
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)


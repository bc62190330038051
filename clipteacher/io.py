"""Reading images and label maps, resizing, file checksums: numpy, PIL and OpenCV only (no torch).

Training, evaluation, the ONNX runtime and the app all read and resize through these functions,
so their inputs match pixel for pixel.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError


class DatasetError(ValueError):
    """A dataset folder, split file, image or label that cannot be used (one line, names the file)."""


def to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL image -> H x W x 3 uint8. 16-bit grey is rescaled, not clipped; alpha is dropped."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im).astype(np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        top = max(top, float(a.max()))
        grey = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def resize_short(image: np.ndarray, short: int) -> np.ndarray:
    """H x W x 3 uint8 -> short side `short` (bilinear), aspect kept."""
    h, w = image.shape[:2]
    s = short / min(h, w)
    return cv2.resize(image, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_LINEAR)


def read_image_file(path: Path) -> np.ndarray:
    """H x W x 3 uint8 RGB (grey, palette, RGBA and 16-bit files converted)."""
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise DatasetError(f"image {path} cannot be read: {e}") from None


def read_label_file(path: Path) -> np.ndarray:
    """H x W uint8 stored label values (palette indices for 'P' PNGs), before any mapping."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "1") and not im.mode.startswith("I"):
                raise DatasetError(f"label {path} is a {im.mode} image; expected a single-channel "
                                   f"index PNG (palette or greyscale)")
            raw = np.asarray(im)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"label {path} cannot be read: {e}") from None
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise DatasetError(f"label {path} has value {int(raw.max())} that does not fit uint8")
        raw = raw.astype(np.uint8)
    return raw


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

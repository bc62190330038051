"""Reading images and label maps, resizing, file checksums: numpy, PIL and OpenCV only (no torch).

Training, evaluation, the ONNX runtime and the app all read and resize through these functions,
so their inputs match pixel for pixel.
"""
from __future__ import annotations

import hashlib
import os
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


# EXIF orientation tag value -> the transpose that makes the stored pixels upright
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def orientation(im: Image.Image) -> int:
    """The EXIF orientation tag (1 = stored upright; 5-8 swap width and height)."""
    try:
        value = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - a broken EXIF block means no usable tag
        return 1
    return value if value in _UPRIGHT else 1


def upright_size(im: Image.Image) -> tuple[int, int]:
    """(width, height) as a viewer shows the image, after its EXIF orientation."""
    w, h = im.size
    return (h, w) if orientation(im) >= 5 else (w, h)


def make_upright(im: Image.Image, tag: int) -> Image.Image:
    """Apply the transpose of EXIF orientation `tag` (as read from the original file) to `im`."""
    return im.transpose(_UPRIGHT[tag]) if tag in _UPRIGHT else im


def read_image_file(path: Path, upright: bool = True) -> np.ndarray:
    """H x W x 3 uint8 RGB (grey, palette, RGBA and 16-bit files converted).

    upright: apply the EXIF orientation, so the pixels are as a viewer shows them. Dataset readers
    pass False: a dataset's label maps are drawn on the stored pixel grid.
    """
    try:
        with Image.open(path) as im:
            return to_rgb(make_upright(im, orientation(im)) if upright else im)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"image {path} cannot be read: {e}") from None


def read_label_file(path: Path) -> np.ndarray:
    """H x W uint8 stored label values (palette indices for 'P' PNGs), before any mapping."""
    try:
        with Image.open(path) as im:
            if im.mode not in ("P", "L", "1") and not im.mode.startswith("I"):
                raise DatasetError(f"label {path} is a {im.mode} image; expected a single-channel "
                                   f"index PNG (palette or greyscale)")
            raw = np.asarray(im)
    except Image.DecompressionBombError:
        raise DatasetError(f"label {path} is too large to decode (a decompression bomb?)") from None
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


def model_digest(path: str | Path) -> str:
    """sha256 of a checkpoint file, or of a model folder's weights and config (`clipteacher.checkpoint`):
    changes when the model does."""
    path = Path(path)
    if path.is_dir():
        parts = [sha256_file(path / name) for name in ("model.safetensors", "config.json")]
        return hashlib.sha256("".join(parts).encode()).hexdigest()
    return sha256_file(path)


def process_alive(pid: int) -> bool:
    """Whether process `pid` still runs (stale temporary files and folders are named by their writer's pid)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True

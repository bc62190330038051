"""What the app computes, as plain functions over numpy arrays: no Gradio, no torch.

    service = Service(Bundle("bundles/default"))
    image, notes = load_image("cow.jpg")                       # H x W x 3 uint8, downscaled if huge
    seg = service.segment(image, "cow, grass, sky")            # Segmentation: labels H x W, shares, ...
    att = service.attention(image, "cow, grass")               # Attention: GLM weights h x w, similarities C x h x w
    plm = service.pseudo_labels(image, label=None)             # PseudoLabels: per-window maps, fused map

Bad input raises `UserError` with a one-line message meant for the person at the UI; things
worth knowing that do not stop the request (a downscaled image, dropped duplicate names) come
back as `notes`. Image passes are cached on the image's content, so a new vocabulary, gamma
or template set re-runs only the text encoder and the classifier.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
import threading
import time
import unicodedata
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from clipteacher.prompts import MAX_TEMPLATE_CHARS, MAX_TEMPLATES, TemplateError, check_templates, outside_vocabulary
from clipteacher.pseudo import regions_for_image, vis as pseudo_vis
from clipteacher.io import DatasetError, make_upright, orientation, read_label_file, resize_short, to_rgb, upright_size

MAX_SIDE = 1024  # longer image side the app works at (the student sees a short side of eval_size anyway)
MAX_PIXELS = 80_000_000  # larger uploads are refused before decoding (8000 x 8000 passes)
MIN_SIDE = 16
MAX_ASPECT = 8.0  # the student's input keeps the aspect ratio: a 1 x 8000 strip would be huge
MAX_CLASSES = 255  # mask PNGs are 8-bit palette images
MAX_NAME_CHARS = 100
MAX_WINDOWS = 4
CACHE_IMAGES = 8  # images whose model outputs are kept
OVERLAY_OPACITY = 0.6  # of the class colours over the image
MAX_VIDEO_SECONDS = 30  # longer videos are cut (with a note)
MAX_VIDEO_SIDE = 4096


class UserError(ValueError):
    """Bad input, explained in one line for the UI."""


@dataclass
class Segmentation:
    names: list[str]  # C class names as used (cleaned, deduplicated)
    labels: np.ndarray  # H x W int64 indices into names
    logits: np.ndarray  # C x h x w float32 (feature resolution)
    shares: dict[str, float]  # share of pixels per present class, largest first
    colors: np.ndarray  # C x 3 uint8, the legend's and the mask PNG's palette
    seconds: float
    cached: bool  # the image pass came from the cache
    gamma: float  # the unseen bias applied
    unseen: list[str]  # the names outside the training vocabulary (they got +gamma)
    notes: list[str] = field(default_factory=list)


@dataclass
class Comparison:
    names: list[str]
    colors: np.ndarray  # C x 3 uint8, shared by both pictures
    teacher: np.ndarray  # H x W int64: the teacher's training-free labels
    student: Segmentation
    teacher_seconds: float  # the teacher's image pass (when it ran)
    student_seconds: float  # the student's image pass (when it ran)
    cached: bool  # the teacher's pass came from the cache


@dataclass
class Attention:
    names: list[str]
    weights: np.ndarray  # h x w float32, sums to 1 (docs/METHOD.md#global-learning-module)
    similarity: np.ndarray  # C x h x w float32 cosine of student features and class embeddings
    seconds: float
    notes: list[str] = field(default_factory=list)


@dataclass
class PseudoLabels:
    windows: tuple[int, ...]
    maps: list[np.ndarray]  # per window: h' x w' int cluster ids, -1 = not clustered
    fused: np.ndarray  # h' x w' int region ids, -1 = none
    label: np.ndarray | None  # H x W label at the image's size, when one restricted clustering
    seconds: float
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- inputs


def _open(path) -> Image.Image:
    if path is None or str(path) == "":
        raise UserError("Upload an image first (or pick one of the examples).")
    name = Path(str(path)).name
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


def load_image(path) -> tuple[np.ndarray, list[str]]:
    """Image file -> (H x W x 3 uint8 RGB at most MAX_SIDE on its longer side, notes).

    Grey, palette, RGBA and 16-bit files are converted as the training data is (clipteacher.train.datasets).
    JPEGs are decoded at reduced size when they are large, so memory stays bounded."""
    im = _open(path)
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
            raise UserError(f"{Path(str(path)).name} could not be decoded ({err}).") from None
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
    if not np.isfinite(gamma):
        raise UserError("The unseen bias gamma must be a finite number.")
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


# ---------------------------------------------------------------------------- model


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def glm_attention(cls: np.ndarray, features: np.ndarray) -> np.ndarray:
    """GLM attention weights (docs/METHOD.md#global-learning-module): cls D (teacher CLS token), features D x h x w (raw student features)
    -> h x w weights, softmax over locations of <cls / |cls|, f_i>."""
    g = cls / max(float(np.linalg.norm(cls)), 1e-12)
    d, h, w = features.shape
    return _softmax(g.astype(np.float64) @ features.reshape(d, -1).astype(np.float64)).reshape(h, w).astype(np.float32)


def cosine_maps(features: np.ndarray, text: np.ndarray) -> np.ndarray:
    """features D x h x w, text C x D (unit) -> C x h x w cosine similarity."""
    f = features / np.maximum(np.linalg.norm(features, axis=0, keepdims=True), 1e-12)
    return np.einsum("cd,dhw->chw", text, f).astype(np.float32)


class Service:
    """The app's computations on one `clipteacher.runtime.Bundle`. Thread-safe; keeps the model
    outputs of the last CACHE_IMAGES images. `passes` counts image passes per graph."""

    def __init__(self, bundle, cache_images: int = CACHE_IMAGES):
        self.bundle = bundle
        self.cache_images = cache_images
        self.passes: Counter = Counter()
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    # --------------------------------------------------------------- cached image passes

    def _cached(self, kind: str, image: np.ndarray, run) -> tuple[object, bool, float]:
        """-> (run(image), whether it came from the cache, the seconds the pass took when it ran)."""
        key = (kind, image.shape, hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).hexdigest())
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                value, seconds = self._cache[key]
                return value, True, seconds
        start = time.perf_counter()
        value = run(image)
        seconds = time.perf_counter() - start
        with self._lock:
            self.passes[kind] += 1
            self._cache[key] = (value, seconds)
            while len(self._cache) > 2 * self.cache_images:  # two graphs per image
                self._cache.popitem(last=False)
        return value, False, seconds

    def features(self, image: np.ndarray) -> tuple[np.ndarray, bool]:
        """-> (student features 1 x D x h x w, whether they came from the cache)."""
        return self._cached("student", image, self.bundle.image_features)[:2]

    def teacher_tokens(self, image: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], bool]:
        """-> ((cls D, dense D x h' x w'), whether they came from the cache)."""
        return self._cached("teacher", image, self.bundle.teacher_tokens)[:2]

    def _text(self, names: list[str], templates: tuple[str, ...] | None) -> np.ndarray:
        try:
            return self.bundle.embed_text(names, templates)
        except ValueError as err:
            raise UserError(str(err)) from None

    # --------------------------------------------------------------- the three tabs

    def segment(self, image: np.ndarray, names_text: str, templates_text: str | None = None,
                gamma: float | None = None, cache: bool = True, features: np.ndarray | None = None) -> Segmentation:
        """cache=False for video frames: every frame differs, and keeping them would push out the uploads.
        `features` (1 x D x h x w): the student's output for `image` when the caller batched it."""
        start = time.perf_counter()
        names, notes = parse_names(names_text)
        templates = parse_templates(templates_text)
        gamma = parse_gamma(gamma)
        gamma = self.bundle.gamma if gamma is None else gamma
        if features is not None or not cache:
            features, cached = (features if features is not None else self.bundle.image_features(image)), False
        else:
            features, cached = self.features(image)
        text = self._text(names, templates)
        unseen = [n for n, out in zip(names, outside_vocabulary(names, self.bundle.vocabulary)) if out]
        labels, logits = self.bundle.classify(features, text, self.bundle.unseen_bias(names, gamma), image.shape[:2])
        return Segmentation(names, labels, logits, shares_of(labels, names), pseudo_vis.region_palette(len(names)),
                            time.perf_counter() - start, cached, gamma, unseen, notes)

    def compare(self, image: np.ndarray, names_text: str, templates_text: str | None = None,
                gamma: float | None = None) -> Comparison:
        """The student's segmentation and the teacher's own training-free one (its dense tokens against the
        same names, no unseen bias: the benchmarks' teacher row), with each image pass's time."""
        student = self.segment(image, names_text, templates_text, gamma)
        _, _, student_pass = self._cached("student", image, self.bundle.image_features)
        (_, dense), cached, teacher_pass = self._cached("teacher", image, self.bundle.teacher_tokens)
        labels, _ = self.bundle.classify(dense[None], self._text(student.names, parse_templates(templates_text)),
                                         None, image.shape[:2])
        return Comparison(student.names, student.colors, labels, student, teacher_pass, student_pass, cached)

    def live_frame(self, frame: np.ndarray, names_text: str, templates_text: str | None = None,
                   gamma: float | None = None) -> tuple[np.ndarray, Segmentation]:
        """A camera or video frame (H x W x 3 uint8) -> (overlay at the student's input size, segmentation).

        The frame is first shrunk to the student's input size (short side eval_size): the student sees
        that size anyway, and a smaller overlay is cheaper to draw and send."""
        size = self.bundle.eval_size
        small = resize_short(frame, size) if min(frame.shape[:2]) > size else frame
        seg = self.segment(small, names_text, templates_text, gamma, cache=False)
        return pseudo_vis.overlay(small, seg.labels, OVERLAY_OPACITY, seg.colors), seg

    def segment_video(self, path, names_text: str, out: Path, templates_text: str | None = None,
                      gamma: float | None = None, progress=None) -> tuple[Path, int, list[str]]:
        """Video file -> WebM (VP8) of overlays at the student's input size, at the source's frame rate.
        Returns (out, frames written, notes). `progress(done, total)` is called per frame."""
        parse_names(names_text)  # bad names, templates or gamma fail before any decoding
        parse_templates(templates_text)
        parse_gamma(gamma)
        if path is None or str(path) == "":
            raise UserError("Upload a video first.")
        reader = cv2.VideoCapture(str(path))
        try:
            if not reader.isOpened():
                raise UserError(f"{Path(str(path)).name} is not a video that can be read; upload an MP4 or WebM file.")
            w, h = int(reader.get(cv2.CAP_PROP_FRAME_WIDTH)), int(reader.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if max(w, h) > MAX_VIDEO_SIDE or min(w, h) < MIN_SIDE or max(w, h) > MAX_ASPECT * min(w, h):
                raise UserError(f"The video is {w} x {h} pixels; up to {MAX_VIDEO_SIDE} pixels a side, at least "
                                f"{MIN_SIDE}, and sides at most {MAX_ASPECT:g}:1 apart are supported.")
            fps = reader.get(cv2.CAP_PROP_FPS)
            fps = float(fps) if np.isfinite(fps) and 1 <= fps <= 120 else 25.0
            limit = int(MAX_VIDEO_SECONDS * fps)
            total = int(reader.get(cv2.CAP_PROP_FRAME_COUNT))
            total = min(total, limit) if total > 0 else limit
            notes, writer, done = [], None, 0
            while True:
                ok, frame = reader.read()
                if not ok:
                    break
                if done == limit:
                    notes.append(f"Only the first {MAX_VIDEO_SECONDS} s of the video were segmented.")
                    break
                overlay, _ = self.live_frame(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), names_text, templates_text, gamma)
                if writer is None:
                    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"VP80"), fps,
                                             (overlay.shape[1], overlay.shape[0]))
                writer.write(cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR))
                done += 1
                if progress is not None:
                    progress(done, max(total, done))
            if writer is None:
                raise UserError(f"{Path(str(path)).name} has no frames that can be decoded.")
            writer.release()
        finally:
            reader.release()
        return out, done, notes

    def attention(self, image: np.ndarray, names_text: str | None = None,
                  templates_text: str | None = None) -> Attention:
        start = time.perf_counter()
        names, notes = parse_names(names_text) if (names_text or "").strip() else ([], [])
        templates = parse_templates(templates_text)
        features, _ = self.features(image)
        (cls, _), _ = self.teacher_tokens(image)
        weights = glm_attention(cls, features[0])
        sims = (cosine_maps(features[0], self._text(names, templates)) if names
                else np.zeros((0,) + weights.shape, np.float32))
        return Attention(names, weights, sims, time.perf_counter() - start, notes)

    def pseudo_labels(self, image: np.ndarray, label: np.ndarray | None = None, windows=(3, 7),
                      threshold: float = 0.8, fusion: str = "centroid") -> PseudoLabels:
        """K-Means regions on the teacher's dense tokens, exactly as training/pseudo_labels.py."""
        start = time.perf_counter()
        if fusion not in ("centroid", "overlap"):
            raise UserError(f"Fusion must be 'centroid' or 'overlap', got {fusion!r}.")
        if not 0.0 <= float(threshold) <= 1.0:
            raise UserError(f"The fusion threshold must be between 0 and 1, got {threshold}.")
        (_, dense), _ = self.teacher_tokens(image)
        tokens = np.ascontiguousarray(dense.transpose(1, 2, 0))  # h' x w' x D
        too_big = [k for k in windows if k > min(tokens.shape[:2])]
        if too_big:
            raise UserError(f"Window {too_big[0]} is larger than the teacher's {tokens.shape[0]} x {tokens.shape[1]} "
                            f"token grid.")
        notes = []
        if label is not None:
            if label.shape != image.shape[:2]:
                raise UserError(f"The label is {label.shape[1]} x {label.shape[0]} pixels but the image is "
                                f"{image.shape[1]} x {image.shape[0]}.")
            if not (label == 255).any():
                notes.append("The label has no ignored pixels (value 255), so nothing was clustered.")
        maps, fused = regions_for_image(tokens, label, windows=tuple(windows), threshold=float(threshold),
                                        criterion=fusion)
        return PseudoLabels(tuple(windows), maps, fused, label, time.perf_counter() - start, notes)

    def info(self) -> dict:
        b = self.bundle
        return {"bundle": b.folder.name, "provider": b.provider, "fallback_reason": b.fallback_reason,
                "precision": b.precision,
                "vocabulary": list(b.vocabulary), "gamma": b.gamma, "templates": list(b.templates),
                "eval_size": b.eval_size, "teacher": b.teacher_kind,
                "checkpoint": Path(b.meta.get("source", {}).get("checkpoint", "")).name}


# ---------------------------------------------------------------------------- pictures


def mask_png(labels: np.ndarray, names: list[str], colors: np.ndarray, path: Path) -> Path:
    """Save H x W class indices as an 8-bit palette PNG (pixel = index into names; the names
    are stored in the PNG's 'classes' text chunk as JSON)."""
    from PIL import PngImagePlugin

    im = Image.fromarray(labels.astype(np.uint8), "P")
    palette = np.zeros((256, 3), np.uint8)
    palette[: len(colors)] = colors
    im.putpalette(palette.ravel().tolist())
    info = PngImagePlugin.PngInfo()
    info.add_itxt("classes", json.dumps(names, ensure_ascii=False))
    im.save(path, pnginfo=info)
    return path


def save_jpeg(image: np.ndarray, path: Path, quality: int = 90) -> Path:
    """H x W x 3 uint8 RGB -> JPEG file (OpenCV's encoder: a few ms for a 1024-px picture)."""
    ok, data = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for an image of shape {image.shape}")
    path.write_bytes(data.tobytes())
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


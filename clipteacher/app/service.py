"""What the app computes, as plain functions over numpy arrays: no Gradio, no torch.

    service = Service(Bundle("bundles/default"))
    image, notes = load_image("cow.jpg")                       # H x W x 3 uint8, downscaled if huge
    seg = service.segment(image, "cow, grass, sky")            # Segmentation: labels H x W, shares, ...
    att = service.attention(image, "cow, grass")               # Attention: GLM weights h x w, similarities C x h x w
    plm = service.pseudo_labels(image, label=None)             # PseudoLabels: per-window maps, fused map

Bad input raises `clipteacher.request.UserError` with a one-line message meant for the person at the
UI; things worth knowing that do not stop the request (a downscaled image, dropped duplicate names)
come back as `notes`. Image passes are cached on the image's content, so a new vocabulary, gamma
or template set re-runs only the text encoder and the classifier.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from clipteacher.prompts import outside_vocabulary
from clipteacher.runtime.bundle import check_hubness
from clipteacher.pseudo import regions_for_image, vis as pseudo_vis
from clipteacher.io import resize_short
# The request layer (shared with clipteacher-predict); names used by the UI are reached through this module too.
from clipteacher.request import (MAX_ASPECT, MAX_CLASSES, MAX_GAMMA, MAX_NAME_CHARS, MAX_PIXELS, MAX_SIDE, MIN_SIDE,  # noqa: F401
                                 UserError, fit, heat_overlay, hex_color, image_size, legend_html, load_image,
                                 load_label, mask_png, parse_gamma, parse_names, parse_templates, parse_windows,
                                 encode_jpeg, save_jpeg, shares_of)

CACHE_IMAGES = 8  # images whose model outputs are kept
OVERLAY_OPACITY = 0.6  # of the class colours over the image
MAX_VIDEO_SECONDS = 30  # longer videos are cut (with a note)
MAX_VIDEO_SIDE = 4096
YIELD_SECONDS = 2.0  # longest a video frame waits for interactive requests to finish



@dataclass
class Segmentation:
    names: list[str]  # C class names as used (cleaned, deduplicated)
    labels: np.ndarray  # H x W int64 indices into names
    shares: dict[str, float]  # share of pixels per present class, largest first
    colors: np.ndarray  # C x 3 uint8, the legend's and the mask PNG's palette
    seconds: float
    cached: bool  # the image pass came from the cache
    gamma: float  # the unseen bias applied
    unseen: list[str]  # the names outside the training vocabulary (they got +gamma)
    notes: list[str] = field(default_factory=list)
    replica: str | None = None  # the Serve replica that answered, when the request went to a backend


@dataclass
class Comparison:
    names: list[str]
    colors: np.ndarray  # C x 3 uint8, shared by both pictures
    teacher: np.ndarray  # H x W int64: the teacher's training-free labels
    student: Segmentation
    teacher_seconds: float  # the teacher's image pass (when it ran)
    student_seconds: float  # the student's image pass (when it ran)
    cached: bool  # the teacher's pass came from the cache
    others: list = field(default_factory=list)  # (label, Segmentation, image-pass seconds) per --compare-bundle
    teacher_threads: int | None = None  # onnxruntime threads each pass ran on (None: onnxruntime's default, all cores)
    student_threads: int | None = None


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


# ---------------------------------------------------------------------------- model


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def glm_attention(cls: np.ndarray, features: np.ndarray, scaled: bool = False) -> np.ndarray:
    """GLM attention weights, numpy twin of `clipteacher.train.glm.GlobalLearningModule.attention` (a test holds
    them equal): cls D (teacher CLS token), features D x h x w (raw student features) -> h x w weights, softmax
    over locations of <cls / |cls|, f_i> (divided by sqrt(D) when the model trained with glm.scaled)."""
    g = cls / max(float(np.linalg.norm(cls)), 1e-12)
    d, h, w = features.shape
    scores = g.astype(np.float64) @ features.reshape(d, -1).astype(np.float64)
    if scaled:
        scores = scores / d**0.5
    return _softmax(scores).reshape(h, w).astype(np.float32)


def cosine_maps(features: np.ndarray, text: np.ndarray) -> np.ndarray:
    """features D x h x w, text C x D (unit) -> C x h x w cosine similarity."""
    f = features / np.maximum(np.linalg.norm(features, axis=0, keepdims=True), 1e-12)
    return np.einsum("cd,dhw->chw", text, f).astype(np.float32)


class Service:
    """The app's computations on one `clipteacher.runtime.Bundle`. Thread-safe; keeps the model
    outputs of the last CACHE_IMAGES images. `passes` counts image passes per graph."""

    def __init__(self, bundle, cache_images: int = CACHE_IMAGES, others: dict | None = None, backend=None,
                 hubness: bool | None = None):
        """others: label -> Service of another bundle (a ZegCLIP/TagCLIP or another student) shown in Compare.
        backend: a `clipteacher.serve.client.ServeClient`; `segment_remote` sends requests there.
        hubness: serve the hubness correction on or off (None: as the bundle says)."""
        check_hubness(bundle.meta, bundle.folder, hubness)
        self.bundle = bundle
        self.hubness = hubness
        self.backend = backend
        self.backend_info = backend.info() if backend is not None else None
        self.others = dict(others or {})
        self.cache_images = cache_images
        self.passes: Counter = Counter()
        self._cache: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._foreground = 0  # interactive requests computing now (`foreground`)
        self._idle = threading.Condition()

    # --------------------------------------------------------------- interactive requests before long jobs

    @contextlib.contextmanager
    def foreground(self):
        """Mark an interactive request (segment, compare, attention, pseudo labels) while it computes. Long
        jobs (`segment_video`) wait between frames while any is marked, so a video never slows an image
        request down by sharing the cores with it."""
        with self._idle:
            self._foreground += 1
        try:
            yield
        finally:
            with self._idle:
                self._foreground -= 1
                self._idle.notify_all()

    def yield_to_foreground(self, limit: float = YIELD_SECONDS) -> None:
        """Wait (at most `limit` seconds, so a steady stream of images cannot stall a video for ever) until no
        interactive request is computing."""
        with self._idle:
            self._idle.wait_for(lambda: self._foreground == 0, timeout=limit)

    # --------------------------------------------------------------- cached image passes

    @staticmethod
    def _key(kind: str, image: np.ndarray) -> tuple:
        return kind, image.shape, hashlib.blake2b(np.ascontiguousarray(image).data, digest_size=16).hexdigest()

    def _cached(self, kind: str, image: np.ndarray, run) -> tuple[object, bool, float, int | None]:
        """-> (run(image), whether it came from the cache, the seconds the pass took when it ran, and the onnxruntime
        threads it ran on: a pass that found the app idle ran on all the cores, `Bundle.solo_threads`)."""
        key = self._key(kind, image)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                value, seconds, threads = self._cache[key]
                return value, True, seconds, threads
        start = time.perf_counter()
        value = run(image)
        seconds = time.perf_counter() - start
        threads = self.bundle.last_threads
        with self._lock:
            self.passes[kind] += 1
            self._cache[key] = (value, seconds, threads)
            # per graph: a bound on all entries kept twice as many images when only one graph ran (160 MB of
            # student features of the vocabulary-head model, which are 10 MB an image)
            same = [k for k in self._cache if k[0] == kind]
            for old in same[: len(same) - self.cache_images]:
                del self._cache[old]
        return value, False, seconds, threads

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
        unseen = [n for n, out in zip(names, outside_vocabulary(names, self.bundle.vocabulary)) if out]
        try:
            labels, _ = self.bundle.label_features(features, names, image.shape[:2], gamma, templates,
                                                        self.hubness)
        except ValueError as err:  # templates or names the text encoder refuses
            raise UserError(str(err)) from None
        return Segmentation(names, labels, shares_of(labels, names), pseudo_vis.region_palette(len(names)),
                            time.perf_counter() - start, cached, gamma, unseen, notes)

    def segment_remote(self, image: np.ndarray, data: bytes, names_text: str, templates_text: str | None = None,
                       gamma: float | None = None) -> Segmentation:
        """`segment` computed by the Serve deployment (`backend`): `data` is the file `image` was decoded from,
        sent as it is (the replica decodes it by the same rules, so the labels come back at image's size)."""
        start = time.perf_counter()
        names, notes = parse_names(names_text)  # bad input fails here, without a round trip
        parse_templates(templates_text)
        gamma = parse_gamma(gamma)
        labels, reply = self.backend.segment(data, names_text, gamma, templates_text, self.hubness)
        if labels.shape != image.shape[:2] or reply["classes"] != names:
            raise UserError("The segmentation backend decoded the image or the names differently from this app "
                            "(another clipteacher version?).")
        info = self.backend_info
        unseen = [n for n, out in zip(names, outside_vocabulary(names, info["vocabulary"])) if out]
        return Segmentation(names, labels, shares_of(labels, names), pseudo_vis.region_palette(len(names)),
                            time.perf_counter() - start, False, info.get("gamma", 0.0) if gamma is None else gamma,
                            unseen, notes, str(reply.get("replica", "")))

    def compare(self, image: np.ndarray, names_text: str, templates_text: str | None = None,
                gamma: float | None = None) -> Comparison:
        """The student's segmentation and the teacher's own training-free one (its dense tokens against the
        same names, no unseen bias: the benchmarks' teacher row), with each image pass's time."""
        student = self.segment(image, names_text, templates_text, gamma)
        features, _, student_pass, student_threads = self._cached("student", image, self.bundle.image_features)
        (_, dense), cached, teacher_pass, teacher_threads = self._cached("teacher", image, self.bundle.teacher_tokens)
        if student_threads != teacher_threads:  # the student ran alone on every core (solo_threads), the teacher
            with self.bundle.without_solo():    # has no such copy: time the student as the teacher ran, once
                start = time.perf_counter()
                self.bundle.image_features(image)
                student_pass, student_threads = time.perf_counter() - start, self.bundle.last_threads
            with self._lock:  # the next Compare of this image reads this time
                self._cache[self._key("student", image)] = (features, student_pass, student_threads)
        labels, _ = self.bundle.classify(dense[None], self._text(student.names, parse_templates(templates_text)),
                                         None, image.shape[:2], graph="cosine")
        others = []
        for label, other in self.others.items():  # each at its own bundle's gamma: its own training vocabulary
            seg = other.segment(image, names_text, templates_text)
            others.append((label, seg, other._cached("student", image, other.bundle.image_features)[2]))
        return Comparison(student.names, student.colors, labels, student, teacher_pass, student_pass, cached, others,
                          teacher_threads, student_threads)

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
                self.yield_to_foreground()
                with self.bundle.without_solo():  # a long job never takes every core (Bundle solo_threads)
                    overlay, _ = self.live_frame(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), names_text, templates_text,
                                                 gamma)
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
        # the first D channels: ZegCLIP's CLIP tokens (it packs [tokens; g]); for a student with the vocabulary
        # head, its MLP feature (the coarse mixture packed after it is left out of this view)
        features = features[:, : self.bundle.embed_dim]
        (cls, _), _ = self.teacher_tokens(image)
        weights = glm_attention(cls, features[0], bool(self.bundle.meta.get("glm", {}).get("scaled", False)))
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
        if label is not None and (label == 255).any() and not (fused >= 0).any():
            notes.append(f"No region was found: only {(label == 255).mean():.1%} of the label's pixels are 255 "
                         f"(unlabelled), too few to cover a teacher token. A label holds class ids with 255 where "
                         f"unlabelled; a colour picture saved as a palette PNG is not one.")
        return PseudoLabels(tuple(windows), maps, fused, label, time.perf_counter() - start, notes)

    def info(self) -> dict:
        b = self.bundle
        return {"bundle": b.folder.name, "provider": b.provider, "fallback_reason": b.fallback_reason,
                "precision": b.precision,
                "vocabulary": list(b.vocabulary), "gamma": b.gamma, "templates": list(b.templates),
                "eval_size": b.eval_size, "teacher": b.teacher_kind,
                "hubness": b.hubness_default if self.hubness is None else self.hubness,
                "checkpoint": Path(b.meta.get("source", {}).get("checkpoint", "")).name} \
            | ({"backend": self.backend.url, "backend_bundle": self.backend_info.get("bundle")} if self.backend else {})



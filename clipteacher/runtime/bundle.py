"""Run an exported bundle with onnxruntime and numpy only (no torch): the app's whole model API.

    from clipteacher.runtime import Bundle
    bundle = Bundle("bundles/default")            # CUDA when onnxruntime can use it, else CPU
    bundle.provider                               # "CUDAExecutionProvider" | "CPUExecutionProvider"
    labels = bundle.segment(image, ["cow", "grass", "zebra"])          # H x W int64 indices into the names

or step by step, so a new vocabulary never re-runs the image pass:
    feats = bundle.image_features(image)                                # 1 x D x h x w float32
    text = bundle.embed_text(["cow", "grass", "zebra"])                 # C x D float32, unit rows
    bias = bundle.unseen_bias(["cow", "grass", "zebra"])                # C float32: +gamma outside the training vocabulary
    bias += bundle.hubness_bias(text)                                   # C float32: hubness correction (when on)
    labels, logits = bundle.classify(feats, text, bias, out_size=image.shape[:2])  # H x W int64, C x h x w float32
    labels, _ = bundle.classify(dense[None], text, None, image.shape[:2], graph="cosine")  # the teacher's own labels
    cls, dense = bundle.teacher_tokens(image)                           # D, D x h' x w' (unit; teacher space)

Images are H x W x 3 uint8 RGB. `image_features` resizes to a short side of `size` (default
`bundle.eval_size`, the training evaluation size) with OpenCV's bilinear resize, exactly as the
training evaluation does; the student graph normalises inside, so it is fed RGB in [0, 1].
`classify` returns logits at feature resolution (cheap score maps; softmax them for
probabilities) and labels computed in the graph from logits bilinearly upsampled to out_size.
`embed_text` averages the prompt templates and L2-normalises, as `Teacher.encode_text`; names of
the checkpoint's dataset are served from the cached embeddings in bundle.json when the templates
are the bundle's, and every newly embedded name is cached until `clear_text_cache()`.

Attributes: folder, meta (bundle.json), provider, precision, vocabulary, gamma, logit_scale,
embed_dim, eval_size, templates, teacher_kind, teacher_input_size, method ("clipteacher" | "maskclip_plus":
a student; "zegclip": ZegCLIP/TagCLIP, CLIP at inference), trusty (TagCLIP), feature_dim (channels of
image_features: embed_dim for a student; 2 x embed_dim for ZegCLIP, whose features pack [tokens; g]).
"""
from __future__ import annotations

import contextlib
import json
import logging
import threading
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort

from clipteacher.io import resize_short, sha256_file
from clipteacher.prompts import check_templates, fill, outside_vocabulary
from clipteacher.runtime.providers import open_session

BUNDLE_FORMAT = "clipteacher-bundle-v1"
# Hubness correction (docs/METHOD.md#hubness-correction): each name's logit minus strength x its expected
# logit under the student's features of training images. Written into bundle.json at export.
HUBNESS_STRENGTH = 1.0
HUBNESS_DEFAULT = True  # on: it raised the probe and cost the zero-shot benchmarks at most 0.5 val hIoU (docs/RESULTS.md)
TEXT_BATCH = 64  # texts per text-encoder run (bounds memory for long vocabularies)
SOLO_GRAPHS = ("student", "classifier")  # what every request runs; a solo copy of the text encoder or teacher
# would cost 90 or 30 MB for a few ms on a new name or in the Compare view
log = logging.getLogger(__name__)
_arena = {"lock": threading.Lock(), "ready": None}  # the process's shared CPU arena (shared_cpu_arena)


def to_input(image: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> 1 x 3 x H x W float32 in [0, 1]."""
    return np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0


def check_image(image) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{image.shape} {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"expected an H x W x 3 uint8 RGB image, got {got}")
    return image


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def shared_cpu_arena() -> bool:
    """Register one CPU memory arena for every onnxruntime session of this process (once); True when in place.

    Each session otherwise grows an arena of its own to its peak and keeps it: with a solo copy of the student
    next to the per-request one, a server held both peaks (270 MB more over 64 concurrent requests, measured
    with bench/serve.py's images); sessions that opt in (session.use_env_allocators) draw from one pool."""
    with _arena["lock"]:
        if _arena["ready"] is None:
            try:
                info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
                ort.create_and_register_allocator(info, ort.OrtArenaCfg({}))
                _arena["ready"] = True
            except Exception as err:  # noqa: BLE001 - an onnxruntime without it: per-session arenas, as before
                log.info("no shared CPU arena (%s); each session keeps its own", err)
                _arena["ready"] = False
        return _arena["ready"]


def read_meta(folder: str | Path) -> dict:
    """A bundle folder's bundle.json, checked to be this format (what the driver of a Ray job reads, not opening
    the graphs that its actors open)."""
    path = Path(folder) / "bundle.json"
    if not path.is_file():
        raise FileNotFoundError(f"not a bundle (no bundle.json): {folder}")
    meta = json.loads(path.read_text())
    if meta.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected '{BUNDLE_FORMAT}'")
    return meta


def check_hubness(meta: dict, folder: str | Path, on: bool | None) -> None:
    """Raise ValueError (one line) when `on` asks for the hubness correction that the bundle has no reference for."""
    if on and not meta.get("hubness"):
        raise ValueError(f"{Path(folder).name} has no hubness reference; export it again to add one")


class Bundle:
    """An exported bundle loaded with onnxruntime. See the module docstring for the API.

    precision: "fp32" | "int8" | "fp16" picks the student graph (the variant must have been exported).
    providers: force onnxruntime providers; default CUDA when usable, else CPU.
    verify: check every file's sha256 against bundle.json.
    threads: onnxruntime intra-op threads per session (None: onnxruntime's default, all cores).
    spin: let idle onnxruntime threads spin-wait (fastest alone; off when requests run concurrently).
    solo_threads: on the CPU and with `threads` set lower, a second session of the student and classifier graphs
        with this many intra-op threads (never spinning) runs each of their calls that starts while no other call
        of this bundle is running, so a lone request uses all the cores and concurrent ones keep `threads` each
        (None: one session per graph). Its sessions then share the process's CPU arena (`shared_cpu_arena`).
    """

    def __init__(self, folder: str | Path, precision: str = "fp32", providers: list[str] | None = None,
                 verify: bool = True, verbose: bool = True, threads: int | None = None, spin: bool = True,
                 solo_threads: int | None = None):
        self.folder = Path(folder)
        self.meta = meta = read_meta(self.folder)
        if verify:
            for name, digest in meta["checksums"].items():
                if not (self.folder / name).is_file() or sha256_file(self.folder / name) != digest:
                    raise ValueError(f"bundle file {self.folder / name} is missing or does not match its checksum")
        key = {"fp32": "student", "int8": "student_int8", "fp16": "student_fp16"}.get(precision)
        if key is None or key not in meta["files"]:
            raise ValueError(f"precision '{precision}' is not in bundle {self.folder}; "
                             f"exported: {', '.join(k for k in meta['files'] if k.startswith('student'))}")
        self.precision = precision
        self._student_file = meta["files"][key]
        self._options = ort.SessionOptions()
        self.threads = int(threads) if threads else None  # None: onnxruntime's default (all cores)
        if threads:
            self._options.intra_op_num_threads = int(threads)
        if not spin:
            self._options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._solo_options = None
        if solo_threads and threads and int(solo_threads) > int(threads):
            self._solo_options = ort.SessionOptions()
            self._solo_options.intra_op_num_threads = int(solo_threads)
            # a spinning pool would hold the cores after the call, from the next request's Python work
            self._solo_options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.vocabulary: list[str] = meta["vocabulary"]
        self.gamma = float(meta["gamma"])
        self.logit_scale = float(meta["logit_scale"])
        self.embed_dim = int(meta["embed_dim"])
        self.eval_size = int(meta["eval_size"])
        self.stride = int(meta["feature_stride"])
        self.templates = tuple(meta["teacher"]["templates"])
        self.teacher_kind = meta["teacher"]["kind"]
        self.teacher_input_size = int(meta["teacher"]["input_size"])
        model = meta.get("model") or {}  # bundles before the baselines hold a student
        self.method = model.get("method", "clipteacher")  # clipteacher | maskclip_plus: a student; zegclip: CLIP at inference
        self.trusty = bool(model.get("trusty", False))  # TagCLIP: the classifier weighs seen vs unseen by its trusty map
        self.feature_dim = int(model.get("feature_dim", self.embed_dim))  # channels of image_features (2 D for ZegCLIP)
        self.clear_text_cache()

        self._sessions: dict[tuple[str, bool], ort.InferenceSession] = {}  # (graph, solo) -> session
        self._sessions_lock = threading.Lock()  # two requests must not build the same session twice
        self.provider, self._providers = self._choose_provider(meta["files"][key], providers)
        msg = f"clipteacher.runtime.bundle: {self.folder.name} on {self.provider} ({precision} student)"
        log.info(msg)
        if verbose:
            print(msg)
        self.solo_threads = None  # set when the solo sessions are in use
        if self.provider != "CPUExecutionProvider":
            self._solo_options = None  # the threads do not matter on a GPU
        if self._solo_options is not None:
            self.solo_threads = int(solo_threads)
            if shared_cpu_arena():  # the solo copies and the per-request sessions draw from one pool of memory
                for options in (self._options, self._solo_options):
                    options.add_session_config_entry("session.use_env_allocators", "1")
                del self._sessions[("student", False)]  # rebuilt with the option (not held twice meanwhile)
                self._session("student")
        self._running = 0  # graph calls in flight (`_call` picks the solo session when there are none)
        self._running_lock = threading.Lock()
        self._local = threading.local()  # per thread: `without_solo`, and the threads of its last call
        self.solo_calls = 0  # graph calls that ran on the solo session (tests and benches read it)
        self._tokenizer = None

    @property
    def model_name(self) -> str:
        """What the image pass is, for people: student, MaskCLIP+ student, ZegCLIP or TagCLIP."""
        if self.method == "zegclip":
            return "TagCLIP" if self.trusty else "ZegCLIP"
        return "MaskCLIP+ student" if self.method == "maskclip_plus" else "student"

    # ------------------------------------------------------------------ sessions

    def _choose_provider(self, student_file: str, providers: list[str] | None) -> tuple[str, list[str]]:
        """Create the student session on the provider CLIPTEACHER_DEVICE asks for (clipteacher.runtime.providers:
        CUDA when a GPU is visible and its provider works, else CPU; self.fallback_reason says why a visible GPU
        is not used). Raises providers.DeviceError for CLIPTEACHER_DEVICE=cuda without a working CUDA provider."""
        def create(wanted: list[str]) -> ort.InferenceSession:
            return ort.InferenceSession(str(self.folder / student_file), self._options, providers=wanted)

        self._sessions[("student", False)], chosen, self.fallback_reason = open_session(create, providers)
        return chosen, [chosen] + (["CPUExecutionProvider"] if chosen != "CPUExecutionProvider" else [])

    def _session(self, key: str, solo: bool = False) -> ort.InferenceSession:
        """Lazily created session for meta['files'][key] (teacher and text encoder load only when used);
        solo: the one with `solo_threads` threads."""
        sess = self._sessions.get((key, solo))
        if sess is not None:  # the common case, without waiting for a session being built for another graph
            return sess
        with self._sessions_lock:
            if (key, solo) not in self._sessions:
                file = self._student_file if key == "student" else self.meta["files"][key]
                self._sessions[(key, solo)] = ort.InferenceSession(
                    str(self.folder / file), self._solo_options if solo else self._options, providers=self._providers)
            return self._sessions[(key, solo)]

    def open_sessions(self) -> None:
        """Create every graph's session now (a server does so before its first request): the teacher, the text
        encoder, the classifiers and the solo copies."""
        for key in ("teacher", "text_encoder", "classifier", "cosine"):
            if key in self.meta["files"]:
                self._session(key)
        for key in SOLO_GRAPHS if self._solo_options is not None else ():
            self._session(key, solo=True)

    @contextlib.contextmanager
    def without_solo(self):
        """Calls made by this thread inside the block never take the solo session (a long job, such as a video,
        must not hold every core while people wait for images)."""
        before = getattr(self._local, "no_solo", False)
        self._local.no_solo = True
        try:
            yield
        finally:
            self._local.no_solo = before

    @property
    def last_threads(self) -> int | None:
        """Intra-op threads of this thread's last graph call (None: onnxruntime's default, all cores)."""
        return getattr(self._local, "threads", self.threads)

    def _call(self, key: str, feed: dict) -> list[np.ndarray]:
        """Run graph `key` on `feed` (names it does not take are left out: an exported graph drops inputs it does
        not use, such as CLIP's attention_mask), on the solo session when no other call is running."""
        with self._running_lock:
            solo = (self._solo_options is not None and self._running == 0 and key in SOLO_GRAPHS
                    and not getattr(self._local, "no_solo", False))
            self._running += 1
            self.solo_calls += solo
        self._local.threads = self.solo_threads if solo else self.threads
        try:
            sess = self._session(key, solo)
            return sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})
        finally:
            with self._running_lock:
                self._running -= 1

    # ------------------------------------------------------------------ image

    def image_features(self, image: np.ndarray, size: int | None = None) -> np.ndarray:
        """H x W x 3 uint8 RGB -> 1 x D x h x w float32 (unnormalised), h, w = resized size / stride."""
        return self.batch_features([image], size)

    def batch_features(self, images: list[np.ndarray], size: int | None = None) -> np.ndarray:
        """N same-size H x W x 3 uint8 RGB images -> N x D x h x w float32, one run of the student."""
        if len({check_image(image).shape for image in images}) != 1:
            raise ValueError("batch_features needs one or more images of one size")
        x = np.concatenate([to_input(resize_short(image, size or self.eval_size)) for image in images])
        return self._call("student", {"image": x})[0]

    def classify(self, features: np.ndarray, class_embeddings: np.ndarray, bias: np.ndarray | None = None,
                 out_size: tuple[int, int] | None = None, unseen: np.ndarray | None = None,
                 graph: str = "classifier") -> tuple[np.ndarray, np.ndarray]:
        """features 1 x F x h x w (F = feature_dim), class_embeddings C x D (unit), bias C (default 0), unseen C bool
        (names outside the training vocabulary; only TagCLIP's classifier reads it; default none) ->
        (labels out_size H x W int64, logits C x h x w float32). out_size defaults to (h, w) * stride.
        graph="cosine": plain cosine logits of D x h x w features (the teacher's tokens in the Compare view)."""
        graph = "classifier" if graph == "cosine" and "cosine" not in self.meta["files"] else graph
        dim = self.feature_dim if graph == "classifier" else self.embed_dim
        if features.ndim != 4 or features.shape[0] != 1 or features.shape[1] != dim:
            raise ValueError(f"features must be 1 x {dim} x h x w, got {features.shape}")
        text = np.asarray(class_embeddings, dtype=np.float32)
        if text.ndim != 2 or text.shape[1] != self.embed_dim or len(text) == 0:
            raise ValueError(f"class_embeddings must be C x {self.embed_dim} with C >= 1, got {text.shape}")
        bias = np.zeros(len(text), np.float32) if bias is None else np.asarray(bias, dtype=np.float32).reshape(-1)
        if len(bias) != len(text):
            raise ValueError(f"bias has {len(bias)} entries for {len(text)} classes")
        if out_size is None:
            out_size = (features.shape[2] * self.stride, features.shape[3] * self.stride)
        unseen = np.zeros(len(text), np.float32) if unseen is None else np.asarray(unseen, dtype=np.float32).reshape(-1)
        logits, labels = self._call(graph, {
            "features": features.astype(np.float32, copy=False), "class_embeddings": text, "bias": bias,
            "unseen": unseen, "out_size": np.asarray(out_size[:2], dtype=np.int64)})
        return labels[0], logits[0]

    def label_features(self, features: np.ndarray, names: list[str], out_size: tuple[int, int],
                       gamma: float | None = None, templates=None, hubness: bool | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
        """Serving's classification of known student features (1 x D x h x w) against typed names: their
        embeddings (cached), +gamma outside the training vocabulary, the hubness correction (None: the
        bundle's default) -> (labels out_size H x W int64, logits C x h x w)."""
        text = self.embed_text(names, templates)
        bias = self.unseen_bias(names, gamma) + self.hubness_bias(text, hubness)
        return self.classify(features, text, bias, out_size, unseen=outside_vocabulary(names, self.vocabulary))

    def segment(self, image: np.ndarray, names: list[str], gamma: float | None = None,
                size: int | None = None) -> np.ndarray:
        """H x W x 3 uint8 RGB -> H x W int64 indices into `names` (unseen names get +gamma)."""
        return self.label_features(self.image_features(image, size), names, image.shape[:2], gamma)[0]

    def teacher_tokens(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """H x W x 3 uint8 RGB -> (cls D, dense D x h x w), both unit vectors in the text space.

        The image is resized (aspect not kept) to the teacher's square input size, as in training."""
        s = self.teacher_input_size
        x = to_input(cv2.resize(check_image(image), (s, s), interpolation=cv2.INTER_LINEAR))
        cls, dense = self._call("teacher", {"image": x})
        return cls[0], dense[0]

    # ------------------------------------------------------------------ text

    def unseen_bias(self, names: list[str], gamma: float | None = None) -> np.ndarray:
        """C float32: gamma (default the bundle's) for names outside the training vocabulary, 0 otherwise."""
        g = self.gamma if gamma is None else float(gamma)
        return np.array([g if out else 0.0 for out in outside_vocabulary(names, self.vocabulary)], dtype=np.float32)

    @property
    def has_hubness(self) -> bool:
        """The bundle carries a hubness reference (bundles exported before it, or without training images, do not)."""
        return bool(self.meta.get("hubness"))

    @property
    def hubness_default(self) -> bool:
        """Whether requests that do not say get the hubness correction (`meta["hubness"]` is null without a reference)."""
        return bool((self.meta.get("hubness") or {}).get("default"))

    def hubness_bias(self, class_embeddings: np.ndarray, on: bool | None = None) -> np.ndarray:
        """C float32 to add to the logits: -strength x logit_scale x (each name's mean cosine over the reference
        features), so a name that scores high everywhere (a hub) no longer wins everywhere. One dot product per
        name; the image pass is untouched. on: None = the bundle's default; zeros when off."""
        text = np.asarray(class_embeddings, dtype=np.float32)
        ref = self.meta.get("hubness")
        if on is None:
            on = self.hubness_default
        check_hubness(self.meta, self.folder, on)
        if not on:
            return np.zeros(len(text), np.float32)
        mean = np.asarray(ref["mean"], dtype=np.float32)
        return (-float(ref["strength"]) * self.logit_scale * (text @ mean)).astype(np.float32)

    def tokenize(self, texts: list[str]) -> dict[str, np.ndarray]:
        """texts -> dict(input_ids B x L int64, attention_mask B x L int64), as the teacher's tokenizer."""
        spec = self.meta["teacher"]["tokenizer"]
        if self._tokenizer is None:
            path = str(self.folder / spec["file"])
            if spec["kind"] == "wordpiece":
                from tokenizers import Tokenizer

                tok = Tokenizer.from_file(path)
                # as transformers' (padding=True, truncation=True, max_length=...): pad to the longest
                tok.enable_truncation(max_length=int(spec["max_length"]))
                tok.enable_padding(pad_id=tok.token_to_id(spec["pad_token"]), pad_token=spec["pad_token"])
                self._tokenizer = tok
            elif spec["kind"] == "clip_bpe":
                from clipteacher.runtime.clip_tokenizer import ClipTokenizer

                self._tokenizer = ClipTokenizer(path, int(spec["context_length"]))
            else:
                raise ValueError(f"bundle {self.folder}: unknown tokenizer kind '{spec['kind']}'")
        if spec["kind"] == "wordpiece":
            enc = self._tokenizer.encode_batch(list(texts))
            return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                    "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64)}
        ids = self._tokenizer(list(texts))
        return {"input_ids": ids, "attention_mask": (ids != 0).astype(np.int64)}

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Raw texts (already prompted) -> B x D unit embeddings through the text encoder."""
        out = [self._call("text_encoder", self.tokenize(texts[i: i + TEXT_BATCH]))[0]
               for i in range(0, len(texts), TEXT_BATCH)]
        return np.concatenate(out).astype(np.float32, copy=False)

    def clear_text_cache(self) -> None:
        """Forget names embedded since loading; keep the cached embeddings from bundle.json."""
        cache = self.meta["text_cache"]
        vectors = np.asarray(cache["embeddings"], dtype=np.float32).reshape(len(cache["names"]), self.embed_dim)
        self._text_cache = {(self.templates, n): v for n, v in zip(cache["names"], vectors)}

    def embed_text(self, names: list[str], templates: list[str] | tuple[str, ...] | None = None) -> np.ndarray:
        """C class names -> C x D float32: the L2-normalised mean of the prompted names' embeddings."""
        if isinstance(names, str) or len(names) == 0 or not all(isinstance(n, str) for n in names):
            raise ValueError(f"embed_text expects a non-empty list of names, got {names!r}")
        templates = self.templates if templates is None else tuple(templates)
        templates = check_templates(templates)
        missing = list(dict.fromkeys(n for n in names if (templates, n) not in self._text_cache))
        if missing:
            texts = [fill(t, n) for n in missing for t in templates]
            emb = self.encode_texts(texts).reshape(len(missing), len(templates), -1).mean(1)
            self._text_cache.update({(templates, n): e for n, e in zip(missing, _normalize(emb))})
        return np.stack([self._text_cache[(templates, n)] for n in names])

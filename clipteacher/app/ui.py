"""The Gradio Blocks layout: one image and a vocabulary on the left, five views on the right (Segment,
Compare, Live, GLM attention, Pseudo labels), one function per view plus `build_demo`, which wires them.

    demo = build_demo(Service(Bundle("bundles/default")))
    launch(demo, "127.0.0.1", 7860)

Every view is an API endpoint (gradio_client): /segment, /compare, /live, /video, /attention,
/pseudo_labels, /info. Handlers turn `clipteacher.request.UserError` into a gr.Error toast and notes
into gr.Warning toasts; anything unexpected is logged with its traceback on the server and shown as one line.
The example pictures ship inside the package (`examples_dir`), so an installed wheel and Docker have them.
"""
from __future__ import annotations

import atexit
import base64
import functools
import io
import importlib.resources
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path

import gradio as gr
import numpy as np
from gradio.data_classes import ImageData

from clipteacher.app import service as svc
from clipteacher.io import process_alive
from clipteacher.pseudo import resize_nearest, vis as pseudo_vis

EXAMPLE_NAMES = {  # names of the default model's vocabulary (MSRC-21 + SIFT Flow), "house" outside it
    "farm": "house, grass, tree, cow, sky",
    "lake": "sky, mountain, sea, boat",
    "street": "building, window, sky, road, car",
    "garden": "grass, flower",
}
MAX_SIMILARITY_MAPS = 24  # per-class maps shown in the attention tab
THUMB = 512  # longer side of gallery pictures
LIVE_EVERY = 0.05  # seconds between camera frames sent to the server (at most 20 per second)
LIVE_SECONDS = 600  # a camera stream is closed after this long
LIVE_WINDOW = 20  # frames over which the live tab's frames per second are averaged
KEEP_MASKS = 32  # result folders kept on disk (videos, Compare's other models; Gradio copies each file into its cache)
FOLDER_PREFIX = "clipteacher_masks_"  # + pid: folders of dead processes are removed at the next start
log = logging.getLogger("clipteacher.app")

CSS = """
#title h1 {margin-bottom: 0.2em}
.status {min-height: 2em}
.gallery-item {background: #181818}
.legend-entry {display: inline-flex; align-items: center; margin: 0 0.9em 0.3em 0; font-size: 0.95em}
.swatch {width: 0.95em; height: 0.95em; border-radius: 2px; margin-right: 0.35em; display: inline-block}
"""


@dataclass
class Serving:
    """How many requests the app computes at once and how many it lets wait (see clipteacher-app --help)."""

    concurrency: int = 2  # model requests computed at once, shared by /segment, /attention and /pseudo_labels
    queue: int = 32  # requests waiting beyond those; more are answered "busy, try again" (HTTP 503)
    max_upload_mb: float = 20.0  # larger uploads are refused before they are stored or decoded
    long_jobs: int = 1  # videos computed at once, in slots of their own (never the image requests' slots)

    def __post_init__(self):
        if self.concurrency < 1 or self.queue < 1 or self.long_jobs < 1 or not self.max_upload_mb > 0:
            raise ValueError(f"concurrency and queue must be >= 1 and the upload cap > 0, got {self}")


def raw_value(component):
    """Hand the handler the API's raw value: Gradio's own check of a Slider turns null or text into an
    unexplained internal error; `service.parse_gamma` explains (or, for null, uses the default)."""
    component.preprocess = lambda payload: payload
    return component


def image_file(**kwargs) -> gr.Image:
    """gr.Image that hands the handler the uploaded file's path untouched.

    gr.Image opens uploads with PIL before the handler runs, so a non-image upload would fail
    inside Gradio with no message; here `service.load_image` decodes (and converts grey, RGBA
    and 16-bit files as the training data does) and explains failures. The instance's
    preprocess is replaced rather than subclassing gr.Image: Gradio writes a .pyi stub next
    to the source of every Component subclass."""
    component = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"], **kwargs)
    component.preprocess = functools.partial(_upload_path, component.preprocess)
    return checked(component, "image")


class CheckedModel:
    """A component's data model whose validation failure is one line for the caller (gr.Error) instead of
    Gradio's generic "upstream app has raised an exception" and a traceback in the log: Gradio validates an
    API payload against it before any handler (or `guarded`) runs. Everything else is the model's own."""

    def __init__(self, model, what: str):
        self._model, self._what = model, what

    def model_validate(self, value, *args, **kwargs):
        from pydantic import ValidationError

        try:
            return self._model.model_validate(value, *args, **kwargs)
        except ValidationError:
            got = type(value).__name__
            raise gr.Error(f"The {self._what} must be an uploaded file (upload it first, then pass its "
                           f"FileData: path and meta {{'_type': 'gradio.FileData'}}; got {got}).",
                           print_exception=False) from None

    def __getattr__(self, name):
        return getattr(self._model, name)


@dataclass(frozen=True)
class Inline:
    """A handler's file for an `inline_output`: its bytes, MIME type and the name a download gets."""

    data: bytes
    name: str
    mime: str = "image/jpeg"

    @classmethod
    def jpeg(cls, image: np.ndarray, name: str) -> "Inline":
        return cls(svc.encode_jpeg(image), name)


def inline_output(component):
    """An output component (gr.Image, gr.File) whose file travels inside the response as a data URL (the handler
    returns an Inline), so the browser shows the result without fetching a file: one HTTP round trip and one
    file written, hashed and copied into Gradio's cache fewer per output. Gradio leaves a FileData without a
    path where it is, and its components show and download a data URL as they do a file's URL."""
    own = component.postprocess

    def postprocess(value):
        if not isinstance(value, Inline):
            return own(value)  # a path or an array, as the component takes them
        url = f"data:{value.mime};base64," + base64.b64encode(value.data).decode("ascii")
        # ImageData for gr.File too: the same fields as FileData, but its path may be empty
        return ImageData(url=url, orig_name=value.name, mime_type=value.mime, size=len(value.data))

    component.postprocess = postprocess
    return component


def checked(component, what: str):
    """`component` with its payload check explained in one line (CheckedModel)."""
    if getattr(component, "data_model", None) is not None:
        component.data_model = CheckedModel(component.data_model, what)
    return component


def _upload_path(preprocess, payload):
    if payload is None:
        return None
    if payload.path is None:  # a base64 data URL from the API
        try:
            return preprocess(payload)
        except Exception:  # noqa: BLE001 - neither a file nor a data URL: one line, not Gradio's traceback
            raise gr.Error("The image must be an uploaded file (upload it first, then pass its FileData: path "
                           "and meta {'_type': 'gradio.FileData'}) or a data URL.", print_exception=False) from None
    return str(payload.path)


def guarded(fn):
    """Run a handler: UserError -> gr.Error (its message), other errors -> gr.Error (one line)."""
    @functools.wraps(fn)
    def wrapper(*args):
        try:
            return fn(*args)
        except gr.Error:
            raise
        except svc.UserError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except MemoryError:
            log.exception("out of memory in %s", fn.__name__)
            raise gr.Error("The server ran out of memory for this request; try a smaller image or fewer classes.",
                           print_exception=False) from None
        except Exception as err:  # noqa: BLE001 - the app must keep serving; the log keeps the traceback
            log.exception("%s failed", fn.__name__)
            raise gr.Error(f"Internal error ({type(err).__name__}); the server log has the details.",
                           print_exception=False) from None
    return wrapper


def warn(notes: list[str]) -> None:
    for note in notes:
        gr.Warning(note)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile by another request
        return 0.0


def remove_stale_folders() -> list[Path]:
    """Remove the result folders of app processes that are gone (killed without a chance to clean up)."""
    removed = []
    for folder in Path(tempfile.gettempdir()).glob(f"{FOLDER_PREFIX}*_*"):
        pid = folder.name[len(FOLDER_PREFIX):].split("_")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def interactive(method):
    """A handler a person waits for: long jobs yield the cores to it while it computes (Service.foreground)."""
    @functools.wraps(method)
    def wrapper(self, *args):
        with self.service.foreground():
            return method(self, *args)
    return wrapper


class Handlers:
    """The functions behind the buttons (and API endpoints), bound to one Service."""

    def __init__(self, service: svc.Service):
        self.service = service
        remove_stale_folders()
        self.mask_dir = Path(tempfile.mkdtemp(prefix=f"{FOLDER_PREFIX}{os.getpid()}_"))
        atexit.register(shutil.rmtree, self.mask_dir, ignore_errors=True)  # clipteacher-app turns SIGTERM into an exit

    def _image(self, path) -> np.ndarray:
        image, notes = svc.load_image(path)
        warn(notes)
        return image

    def _request_folder(self) -> Path:
        """A new folder per request (a download keeps its file name); the oldest beyond KEEP_MASKS go."""
        folder = Path(tempfile.mkdtemp(dir=self.mask_dir))
        for old in sorted(self.mask_dir.iterdir(), key=_mtime)[:-KEEP_MASKS]:
            shutil.rmtree(old, ignore_errors=True)
        return folder

    @interactive
    def segment(self, image, names, templates, gamma):
        """Segment `image` into the typed class names. Returns (overlay JPEG, legend HTML, share of pixels per
        class, mask PNG (pixel = index into the names), status text); the two files are Inline.

        One JPEG of the coloured labels over the image is all the browser needs to show the result (not the input
        again, nor an image per class); both files come inside the response, so nothing is written to disk."""
        start = time.perf_counter()
        picture = self._image(image)
        if self.service.backend is not None:  # the Serve deployment computes; this process draws
            seg = self.service.segment_remote(picture, Path(str(image)).read_bytes(), names, templates, gamma)
        else:
            seg = self.service.segment(picture, names, templates, gamma)
        warn(seg.notes)
        stem = Path(str(image)).stem[:60] or "image"
        overlay = Inline.jpeg(pseudo_vis.overlay(picture, seg.labels, svc.OVERLAY_OPACITY, seg.colors), f"{stem}_overlay.jpg")
        mask = Inline(svc.mask_png(seg.labels, seg.names, seg.colors, io.BytesIO()).getvalue(), f"{stem}_mask.png",
                      "image/png")
        where = (f"Serve replica {seg.replica[:8]}" if seg.replica is not None
                 else self.service.bundle.provider.replace('ExecutionProvider', ''))
        status = (f"**{time.perf_counter() - start:.2f} s** · image pass {'cached' if seg.cached else 'run'} · "
                  f"{where} · {len(seg.names)} classes, {len(seg.shares)} present")
        if seg.unseen:
            status += f"  \nOutside the training vocabulary (+γ = {seg.gamma:g}): {', '.join(seg.unseen[:20])}"
            status += " ..." if len(seg.unseen) > 20 else ""
        return overlay, svc.legend_html(seg.names, seg.colors, seg.shares), seg.shares, mask, status

    @interactive
    def compare(self, image, names, templates, gamma):
        """The teacher alone (training-free) and the student on the same image and names.
        Returns (teacher overlay Inline, student overlay Inline, legend HTML, status text, others)."""
        picture = self._image(image)
        cmp = self.service.compare(picture, names, templates, gamma)
        warn(cmp.student.notes)
        stem = Path(str(image)).stem[:60] or "image"
        folder = self._request_folder() if cmp.others else None  # the other models' gallery takes files
        pictures = [Inline.jpeg(pseudo_vis.overlay(picture, labels, svc.OVERLAY_OPACITY, cmp.colors), f"{stem}_{who}.jpg")
                    for who, labels in (("teacher", cmp.teacher), ("student", cmp.student.labels))]
        shares = {**svc.shares_of(cmp.teacher, cmp.names), **cmp.student.shares}
        agree = float((cmp.teacher == cmp.student.labels).mean())
        speed = cmp.teacher_seconds / max(cmp.student_seconds, 1e-9)
        # a pass that found the app idle ran on every core (--solo-threads): a ratio only for passes run alike
        alike = cmp.teacher_threads == cmp.student_threads
        status = (f"Image pass: teacher **{1000 * cmp.teacher_seconds:.0f} ms**{threads_note(cmp.teacher_threads, alike)}, "
                  f"student **{1000 * cmp.student_seconds:.0f} ms**{threads_note(cmp.student_threads, alike)}"
                  f"{f' ({speed:.1f}x)' if alike else ''}{' (from the cache: times of when they ran)' if cmp.cached else ''} · "
                  f"the two agree on {agree:.0%} of the pixels · teacher: {self.service.bundle.teacher_kind}, "
                  f"no unseen bias; student: γ = {cmp.student.gamma:g} on names outside its training vocabulary")
        others = []
        for label, seg, seconds in cmp.others:
            path = svc.save_jpeg(pseudo_vis.overlay(picture, seg.labels, svc.OVERLAY_OPACITY, cmp.colors),
                                 folder / f"{stem}_{len(others)}.jpg")
            caption = f"{label}: image pass {1000 * seconds:.0f} ms, γ = {seg.gamma:g}"
            others.append((str(path), caption))
            status += f"  \n{caption}; agrees with the student on {float((seg.labels == cmp.student.labels).mean()):.0%}"
        return pictures[0], pictures[1], svc.legend_html(cmp.names, cmp.colors, shares), status, others

    def live(self, frame, names, templates, gamma, times):
        """One camera frame -> (overlay at the student's input size, status with frames per second, frame times)."""
        if frame is None:
            return None, "Start the camera.", times
        start = time.perf_counter()
        overlay, seg = self.service.live_frame(frame, names, templates, gamma)
        times = (list(times or []) + [time.time()])[-LIVE_WINDOW:]
        fps = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        status = (f"**{fps:.1f} frames/s** here · model + overlay {1000 * (time.perf_counter() - start):.0f} ms "
                  f"per frame at {overlay.shape[1]} x {overlay.shape[0]} · {', '.join(list(seg.shares)[:4])}")
        return overlay, status, times

    def video(self, path, names, templates, gamma, progress=gr.Progress()):
        """A video file -> (segmented WebM, status). Progress is shown per frame."""
        start = time.perf_counter()
        out = self._request_folder() / f"{Path(str(path or 'video')).stem[:60] or 'video'}_segmented.webm"
        out, frames, notes = self.service.segment_video(
            path, names, out, templates, gamma, progress=lambda done, total: progress(done / total, desc="frames"))
        warn(notes)
        seconds = time.perf_counter() - start
        return str(out), f"**{seconds:.1f} s** · {frames} frames ({frames / max(seconds, 1e-9):.1f} frames/s)"

    @interactive
    def attention(self, image, names, templates):
        """GLM attention (docs/METHOD.md#global-learning-module) of the teacher's CLS token over the student's features,
        and the cosine similarity of the student's features to each typed class name.
        Returns (heat map over the image, gallery of per-class maps, status text)."""
        start = time.perf_counter()
        picture = self._image(image)
        att = self.service.attention(picture, names, templates)
        warn(att.notes)
        heat = svc.heat_overlay(picture, att.weights, vmin=0.0)
        flat = np.sort(att.weights.ravel())[::-1]
        top = max(1, len(flat) // 10)
        entropy = float(-(flat * np.log(np.maximum(flat, 1e-30))).sum())
        gallery, sims = [], att.similarity
        if len(att.names):
            lo, hi = float(sims.min()), float(sims.max())  # one scale for all classes, so maps compare
            shown = list(zip(att.names, sims))[:MAX_SIMILARITY_MAPS]
            gallery = [(svc.fit(svc.heat_overlay(picture, s, lo, hi), THUMB),
                        f"{n}: max cos {s.max():.2f}") for n, s in shown]
            if len(att.names) > MAX_SIMILARITY_MAPS:
                gr.Warning(f"Showing the similarity maps of the first {MAX_SIMILARITY_MAPS} of {len(att.names)} names.")
        status = (f"**{time.perf_counter() - start:.2f} s** · {att.weights.shape[0]} x {att.weights.shape[1]} "
                  f"student locations · the top 10% hold {flat[:top].sum():.0%} of the attention · "
                  f"effective locations exp(H) = {np.exp(entropy):.0f} of {flat.size}")
        if len(att.names):
            status += f"  \nSimilarity colour scale, all classes: cosine {lo:.2f} (dark) to {hi:.2f} (bright)"
        return heat, gallery, status

    @interactive
    def pseudo_labels(self, image, label, windows, threshold, fusion):
        """PLM pseudo labels: K-Means clusters of the teacher's dense tokens per window size and
        the fused regions (training/pseudo_labels.py's functions). An optional label PNG
        (class ids, 255 = ignore) restricts clustering to its ignored area, as in training.
        Returns (gallery: clusters per window, fused regions, overlay; region shares; status)."""
        start = time.perf_counter()
        picture = self._image(image)
        lab = None
        if label is not None and str(label) != "":
            lab = svc.load_label(label, svc.image_size(image), picture.shape[:2])
        res = self.service.pseudo_labels(picture, lab, svc.parse_windows(windows), float(threshold), fusion)
        warn(res.notes)
        hw = picture.shape[:2]
        palette = pseudo_vis.region_palette(max(1, int(res.fused.max(initial=-1)) + 1))
        gallery = []
        for k, m in zip(res.windows, res.maps):
            n = len(np.unique(m[m >= 0]))
            gallery.append((svc.fit(pseudo_vis.colorize(resize_nearest(m, hw)), THUMB), f"k = {k}: {n} clusters"))
        n_regions = len(np.unique(res.fused[res.fused >= 0]))
        gallery.append((svc.fit(pseudo_vis.colorize(resize_nearest(res.fused, hw), palette), THUMB),
                        f"fused: {n_regions} regions"))
        gallery.append((svc.fit(pseudo_vis.overlay(picture, res.fused, 0.5, palette), THUMB), "fused over the image"))
        shares = {name: share for name, share, _ in pseudo_vis.legend(res.fused, palette=palette)}
        grid = res.fused.shape
        scope = "clustering restricted to the label’s ignored area" if lab is not None else "all tokens clustered"
        status = f"**{time.perf_counter() - start:.2f} s** · teacher tokens {grid[0]} x {grid[1]} · {scope}"
        return gallery, shares, status

    def info(self):
        """The loaded bundle: provider, training vocabulary, default gamma and templates."""
        return self.service.info()


def threads_note(threads: int | None, alike: bool) -> str:
    """' on N threads' when two passes being compared ran on different thread counts, else ''."""
    return "" if alike else f" on {threads or 'all'} thread{'' if threads == 1 else 's'}"


def examples_dir() -> Path:
    """The example pictures (package data of clipteacher.app, regenerated by app/make_examples.py)."""
    return Path(str(importlib.resources.files("clipteacher.app") / "examples"))


def example_rows() -> list[list[str]]:
    """[[image path, names]] of the Segment tab's Examples block, for the pictures that exist."""
    folder = examples_dir()
    return [[str(folder / f"{n}.jpg"), names] for n, names in EXAMPLE_NAMES.items() if (folder / f"{n}.jpg").is_file()]


def status_line() -> gr.Markdown:
    """The one-line status under each view (request time, notes)."""
    return gr.Markdown(elem_classes="status", label="status")


def view(text: str, button: str) -> tuple[SimpleNamespace, gr.Button]:
    """A view's namespace, its explanation and its primary button."""
    gr.Markdown(text)
    return SimpleNamespace(), gr.Button(button, variant="primary")


def inputs_column(service: svc.Service, serving: Serving) -> SimpleNamespace:
    """The left column: image, class names, templates, examples, bundle info."""
    b = service.bundle
    ui = SimpleNamespace()
    ui.image = image_file(label=f"Image (up to {serving.max_upload_mb:g} MB)", height=300)
    ui.names = gr.Textbox(label="Class names (comma or newline separated)", lines=3,
                          value=EXAMPLE_NAMES["farm"], placeholder="cow, grass, sky")
    with gr.Accordion("Prompt templates", open=False):
        ui.templates = gr.Textbox(label="One per line, {} = class name (averaged; empty = the bundle's)",
                                  lines=2, value="\n".join(b.templates))
    rows = example_rows()
    ui.examples = gr.Examples(rows, inputs=[ui.image, ui.names], label="Examples (synthetic drawings)") if rows else None
    with gr.Accordion("Model", open=False):
        gr.JSON(value={k: v for k, v in service.info().items() if k != "checkpoint"}, label="Bundle")
    return ui


def segment_tab(b) -> SimpleNamespace:
    ui = SimpleNamespace()
    with gr.Row():
        ui.gamma = raw_value(gr.Slider(-5.0, max(5.0, 2 * abs(b.gamma)), value=b.gamma, step=0.05, scale=3,
                                       label="Unseen bias γ (added to names outside the training vocabulary)"))
        ui.run = gr.Button("Segment", variant="primary", scale=1)
    ui.overlay = inline_output(gr.Image(label="Segmentation", height=420, interactive=False, elem_id="overlay"))
    ui.legend = gr.HTML(elem_id="legend")
    with gr.Row():
        ui.shares = gr.Label(label="Share of pixels", num_top_classes=10, scale=2, show_heading=False)
        with gr.Column(scale=1):
            ui.mask = inline_output(gr.File(label="Mask PNG (pixel = class index)"))
            ui.status = status_line()
    return ui


def compare_tab(others: bool = False) -> SimpleNamespace:
    ui, ui.run = view("The same image and names segmented by the **teacher alone** (its dense tokens "
                      "against the names, with no training on masks: what the student learned "
                      "from) and by the **student**, with each image pass's time.", "Compare teacher and student")
    with gr.Row():
        ui.teacher = inline_output(gr.Image(label="Teacher alone", interactive=False, elem_id="compare_teacher"))
        ui.student = inline_output(gr.Image(label="Student", interactive=False, elem_id="compare_student"))
    ui.legend = gr.HTML(elem_id="compare_legend")
    ui.status = status_line()
    ui.others = gr.Gallery(label="Other models (clipteacher-app --compare-bundle)", columns=3, height="auto",
                           elem_id="compare_others", visible=bool(others))
    return ui


def live_tab(b) -> SimpleNamespace:
    ui = SimpleNamespace()
    gr.Markdown(f"Your camera, segmented frame by frame at the student's input size "
                f"({b.eval_size} px short side), with the names and γ on the left. "
                f"Or a video file (up to {svc.MAX_VIDEO_SECONDS} s).")
    with gr.Row():
        ui.camera = gr.Image(sources=["webcam"], streaming=True, type="numpy", label="Camera", elem_id="camera")
        ui.out = gr.Image(label="Live segmentation", format="jpeg", interactive=False, elem_id="live")
    ui.status = status_line()
    ui.times = gr.State([])
    with gr.Accordion("Video file", open=False):
        with gr.Row():
            ui.video_in = checked(gr.Video(sources=["upload"], label="Video (MP4 or WebM)"), "video")
            ui.video_out = gr.Video(label="Segmented video", interactive=False)
        ui.run_video = gr.Button("Segment video", variant="primary")
        ui.video_status = status_line()
    return ui


def attention_tab() -> SimpleNamespace:
    ui, ui.run = view("Where the teacher's CLS token attends over the student's features "
                      "(softmax of ⟨CLS, feature⟩ over locations, the GLM's pooling weights), "
                      "and each class name's cosine similarity to the student's features.", "Show attention")
    ui.heat = gr.Image(label="CLS attention (bright = high weight)", height=380, format="png")
    ui.sims = gr.Gallery(label="Per-class similarity", columns=3, height="auto", format="jpeg", object_fit="contain")
    ui.status = status_line()
    return ui


def pseudo_tab(image) -> SimpleNamespace:
    ui = SimpleNamespace()
    gr.Markdown("K-Means on the teacher's dense tokens at each window size (k x k centres), "
                "fused into regions, as the Pixel Learning Module does in training. "
                "A label PNG (class ids, 255 = unlabelled) restricts clustering to its "
                "unlabelled area.")
    with gr.Row():
        ui.label = image_file(label="Label PNG (optional)", height=160, scale=1)
        with gr.Column(scale=2):
            ui.windows = gr.Textbox(label="Window sizes", value="3, 7")
            ui.threshold = gr.Slider(0.5, 1.0, value=0.8, step=0.01, label="Fusion threshold")
            ui.fusion = gr.Radio(["centroid", "overlap"], value="centroid", label="Fusion criterion")
    ui.run = gr.Button("Make pseudo labels", variant="primary")
    folder = examples_dir()
    if (folder / "farm_label.png").is_file():
        gr.Examples([[str(folder / "farm.jpg"), str(folder / "farm_label.png")]],
                    inputs=[image, ui.label], label="Example: cow and tree unlabelled")
    ui.clusters = gr.Gallery(label="Clusters and fused regions", columns=2, height=720, format="png",
                             object_fit="contain")
    ui.regions = gr.Label(label="Region sizes (share of the token grid)", num_top_classes=8, show_heading=False)
    ui.status = status_line()
    return ui


def build_demo(service: svc.Service, serving: Serving | None = None) -> gr.Blocks:
    """The layout (one function per view) and the wiring of every endpoint to its handler."""
    serving = serving or Serving()
    # Gradio summarises every past event in a pandas table after each request (and keeps 10,000 of them) for a
    # monitoring dashboard this app does not enable: CPU per request that grows with uptime, for nothing
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(10**9))
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "100")
    h = Handlers(service)
    b = service.bundle
    with gr.Blocks(title="CLIPTeacher segmentation", delete_cache=(3600, 3600), analytics_enabled=False) as demo:
        gr.Markdown(
            "# CLIPTeacher: open-vocabulary segmentation\n"
            f"A small student network segments an image into **any class names you type**. "
            f"It was trained on {len(b.vocabulary)} classes; other names get the unseen bias γ. "
            f"Running on `{b.provider.replace('ExecutionProvider', '')}`.", elem_id="title")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, min_width=300):
                inp = inputs_column(service, serving)
            with gr.Column(scale=3, min_width=420):
                with gr.Tabs():
                    with gr.Tab("Segment", id="segment"):
                        seg = segment_tab(b)
                    with gr.Tab("Compare", id="compare"):
                        cmp = compare_tab(bool(service.others))
                    with gr.Tab("Live", id="live"):
                        live = live_tab(b)
                    with gr.Tab("GLM attention", id="attention"):
                        att = attention_tab()
                    with gr.Tab("Pseudo labels", id="pseudo_labels"):
                        plm = pseudo_tab(inp.image)
        # footer: the provider actually in use, and why a visible GPU is not (clipteacher.runtime.providers)
        gr.Markdown(f"onnxruntime provider: `{b.provider.replace('ExecutionProvider', '')}`"
                    + (f" · GPU not used: {b.fallback_reason}" if b.fallback_reason else ""), elem_id="footer")

        image, names, templates, gamma = inp.image, inp.names, inp.templates, seg.gamma
        # one limit shared by the model endpoints, so concurrent requests never oversubscribe the cores
        model = dict(concurrency_id="model", concurrency_limit=serving.concurrency)
        seg.run.click(guarded(h.segment), [image, names, templates, gamma],
                      [seg.overlay, seg.legend, seg.shares, seg.mask, seg.status], api_name="segment", **model)
        cmp.run.click(guarded(h.compare), [image, names, templates, gamma],
                      [cmp.teacher, cmp.student, cmp.legend, cmp.status, cmp.others], api_name="compare", **model)
        # an open camera stream holds its slot until it stops: streams get their own limit, so a few open
        # cameras never block the other tabs' requests
        live.camera.stream(guarded(h.live), [live.camera, names, templates, gamma, live.times],
                           [live.out, live.status, live.times], stream_every=LIVE_EVERY, time_limit=LIVE_SECONDS,
                           api_name="live", concurrency_id="live", concurrency_limit=serving.concurrency)
        # a video takes minutes: it runs in slots of its own and yields the cores to image requests between
        # frames (Service.foreground), so it never holds up /segment (docs/DESIGN.md#reliability)
        live.run_video.click(guarded(h.video), [live.video_in, names, templates, gamma],
                             [live.video_out, live.video_status], api_name="video", concurrency_id="long",
                             concurrency_limit=serving.long_jobs)
        att.run.click(guarded(h.attention), [image, names, templates], [att.heat, att.sims, att.status],
                      api_name="attention", **model)
        plm.run.click(guarded(h.pseudo_labels), [image, plm.label, plm.windows, plm.threshold, plm.fusion],
                      [plm.clusters, plm.regions, plm.status], api_name="pseudo_labels", **model)
        info_btn = gr.Button(visible=False)
        info_out = gr.JSON(visible=False, label="info")
        info_btn.click(guarded(h.info), None, info_out, api_name="info", concurrency_limit=None)
    demo.queue(max_size=serving.queue)
    demo.serving = serving
    demo.examples_block = inp.examples
    return demo


def launch(demo: gr.Blocks, host: str, port: int, **kwargs):
    serving = getattr(demo, "serving", Serving())
    return demo.launch(server_name=host, server_port=port, theme=gr.themes.Soft(), css=CSS,
                       footer_links=["api"], show_error=False, max_file_size=int(serving.max_upload_mb * 2**20), **kwargs)

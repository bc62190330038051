"""Files on disk for batch prediction (`clipteacher-predict`): inputs, output names, atomic writes, the summary.

Torch-free. The command around it is `clipteacher.cli.predict`; the model side is the app's
`clipteacher.app.service` (same image loading, same mask PNG).

    paths, notes = collect_inputs(["photos/", "scans/*.png", "one.jpg"], out_dir)
    stems = output_stems(paths)                  # per path: "<stem>", or "<stem>-<8 hex>" when stems collide
    atomic_write(out_dir / "x.png", lambda tmp: mask_png(labels, names, colors, tmp))
    with Summary(out_dir, resume=True) as summary:
        summary.add({"file": ..., "mask": "x.png", ...})

Rules (README "Batch prediction"):
- A folder contributes its image files (by suffix, IMAGE_SUFFIXES, any case), not its subfolders
  and not hidden files (macOS '._x.jpg' resource forks are not images); a pattern with * ? [ ]
  is expanded (** crosses folders) the same way; a file named explicitly is always tried.
- Files inside the output folder are never inputs, so a rerun cannot segment its own masks; an
  input folder that is the output folder is refused (masks could overwrite its images).
- Masks are named after the image's stem. Stems shared by several inputs (ignoring case, since
  macOS and Windows file systems do) would overwrite each other, so every input of such a group
  gets "<stem>-<first 8 hex of blake2b(absolute path)>": stable across runs over the same inputs.
- A mask is written to a hidden temporary name and renamed into place, so a killed run never
  leaves a partial mask that `--skip-existing` would count as done.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from collections import defaultdict
from pathlib import Path

from clipteacher.io import process_alive

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
SUMMARY = "summary.jsonl"
PARTIAL = ".partial"  # marks temporary files: ".<name>.<pid>.partial<suffix>"
_GLOB = re.compile(r"[*?\[]")


class InputError(ValueError):
    """An input argument that names nothing usable (one line)."""


def show(text) -> str:
    """Any path or message as one printable line (control characters and undecodable bytes escaped)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _images_in(folder: Path, notes: list[str]) -> list[Path]:
    try:
        entries = list(os.scandir(folder))
    except OSError as err:
        raise InputError(f"{show(folder)}: cannot list the folder ({err.strerror or err})") from None
    found = []
    for e in entries:
        if e.name.startswith(".") or Path(e.name).suffix.lower() not in IMAGE_SUFFIXES:
            continue
        try:
            regular = e.is_file()  # links followed; a FIFO named x.jpg would block the reader forever
        except OSError as err:  # a symbolic-link loop: that entry is skipped, the run goes on
            notes.append(f"{show(e.path)} skipped: {err.strerror or err}")
            continue
        if regular:
            found.append(Path(e.path))
    return sorted(found)


def _real(path: Path) -> Path:
    """The path with every symbolic link resolved (what a write through it would reach)."""
    return Path(os.path.realpath(path))


def inside(path: Path, folder: Path | None) -> bool:
    """`path` is a file directly in `folder` (an output folder, already resolved) after following links."""
    return folder is not None and _real(path).parent == folder


def collect_inputs(args: list[str], out_dir: Path | None) -> tuple[list[Path], list[str]]:
    """Input arguments (files, folders, patterns) -> (image paths in argument order, each once; notes).
    out_dir: the output folder, whose files are never inputs (None: no output folder).

    Raises InputError when an argument names nothing, or nothing at all is found."""
    # Resolved, not just absolute: an --out that is a link to an input folder is that folder.
    out_dir = _real(out_dir) if out_dir is not None else None
    found, notes = [], []

    def folder(path: Path) -> list[Path]:
        if _real(path) == out_dir:
            raise InputError(f"{show(path)} is both an input folder and --out (after following links); its images "
                             f"could be overwritten by masks: choose another output folder")
        return _images_in(path, notes)

    for arg in args:
        path = Path(arg)
        if path.is_dir():
            found += folder(path)
        elif path.is_file() or (path.is_symlink() and not path.exists()):  # a broken link fails like a bad file
            found.append(path)
        elif path.exists():
            raise InputError(f"{show(arg)}: not a regular file or folder")
        elif _GLOB.search(arg):
            matches = sorted(Path(m) for m in glob.glob(arg, recursive=True))
            if not matches:
                raise InputError(f"{show(arg)}: no file matches this pattern")
            for m in matches:
                if m.is_dir():
                    found += folder(m)
                elif m.suffix.lower() in IMAGE_SUFFIXES and m.is_file():
                    found.append(m)
        else:
            raise InputError(f"{show(arg)}: no such file or folder")
    unique = list(dict.fromkeys(Path(os.path.abspath(p)) for p in found))
    # keep the spelling the user gave (relative paths stay relative in messages and the summary)
    spelled = {Path(os.path.abspath(p)): p for p in reversed(found)}
    paths = [spelled[p] for p in unique if not inside(p, out_dir)]
    if len(paths) < len(unique):
        notes.append(f"{len(unique) - len(paths)} file(s) in the output folder were not taken as inputs")
    if not paths:
        raise InputError("no image files found in the inputs (folders contribute "
                         f"{', '.join(sorted(IMAGE_SUFFIXES))} files)")
    return paths, notes


def output_stems(paths: list) -> list[str]:
    """Per input path, the stem its outputs are named after: the image's stem, or, when several inputs
    share it (ignoring case), '<stem>-<8 hex of the absolute path>' for each of them. Raises InputError
    if names still clash."""
    def stem(p) -> str:  # URIs (s3://...) stay strings: Path would fold their '//'
        return Path(p).stem

    def where(p) -> str:
        return p if isinstance(p, str) and "://" in p else os.path.abspath(p)

    groups = defaultdict(list)
    for p in paths:
        groups[stem(p).casefold()].append(p)
    stems = []
    for p in paths:
        if len(groups[stem(p).casefold()]) == 1:
            stems.append(stem(p))
        else:
            digest = hashlib.blake2b(os.fsencode(where(p)), digest_size=4).hexdigest()
            stems.append(f"{stem(p)}-{digest}")
    if len({s.casefold() for s in stems}) < len(stems):  # an image literally named like another's '<stem>-<hex>'
        raise InputError("two inputs would write the same mask name even with their path hash; rename one")
    return stems


def atomic_write(path: Path, write, before_rename=None) -> Path:
    """Call write(tmp) on a hidden temporary file next to `path` (same suffix, so image writers pick the
    format), then before_rename() if given, then rename it onto `path`: readers see the old file or the
    whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL}{path.suffix}")
    try:
        write(tmp)
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def remove_stale_partials(out_dir: Path) -> int:
    """Delete temporary files left in out_dir by killed runs (their process is gone). Returns how many."""
    removed = 0
    for tmp in Path(out_dir).glob(f".*{PARTIAL}.*"):
        pid = tmp.name.rsplit(PARTIAL, 1)[0].rsplit(".", 1)[-1]
        if pid.isdigit() and not process_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed


LOCK = ".clipteacher-predict.lock"


def lock_output(out_dir: Path):
    """Take the lock of an output folder for this process (released when it exits, however it ends).
    Returns the open lock file; raises InputError when another run holds it."""
    import fcntl

    f = open(Path(out_dir) / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        other = f.read().strip() or "?"
        f.close()
        raise InputError(f"--out {show(out_dir)} is in use by another clipteacher-predict run (pid {other}); "
                         f"wait for it to finish or choose another folder") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


class Summary:
    """DIR/summary.jsonl, one JSON object per image, appended and flushed as each image finishes.

    resume=False starts a new file. resume=True (--skip-existing) keeps the lines of images whose mask
    is on disk and drops the rest (errors, lines of masks that were never renamed into place), so
    after any number of resumed runs there is one line per mask plus this run's errors."""

    def __init__(self, out_dir: Path, resume: bool):
        self.out_dir, self.resume = Path(out_dir), resume
        self.path = self.out_dir / SUMMARY
        self._file = None

    def _open(self) -> None:
        """On the first line: a run that stops before any image (no bundle) leaves the old summary alone."""
        out_dir, kept = self.out_dir, {}
        if self.resume and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    item = json.loads(line)
                    mask = item.get("mask") if isinstance(item, dict) else None
                except ValueError:  # the half line of a killed run
                    continue
                if isinstance(mask, str) and "/" not in mask and (Path(out_dir) / mask).is_file():
                    kept[mask] = line
        atomic_write(self.path, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept.values()),
                                                           encoding="utf-8"))
        self._file = os.open(self.path, os.O_WRONLY | os.O_APPEND)

    def add(self, item: dict) -> None:
        if self._file is None:
            self._open()
        # one write of the whole line on an O_APPEND file: a kill leaves whole lines only
        os.write(self._file, (json.dumps(item) + "\n").encode())  # ASCII escapes: any file name round-trips

    def close(self) -> None:
        if self._file is not None:
            os.close(self._file)
            self._file = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def student_passes(bundle, images: list) -> list:
    """1 x D x h x w features per image; images of one size share a run of the student (B x 3 x H x W).
    A batch that fails is retried image by image, so one image's error stays its own (an exception
    in place of its features)."""
    by_size: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(image.shape, []).append(i)
    features: list = [None] * len(images)
    for group in by_size.values():
        try:
            batch = bundle.batch_features([images[i] for i in group])
            for k, i in enumerate(group):
                features[i] = batch[k:k + 1]
        except Exception:  # noqa: BLE001 - retried one by one below, where the error is reported per image
            for i in group:
                try:
                    features[i] = bundle.image_features(images[i])
                except Exception as err:  # noqa: BLE001
                    features[i] = err
    return features


OVERLAY_ALPHA = 0.5


def failure_message(err: BaseException) -> str:
    """The one-line reason one image failed (its summary line)."""
    from clipteacher.request import UserError

    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError):  # writing the outputs
        return f"cannot write the outputs: {err.strerror or err}"
    if isinstance(err, MemoryError):
        return "out of memory for this image"
    return f"internal error ({type(err).__name__}: {err})"


def encode_outputs(bundle, image, notes: list[str], features, names: list[str], gamma=None, templates=None,
                   overlay: bool = False, hubness: bool | None = None) -> dict:
    """Classify one image whose student features (1 x D x h x w) are known -> its files as bytes and its
    summary fields: {"mask": PNG bytes, "overlay": JPEG bytes or None, "item": {width, height, shares[, notes]}}.
    Both engines of clipteacher-predict (this process, Ray Data actors) and the Serve API produce their outputs here."""
    import io

    from PIL import Image

    from clipteacher.pseudo.vis import overlay as draw_overlay
    from clipteacher.pseudo.vis import region_palette
    from clipteacher.request import mask_png, shares_of

    labels, _ = bundle.label_features(features, names, image.shape[:2], gamma, templates, hubness)
    colors = region_palette(len(names))
    mask = io.BytesIO()
    mask_png(labels, names, colors, mask)
    picture = None
    if overlay:
        buf = io.BytesIO()
        Image.fromarray(draw_overlay(image, labels, OVERLAY_ALPHA, colors)).save(buf, format="JPEG", quality=90)
        picture = buf.getvalue()
    item = {"width": image.shape[1], "height": image.shape[0],
            "shares": {k: round(v, 6) for k, v in shares_of(labels, names).items()}}
    if notes:
        item["notes"] = list(notes)
    return {"mask": mask.getvalue(), "overlay": picture, "item": item}


def write_outputs(out: Path, path, stem: str, encoded: dict, summary: Summary, started: float) -> None:
    """Write one image's encoded outputs into `out`. The summary line is added before the mask is renamed
    into place: a kill in between leaves a line without a mask, which a resumed run redoes. `started`:
    perf_counter time this image's work began (decoding, its share of the batch)."""
    import time

    if encoded["overlay"] is not None:
        atomic_write(out / f"{stem}.overlay.jpg", lambda tmp: tmp.write_bytes(encoded["overlay"]))
    item = {"file": str(path), "mask": f"{stem}.png", **encoded["item"]}

    def commit():
        item["seconds"] = round(time.perf_counter() - started, 4)
        summary.add(item)

    atomic_write(out / f"{stem}.png", lambda tmp: tmp.write_bytes(encoded["mask"]), commit)

"""Segment image files, folders or patterns into typed class names, on an exported bundle (no torch).

    clipteacher-predict photos/ "scans/**/*.png" one.jpg --names "sky, tree, road" --out masks/
    python -m clipteacher.cli.predict photos/ --names-file names.txt --out masks/ --overlay --skip-existing

Writes, per image, DIR/<stem>.png: the app's mask download (8-bit palette PNG, pixel = index
into the names, names as JSON in its 'classes' text chunk); with --overlay also
DIR/<stem>.overlay.jpg; and DIR/summary.jsonl, one line per image: {"file", "mask", "width",
"height", "shares", "seconds"[, "notes"]} or {"file", "error"}. Images are read as in the app
(EXIF orientation applied, sides over 1024 px downscaled, oversized files refused before decoding).

Folders contribute their image files (not subfolders, not hidden files); patterns are expanded
(** crosses folders); a file named explicitly is always tried. Inputs sharing a stem get
DIR/<stem>-<8 hex>.png each (summary.jsonl says which is which) instead of overwriting each other.
--skip-existing skips images whose mask exists (masks are renamed into place when complete, so
a killed run resumes cleanly). A bad file is reported and skipped; the exit code is 1 if any
image failed, 2 for bad arguments (one line), 0 otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

PRECISIONS = ("fp32", "int8", "fp16")
OVERLAY_ALPHA = 0.5
DEVICES = {"auto": None, "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"], "cpu": ["CPUExecutionProvider"]}


class Fatal(RuntimeError):
    """Stops the whole run (bad arguments, no bundle): one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + message
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="clipteacher-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image file, folder or pattern (quote patterns)")
    names = p.add_mutually_exclusive_group(required=True)
    names.add_argument("--names", help="class names, separated by commas or new lines")
    names.add_argument("--names-file", help="text file of class names (commas or one per line)")
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--templates", action="append", metavar="TEMPLATE",
                   help="prompt template with one {} for the name, e.g. 'a photo of a {}.'; repeat for several "
                        "(default: the bundle's)")
    p.add_argument("--gamma", help="unseen bias for names outside the training vocabulary (default: the bundle's)")
    p.add_argument("--bundle", help="exported bundle folder (default: bundles/default, built on first use)")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="student graph (must be in the bundle)")
    p.add_argument("--device", default="auto", choices=list(DEVICES),
                   help="onnxruntime provider: auto = CUDA when usable, else CPU")
    p.add_argument("--overlay", action="store_true", help="also write DIR/<stem>.overlay.jpg")
    p.add_argument("--skip-existing", action="store_true", help="skip images whose mask is already in DIR")
    p.add_argument("--batch", type=int, default=8,
                   help="images read at a time; those of one size share a run of the student (default 8; "
                        "1 = one image per run)")
    return p


def read_names_file(path: str) -> str:
    """The text of a names file, read no further than parse_names accepts (a huge file is refused unread)."""
    from clipteacher.request import MAX_CLASSES, MAX_NAME_CHARS

    limit = MAX_CLASSES * (MAX_NAME_CHARS + 2)
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(limit + 1)
    except (OSError, UnicodeDecodeError) as err:
        from clipteacher.batch import show

        raise Fatal(f"--names-file {show(path)}: {getattr(err, 'strerror', None) or err}") from None


def open_bundle(args):
    """The bundle (the default bundle is built on first use), with the names embedded once."""
    from clipteacher.runtime.resolve import StartupError, resolve_bundle
    from clipteacher.runtime import Bundle

    try:
        bundle = Bundle(resolve_bundle(args.bundle), precision=args.precision, providers=DEVICES[args.device],
                        verbose=False)
    except (StartupError, FileNotFoundError, ValueError) as err:
        raise Fatal(str(err)) from None
    if args.device == "cuda" and bundle.provider != "CUDAExecutionProvider":
        raise Fatal("--device cuda: onnxruntime cannot use CUDA on this machine (use --device cpu or auto)")
    try:
        bundle.embed_text(args.name_list, args.template_list)  # once, before the first image
    except ValueError as err:
        raise Fatal(str(err)) from None
    return bundle


def write_outputs(bundle, path: Path, stem: str, image, notes: list[str], features, seconds: float,
                  out: Path, args, summary) -> None:
    """Classify one image whose student features are known and write its files. `seconds`: its share of
    the work so far (decoding, its part of the batch). The summary line is added before the mask is
    renamed into place: a kill in between leaves a line without a mask, which a resumed run redoes."""
    from PIL import Image

    from clipteacher.batch import atomic_write
    from clipteacher.pseudo.vis import overlay, region_palette
    from clipteacher.request import mask_png, shares_of

    start = time.perf_counter() - seconds
    names = args.name_list
    labels, _ = bundle.label_features(features, names, image.shape[:2], args.gamma, args.template_list)
    colors = region_palette(len(names))
    if args.overlay:
        picture = Image.fromarray(overlay(image, labels, OVERLAY_ALPHA, colors))
        atomic_write(out / f"{stem}.overlay.jpg", lambda tmp: picture.save(tmp, quality=90))
    item = {"file": str(path), "mask": f"{stem}.png", "width": image.shape[1], "height": image.shape[0],
            "shares": {k: round(v, 6) for k, v in shares_of(labels, names).items()}}
    if notes:
        item["notes"] = notes

    def commit():
        item["seconds"] = round(time.perf_counter() - start, 4)
        summary.add(item)

    atomic_write(out / f"{stem}.png", lambda tmp: mask_png(labels, names, colors, tmp), commit)


def failure(err: BaseException) -> str:
    """The one-line reason an image failed; Fatal and interrupts are not failures of one image."""
    from clipteacher.request import UserError

    if isinstance(err, (Fatal, KeyboardInterrupt)):
        raise err
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError):  # writing the outputs
        return f"cannot write the outputs: {err.strerror or err}"
    if isinstance(err, MemoryError):
        return "out of memory for this image"
    return f"internal error ({type(err).__name__}: {err})"


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


def run(args, paths: list[Path], stems: list[str], out: Path, make_bundle) -> dict:
    """Segment `paths` into `out`, as out/<stem>.png, --batch images at a time; returns counts {done,
    skipped, failed}. The bundle is loaded on the first image that decodes, so a run with nothing to do
    never loads the model."""
    from tqdm import tqdm

    from clipteacher.batch import Summary, remove_stale_partials, show
    from clipteacher.request import load_image

    remove_stale_partials(out)
    todo = [(p, s) for p, s in zip(paths, stems) if not (args.skip_existing and (out / f"{s}.png").is_file())]
    counts = {"done": 0, "skipped": len(paths) - len(todo), "failed": 0}
    shared = sum(s != p.stem for p, s in zip(paths, stems))
    if shared:
        tqdm.write(f"note: {shared} inputs share a stem with another; their masks are <stem>-<8 hex>.png "
                   f"(summary.jsonl maps files to masks)", sys.stderr)
    bundle = []

    with Summary(out, resume=args.skip_existing) as summary, \
            tqdm(total=len(todo), unit="img", file=sys.stderr, disable=None, smoothing=0.1) as bar:

        def fail(path, err):
            message = failure(err)
            counts["failed"] += 1
            summary.add({"file": str(path), "error": message})
            tqdm.write(f"error: {show(path)}: {show(message)}", sys.stderr)
            bar.update()

        for first in range(0, len(todo), args.batch):
            loaded = []  # (path, stem, image, notes, seconds to decode)
            for path, stem in todo[first:first + args.batch]:
                t = time.perf_counter()
                try:
                    loaded.append((path, stem, *load_image(path), time.perf_counter() - t))
                except Exception as err:  # noqa: BLE001 - one bad file must not stop the batch
                    fail(path, err)
            if not loaded:
                continue
            if not bundle:  # the first decodable image loads the model; that time is no image's
                bundle.append(make_bundle())
            t = time.perf_counter()
            features = student_passes(bundle[0], [item[2] for item in loaded])
            share = (time.perf_counter() - t) / len(loaded)
            for (path, stem, image, notes, decoded), feats in zip(loaded, features):
                try:
                    if isinstance(feats, Exception):
                        raise feats
                    write_outputs(bundle[0], path, stem, image, notes, feats, decoded + share, out, args, summary)
                    counts["done"] += 1
                    bar.update()
                except Exception as err:  # noqa: BLE001
                    fail(path, err)
    return counts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from clipteacher.request import UserError, parse_gamma, parse_names, parse_templates
    from clipteacher.batch import InputError, collect_inputs, lock_output, output_stems, show

    try:
        names_text = args.names if args.names is not None else read_names_file(args.names_file)
        args.name_list, name_notes = parse_names(names_text)
        args.names_text = names_text
        args.templates_text = "\n".join(args.templates or [])
        args.template_list = parse_templates(args.templates_text)
        args.gamma = parse_gamma(args.gamma)
        if not 1 <= args.batch <= 64:
            raise Fatal(f"--batch must be between 1 and 64, got {args.batch}")
        out = Path(args.out)
        paths, notes = collect_inputs(args.inputs, out)
        stems = output_stems(paths)
        try:
            out.mkdir(parents=True, exist_ok=True)
            lock = lock_output(out)  # noqa: F841 - held until this process exits
        except OSError as err:
            raise Fatal(f"--out {show(args.out)}: {err.strerror or err}") from None
    except (Fatal, UserError, InputError) as err:
        print(f"error: {show(err)}", file=sys.stderr)
        return 2
    for note in name_notes + notes:
        print(f"note: {show(note)}", file=sys.stderr)

    start = time.perf_counter()
    try:
        counts = run(args, paths, stems, out, lambda: open_bundle(args))
    except Fatal as err:
        print(f"error: {show(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --skip-existing to continue where it stopped", file=sys.stderr)
        return 130
    print(f"{counts['done']} segmented, {counts['skipped']} skipped (mask exists), {counts['failed']} failed "
          f"in {time.perf_counter() - start:.1f} s -> {show(out)} (summary.jsonl)")
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

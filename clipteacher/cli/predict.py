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
import os
import sys
import time
from pathlib import Path

PRECISIONS = ("fp32", "int8", "fp16")
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
    p.add_argument("--compare-bundle", action="append", default=[], metavar="BUNDLE",
                   help="also segment every image with this bundle (a ZegCLIP/TagCLIP, or another student), "
                        "into DIR/<its folder name>/; the image pass time per model goes to DIR/compare.json. "
                        "Repeat for several")
    p.add_argument("--precision", default="fp32", choices=PRECISIONS, help="student graph (must be in the bundle)")
    p.add_argument("--device", default="auto", choices=list(DEVICES),
                   help="onnxruntime provider: auto = CUDA when usable, else CPU")
    p.add_argument("--hubness", choices=["on", "off"],
                   help="the hubness correction (docs/METHOD.md#hubness-correction; default: as the bundle says). "
                        "On, a name that scores high everywhere wins fewer pixels: worth it with many names. "
                        "--compare-bundle models serve their own default")
    p.add_argument("--overlay", action="store_true", help="also write DIR/<stem>.overlay.jpg")
    p.add_argument("--skip-existing", action="store_true", help="skip images whose mask is already in DIR")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="local: this process; ray: a Ray Data actor pool (Ray's cluster when RAY_ADDRESS is set; "
                        "inputs may also be Parquet/CSV files with a 'path' column, local or any pyarrow URI)")
    p.add_argument("--actors", type=int, default=2, help="--engine ray: actors in the pool, one bundle each (default 2)")
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


def open_bundle(args, path: str | None = None, precision: str | None = None):
    """The bundle (`path`, default --bundle; the default bundle is built on first use), with the names embedded once."""
    from clipteacher.runtime.resolve import StartupError, resolve_bundle
    from clipteacher.runtime import Bundle
    from clipteacher.runtime.bundle import check_hubness

    try:
        bundle = Bundle(resolve_bundle(path or args.bundle), precision=precision or args.precision,
                        providers=DEVICES[args.device], verbose=False)
    except (StartupError, FileNotFoundError, ValueError) as err:
        raise Fatal(str(err)) from None
    if args.device == "cuda" and bundle.provider != "CUDAExecutionProvider":
        raise Fatal("--device cuda: onnxruntime cannot use CUDA on this machine (use --device cpu or auto)")
    try:
        if path is None:  # --compare-bundle models serve their own default
            check_hubness(bundle.meta, bundle.folder, args.hubness_on)
    except ValueError as err:
        raise Fatal(f"--hubness on: {err}") from None
    try:
        bundle.embed_text(args.name_list, args.template_list)  # once, before the first image
    except ValueError as err:
        raise Fatal(str(err)) from None
    return bundle


def failure(err: BaseException) -> str:
    """The one-line reason an image failed; Fatal and interrupts are not failures of one image."""
    from clipteacher.batch import failure_message

    if isinstance(err, (Fatal, KeyboardInterrupt)):
        raise err
    return failure_message(err)


def run(args, paths: list[Path], stems: list[str], out: Path, make_bundle, hubness: bool | None = None) -> dict:
    """Segment `paths` into `out`, as out/<stem>.png, --batch images at a time; returns counts {done,
    skipped, failed}. The bundle is loaded on the first image that decodes, so a run with nothing to do
    never loads the model. hubness: the correction on / off (None: as the bundle says)."""
    from tqdm import tqdm

    from clipteacher.batch import Summary, encode_outputs, remove_stale_partials, show, student_passes, write_outputs
    from clipteacher.request import load_image

    remove_stale_partials(out)
    todo = [(p, s) for p, s in zip(paths, stems) if not (args.skip_existing and (out / f"{s}.png").is_file())]
    counts = {"done": 0, "skipped": len(paths) - len(todo), "failed": 0, "pass_seconds": 0.0}
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
            counts["pass_seconds"] += share * len(loaded)
            for (path, stem, image, notes, decoded), feats in zip(loaded, features):
                try:
                    if isinstance(feats, Exception):
                        raise feats
                    started = time.perf_counter() - decoded - share
                    encoded = encode_outputs(bundle[0], image, notes, feats, args.name_list, args.gamma,
                                             args.template_list, args.overlay, hubness)
                    write_outputs(out, path, stem, encoded, summary, started)
                    counts["done"] += 1
                    bar.update()
                except Exception as err:  # noqa: BLE001
                    fail(path, err)
    return counts


def inputs(args, out: Path) -> tuple[list, list[str]]:
    """The image paths of the input arguments; with --engine ray, Parquet/CSV path lists are read too."""
    from clipteacher.batch import InputError, collect_inputs, inside

    from clipteacher.serve.ray_data import LIST_SUFFIXES

    lists = [a for a in args.inputs if a.lower().endswith(LIST_SUFFIXES)]
    if lists and args.engine != "ray":
        raise Fatal(f"{lists[0]} is a list of paths: read it with --engine ray")
    plain = [a for a in args.inputs if a not in lists]
    paths, notes = collect_inputs(plain, out) if plain else ([], [])
    if lists:
        from clipteacher.serve.ray_data import read_path_list

        listed = []
        for arg in lists:
            try:
                listed += read_path_list(arg)
            except ValueError as err:
                raise InputError(str(err)) from None
        resolved = Path(os.path.realpath(out))
        kept = [p for p in listed if "://" in p or not inside(Path(p), resolved)]
        if len(kept) < len(listed):
            notes.append(f"{len(listed) - len(kept)} listed file(s) in the output folder were not taken as inputs")
        paths += [Path(p) if "://" not in p else p for p in dict.fromkeys(kept)]
        if not paths:
            raise InputError(f"{lists[0]}: its 'path' column lists no files")
    return paths, notes


def run_ray(args, paths: list, stems: list[str], out: Path) -> dict:
    """--engine ray: the default bundle is built here once; the actors open it."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise Fatal("--engine ray needs Ray: pip install -e .[ray] (or pip install 'ray[data]')") from None
    from clipteacher.runtime.resolve import StartupError, resolve_bundle
    from clipteacher.serve import ray_data

    from clipteacher.runtime.bundle import check_hubness, read_meta

    try:
        bundle_dir = resolve_bundle(args.bundle)
    except (StartupError, FileNotFoundError, ValueError) as err:
        raise Fatal(str(err)) from None
    try:  # here, once, rather than in every actor
        check_hubness(read_meta(bundle_dir), bundle_dir, args.hubness_on)
    except (FileNotFoundError, ValueError) as err:
        raise Fatal(f"--hubness on: {err}") from None
    try:
        return ray_data.run(args, [str(p) for p in paths], stems, out, bundle_dir, DEVICES[args.device])
    except ray_data.RayStartError as err:
        raise Fatal(f"--engine ray: {err}") from None


def compare(args, paths: list[Path], stems: list[str], out: Path, counts: dict) -> None:
    """--compare-bundle: the same images through each other bundle into out/<its folder name>/, and
    out/compare.json with every model's image-pass time per image (the first is --bundle's)."""
    import json

    from clipteacher.runtime.resolve import StartupError, resolve_bundle

    def row(name, bundle_dir, c):
        ms = 1000 * c["pass_seconds"] / c["done"] if c["done"] else None
        return {"model": name, "bundle": str(bundle_dir), "folder": str(out if name == "main" else out / name),
                "done": c["done"], "failed": c["failed"], "image_pass_ms_per_image": ms}

    rows = [row("main", args.bundle or "default", counts)]
    for path in args.compare_bundle:
        try:
            name = Path(resolve_bundle(path)).name
        except (StartupError, FileNotFoundError, ValueError) as err:
            raise Fatal(f"--compare-bundle {path}: {err}") from None
        if name in {r["model"] for r in rows} or name == "main":
            raise Fatal(f"--compare-bundle {path}: two bundles named {name}; give them distinct folder names")
        folder = out / name
        folder.mkdir(exist_ok=True)
        # fp32 whatever --precision says (a ZegCLIP bundle has no int8 graph); --gamma, when given, applies to all
        c = run(args, paths, stems, folder, lambda: open_bundle(args, path, "fp32"))
        rows.append(row(name, path, c))
        for key in ("done", "skipped", "failed"):
            counts[key] += c[key]
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    for r in rows:
        ms = r["image_pass_ms_per_image"]
        print(f"{r['model']}: {r['done']} images, image pass " + (f"{ms:.1f} ms/image" if ms is not None else "n/a"),
              file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from clipteacher.request import UserError, parse_gamma, parse_names, parse_templates
    from clipteacher.batch import InputError, lock_output, output_stems, show

    try:
        names_text = args.names if args.names is not None else read_names_file(args.names_file)
        args.name_list, name_notes = parse_names(names_text)
        args.names_text = names_text
        args.templates_text = "\n".join(args.templates or [])
        args.template_list = parse_templates(args.templates_text)
        args.gamma = parse_gamma(args.gamma)
        args.hubness_on = None if args.hubness is None else args.hubness == "on"
        if not 1 <= args.batch <= 64:
            raise Fatal(f"--batch must be between 1 and 64, got {args.batch}")
        if args.compare_bundle and args.engine == "ray":
            raise Fatal("--compare-bundle runs with --engine local; run --engine ray once per bundle instead")
        if not 1 <= args.actors <= 1024:
            raise Fatal(f"--actors must be between 1 and 1024, got {args.actors}")
        out = Path(args.out)
        paths, notes = inputs(args, out)
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
        if args.engine == "ray":
            counts = run_ray(args, paths, stems, out)
        else:
            counts = run(args, paths, stems, out, lambda: open_bundle(args), args.hubness_on)
            if args.compare_bundle:
                compare(args, paths, stems, out, counts)
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

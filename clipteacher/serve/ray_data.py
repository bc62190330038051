"""Batch prediction on Ray Data: `clipteacher-predict --engine ray` (same outputs as the local engine).

    clipteacher-predict photos/ --names "sky, tree" --out masks/ --engine ray             # local Ray
    RAY_ADDRESS=auto clipteacher-predict paths.parquet --names-file names.txt --out masks/ --engine ray --actors 8
    clipteacher-predict s3://bucket/list.csv --names "cow" --out masks/ --engine ray      # any pyarrow file system

Inputs are what the local engine takes, plus Parquet or CSV files with a `path` column (local, or any URI
pyarrow opens: s3://, gs://, hdfs://; the images they list may be such URIs too). An actor pool
(`map_batches`, one bundle per actor, `--batch` images per call; images of one size share a student run)
decodes, segments and encodes; this process writes the masks, overlays and summary.jsonl as they arrive,
with the local engine's atomic writes, lock and --skip-existing, so an interrupted run resumes. A file that
cannot be read or decoded costs one error line in the summary and nothing else.
"""
from __future__ import annotations

import io
import os
import json
import sys
import time
from pathlib import Path

import numpy as np

LIST_SUFFIXES = (".parquet", ".csv")  # inputs read as lists of paths (clipteacher-predict --engine ray)


class RayStartError(RuntimeError):
    """Ray could not be started or joined (one line)."""


def check_address(address: str | None, timeout: float = 5.0) -> None:
    """RAY_ADDRESS as host:port (or ray://host:port) must answer before ray.init is asked to join it: Ray
    itself retries a dead address for minutes. "auto", "local" and unset are left to Ray."""
    import socket

    if not address or address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayStartError(f"RAY_ADDRESS={address!r} is not host:port, ray://host:port or auto")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as err:
        raise RayStartError(f"RAY_ADDRESS={address}: nothing answers there ({err.strerror or err}); "
                            f"start the cluster (`ray start --head`) or unset RAY_ADDRESS") from None


def read_path_list(uri: str) -> list[str]:
    """A Parquet or CSV file (local path or pyarrow URI) -> the strings of its `path` column."""
    import pyarrow.csv
    import pyarrow.parquet

    try:
        table = (pyarrow.parquet.read_table(uri, columns=["path"]) if uri.lower().endswith(".parquet")
                 else pyarrow.csv.read_csv(uri, convert_options=pyarrow.csv.ConvertOptions(include_columns=["path"])))
    except (OSError, KeyError, ValueError) as err:  # pyarrow's errors subclass these
        raise ValueError(f"{uri}: cannot read a 'path' column ({str(err).splitlines()[0][:200]})") from None
    return [p for p in table.column("path").to_pylist() if isinstance(p, str) and p]


def read_bytes(path: str, limit: int) -> bytes:
    """An image file's bytes, local or through a pyarrow file system; refused past `limit` bytes unread."""
    from clipteacher.request import UserError

    try:
        if "://" not in path:
            size = Path(path).stat().st_size
            if size > limit:
                raise UserError(f"the file is {size / 1e6:.0f} MB; up to {limit / 1e6:.0f} MB is read")
            return Path(path).read_bytes()
        import pyarrow.fs

        fs, inner = pyarrow.fs.FileSystem.from_uri(path)
        info = fs.get_file_info(inner)
        if info.type != pyarrow.fs.FileType.File:
            raise UserError("no such file")
        if info.size > limit:
            raise UserError(f"the file is {info.size / 1e6:.0f} MB; up to {limit / 1e6:.0f} MB is read")
        with fs.open_input_stream(inner) as f:
            return f.read()
    except OSError as err:  # pyarrow's ArrowIOError is an OSError too
        raise UserError(f"cannot read the file ({getattr(err, 'strerror', None) or str(err).splitlines()[0][:200]})") from None


class Predictor:
    """One actor of the pool: a bundle, and per call a batch of rows {path, stem} -> rows of encoded outputs."""

    MAX_FILE_BYTES = 200_000_000  # larger files are not read (the decoder refuses far smaller images anyway)

    def __init__(self, bundle: str, precision: str, names: list[str], gamma, templates, overlay: bool, threads: int,
                 providers: list[str] | None = None, hubness: bool | None = None):
        from clipteacher.runtime import Bundle

        self.bundle = Bundle(bundle, precision=precision, providers=providers, verbose=False, threads=threads,
                             spin=False)
        self.names, self.gamma, self.templates, self.overlay, self.hubness = names, gamma, templates, overlay, hubness
        self.bundle.embed_text(names, templates)

    def __call__(self, batch: dict) -> dict:
        from clipteacher.batch import encode_outputs, failure_message, student_passes
        from clipteacher.request import load_image

        paths = [str(p) for p in batch["path"]]
        rows = {"path": paths, "stem": [str(s) for s in batch["stem"]], "mask": [b""] * len(paths),
                "overlay": [b""] * len(paths), "item": [""] * len(paths), "error": [""] * len(paths),
                "seconds": [0.0] * len(paths)}
        loaded = []  # (row, image, notes, seconds)
        for i, path in enumerate(paths):
            t = time.perf_counter()
            try:
                image, notes = load_image(io.BytesIO(read_bytes(path, self.MAX_FILE_BYTES)), name=Path(path).name)
                loaded.append((i, image, notes, time.perf_counter() - t))
            except Exception as err:  # noqa: BLE001 - one bad file is one error line
                rows["error"][i] = failure_message(err)
        t = time.perf_counter()
        features = student_passes(self.bundle, [image for _, image, _, _ in loaded])
        share = (time.perf_counter() - t) / max(1, len(loaded))
        for (i, image, notes, decoded), feats in zip(loaded, features):
            t = time.perf_counter()
            try:
                if isinstance(feats, Exception):
                    raise feats
                enc = encode_outputs(self.bundle, image, notes, feats, self.names, self.gamma, self.templates,
                                     self.overlay, self.hubness)
                rows["mask"][i], rows["overlay"][i] = enc["mask"], enc["overlay"] or b""
                rows["item"][i] = json.dumps(enc["item"])
                rows["seconds"][i] = decoded + share + time.perf_counter() - t
            except Exception as err:  # noqa: BLE001
                rows["error"][i] = failure_message(err)
        return {k: np.array(v, dtype=object) for k, v in rows.items()}


def run(args, paths: list[str], stems: list[str], out: Path, bundle_dir: Path, providers=None) -> dict:
    """Segment `paths` into `out` on a Ray Data actor pool; returns counts {done, skipped, failed}."""
    import ray
    from tqdm import tqdm

    from clipteacher.batch import Summary, remove_stale_partials, show, write_outputs

    remove_stale_partials(out)
    todo = [(p, s) for p, s in zip(paths, stems) if not (args.skip_existing and (out / f"{s}.png").is_file())]
    counts = {"done": 0, "skipped": len(paths) - len(todo), "failed": 0}
    if not todo:
        return counts
    if not ray.is_initialized():
        check_address(os.environ.get("RAY_ADDRESS"))
        try:
            ray.init(logging_level="WARNING", log_to_driver=False)  # RAY_ADDRESS (or `auto`) joins a cluster
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise RayStartError(f"cannot start or join Ray ({str(err).splitlines()[0][:200]}); "
                                f"check RAY_ADDRESS or run `ray start --head`") from None
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = ray.data.from_items([{"path": str(p), "stem": s} for p, s in todo],
                                override_num_blocks=max(args.actors, -(-len(todo) // args.batch)))
    ds = ds.map_batches(Predictor, batch_size=args.batch, concurrency=args.actors, num_cpus=1, batch_format="numpy",
                        fn_constructor_kwargs={"bundle": str(bundle_dir), "precision": args.precision,
                                               "names": args.name_list, "gamma": args.gamma,
                                               "templates": args.template_list, "overlay": args.overlay,
                                               "threads": 1, "providers": providers,
                                               "hubness": args.hubness_on})
    with Summary(out, resume=args.skip_existing) as summary, \
            tqdm(total=len(todo), unit="img", file=sys.stderr, disable=None) as bar:
        for row in ds.iter_rows():
            if row["error"]:
                counts["failed"] += 1
                summary.add({"file": row["path"], "error": row["error"]})
                tqdm.write(f"error: {show(row['path'])}: {show(row['error'])}", sys.stderr)
            else:
                encoded = {"mask": row["mask"], "overlay": row["overlay"] or None, "item": json.loads(row["item"])}
                write_outputs(out, row["path"], row["stem"], encoded, summary, time.perf_counter() - row["seconds"])
                counts["done"] += 1
            bar.update()
    return counts

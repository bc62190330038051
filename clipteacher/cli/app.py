"""Serve the Gradio app on an exported bundle (onnxruntime; this process never imports torch).

    clipteacher-app [--bundle DIR] [--host H] [--port P] [--precision fp32|int8|fp16]
                    [--concurrency N] [--queue N] [--threads N] [--solo-threads N] [--max-upload-mb MB]
                    [--hubness on|off] [--backend URL]

Without --bundle (or CLIPTEACHER_BUNDLE) it loads bundles/default, built from the model folder assets/default by
`clipteacher-export` in a subprocess when missing or made from another checkpoint (the export needs
torch, the app does not). Environment: CLIPTEACHER_BUNDLE, HOST, PORT, CLIPTEACHER_PRECISION,
CLIPTEACHER_CONCURRENCY, CLIPTEACHER_QUEUE, CLIPTEACHER_THREADS, CLIPTEACHER_SOLO_THREADS,
CLIPTEACHER_MAX_UPLOAD_MB, CLIPTEACHER_HUBNESS, CLIPTEACHER_DEVICE=auto|cuda|cpu (cuda: exit 2 with the reason
instead of falling back to the CPU; see clipteacher/runtime/providers.py).

Serving: up to --concurrency model requests run at once (default: the cores, at most 4), each
onnxruntime session using --threads intra-op threads (default: cores / concurrency, so concurrent
requests do not oversubscribe the CPU); up to --queue more wait, and beyond that a request is
answered "busy, try again" (HTTP 503) at once instead of waiting without bound. On the CPU, a student or
classifier pass that starts while no other is running uses --solo-threads threads instead (default: the
cores; 0: off), so a lone request is not held to its share of the cores.

--backend http://HEAD:8000/segment (or CLIPTEACHER_BACKEND): the Segment view and the `segment` API send their
requests to that Ray Serve deployment (clipteacher/serve/ray_serve.py), so browser users share its replicas with
API users; this process decodes the upload, checks the names and draws the result. The other views (Compare,
Attention, pseudo labels, Live) still run on the local bundle.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from clipteacher.runtime.resolve import StartupError, resolve_bundle

def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipteacher-app", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=os.environ.get("CLIPTEACHER_BUNDLE") or None,
                        help="exported bundle folder (default: bundles/default, built from assets/default when needed)")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"), help="0.0.0.0 to serve the network")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "7860")))
    parser.add_argument("--precision", default=os.environ.get("CLIPTEACHER_PRECISION", "fp32"),
                        choices=["fp32", "int8", "fp16"], help="student graph variant (must be in the bundle)")
    env = os.environ.get
    parser.add_argument("--concurrency", type=int, default=env("CLIPTEACHER_CONCURRENCY"),
                        help="model requests computed at once (default: the cores, at most 4)")
    parser.add_argument("--queue", type=int, default=env("CLIPTEACHER_QUEUE", "32"),
                        help="requests allowed to wait; more are answered 'busy, try again'")
    parser.add_argument("--threads", type=int, default=env("CLIPTEACHER_THREADS"),
                        help="onnxruntime threads per request (default: cores / concurrency)")
    parser.add_argument("--solo-threads", type=int, default=env("CLIPTEACHER_SOLO_THREADS"),
                        help="onnxruntime threads of a pass that runs alone (default: the cores; 0: off)")
    parser.add_argument("--max-upload-mb", type=float, default=env("CLIPTEACHER_MAX_UPLOAD_MB", "20"),
                        help="uploads above this size are refused (default 20)")
    parser.add_argument("--compare-bundle", action="append", default=[], metavar="BUNDLE",
                        help="another exported bundle (a ZegCLIP/TagCLIP, or another student) that the Compare "
                             "view also runs, with its image pass's time; repeat for several")
    parser.add_argument("--long-jobs", type=int, default=env("CLIPTEACHER_LONG_JOBS", "1"),
                        help="videos computed at once, in slots of their own (default 1; more wait in the queue)")
    parser.add_argument("--hubness", choices=["on", "off"], default=env("CLIPTEACHER_HUBNESS") or None,
                        help="serve the hubness correction on or off (default: as the bundle says); on, a name that "
                             "scores high everywhere wins fewer pixels, which helps when users type many names")
    parser.add_argument("--backend", default=env("CLIPTEACHER_BACKEND") or None, metavar="URL",
                        help="a Ray Serve route (http://HEAD:8000/segment) that computes the Segment view's requests")
    args = parser.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    concurrency = args.concurrency or min(cores, 4)
    threads = args.threads or max(1, cores // concurrency)
    solo_threads = cores if args.solo_threads is None else args.solo_threads
    from clipteacher.app.ui import Serving

    try:
        serving = Serving(concurrency=concurrency, queue=args.queue, max_upload_mb=args.max_upload_mb,
                          long_jobs=args.long_jobs)
    except ValueError as err:
        parser.error(str(err))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup requests

    import numpy as np

    from clipteacher.runtime import Bundle
    from clipteacher.runtime.providers import DeviceError

    try:
        bundle = Bundle(resolve_bundle(args.bundle), precision=args.precision, verbose=False, threads=threads,
                        spin=concurrency == 1,  # spinning threads would steal the cores of concurrent requests
                        solo_threads=solo_threads)
    except (StartupError, FileNotFoundError, ValueError, DeviceError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    import cv2

    from clipteacher.app.service import Service
    from clipteacher.app.ui import build_demo, launch

    cv2.setNumThreads(threads)
    others = {}
    for path in args.compare_bundle:
        try:
            # no solo copies: they would double a ZegCLIP's CLIP image encoder, and Compare times the passes
            other = Bundle(resolve_bundle(path), verbose=False, threads=threads, spin=concurrency == 1)
        except (StartupError, FileNotFoundError, ValueError, DeviceError) as err:
            print(f"error: --compare-bundle {path}: {err}", file=sys.stderr)
            return 2
        others[f"{other.model_name} ({other.folder.name})"] = Service(other)
    from clipteacher.serve.client import BackendError, ServeClient

    backend = None
    if args.backend:
        try:
            backend = ServeClient(args.backend)
        except ValueError as err:  # not an http(s) URL
            print(f"error: --backend: {err}", file=sys.stderr)
            return 2
    try:
        service = Service(bundle, others=others, hubness=None if args.hubness is None else args.hubness == "on",
                          backend=backend)  # asks the backend what it serves
    except BackendError as err:
        print(f"error: --backend: {err}", file=sys.stderr)
        return 2
    except ValueError as err:  # --hubness on without a reference
        print(f"error: --hubness on: {err}", file=sys.stderr)
        return 2
    if backend is not None:
        remote = service.backend_info
        logging.getLogger("clipteacher.app").info("Segment requests go to %s (%s on %s)", backend.url,
                                                  remote.get("bundle"), remote.get("provider"))
    # load every graph now, not on the first request
    bundle.open_sessions()
    bundle.embed_text(["warm-up"])
    bundle.teacher_tokens(np.zeros((32, 32, 3), np.uint8))
    demo = build_demo(service, serving)
    logging.getLogger("clipteacher.app").info(
        "serving %s on %s: %d request(s) at once, %d thread(s) each (%s alone), %d may wait, uploads up to %g MB",
        bundle.folder.name, bundle.provider, concurrency, threads, bundle.solo_threads or threads, serving.queue,
        serving.max_upload_mb)
    # `kill` (SIGTERM) stops the server like Ctrl-C, so the exit handlers remove the app's temporary files
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        launch(demo, args.host, args.port)
    except OSError as err:  # port in use, cannot bind
        print(f"error: cannot serve on {args.host}:{args.port}: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One machine vs a Ray cluster, on the same images and names, in one run (compare the ratios):

    python bench/scale.py                         # default bundle, 512-px MSRC-21 images
    python bench/scale.py --clients 16 --per-client 4 --data-images 200

Rows:
  - app: the Gradio app started the README way (bench/serve.py's light HTTP client)
  - serve xN: the Ray Serve deployment (clipteacher.serve.ray_serve) with N replicas of 1 CPU and 1
    onnxruntime thread each, on a local Ray with 2 CPUs, called over HTTP with JSON
For each: sequential new-image latency (p50), throughput at --clients concurrent clients, p95 under that
load against 1.3 x (clients / throughput) (the fairness target), and server CPU time per request
(the server processes' user + system time: the app's process; Serve's replicas and proxy).
  - app>serve2: the app started with `--backend` in front of the two-replica deployment (its Segment requests
    computed by the replicas; server CPU counts the app, the replicas and the proxy)
  - data xN: `clipteacher-predict --engine ray` with N actors on --data-images images: images/s over the
    whole run (actor start included) and over the rows after the first (steady state).
"""
from __future__ import annotations

import argparse
import base64
import importlib.util
import os
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import httpx

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("bench_serve", HERE / "serve.py")
serve_bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(serve_bench)
NAMES, EXTRA = serve_bench.NAMES, serve_bench.EXTRA


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_busy() -> float:
    """CPU seconds this machine's cores have spent busy so far (/proc/stat: user, nice, system, irq, softirq; not
    idle, iowait, or steal, which is time the host gave to other machines)."""
    user, nice, system, idle, iowait, irq, softirq = (int(x) for x in
                                                      Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def concurrent(call, clients: int, per_client: int) -> tuple[list[float], int, float, float]:
    """clients threads x per_client calls of call(k, j) -> (latencies, errors, wall seconds, cores the machine kept
    busy meanwhile, all processes)."""
    lat, errors, lock = [], [0], threading.Lock()

    def job(k: int):
        for j in range(per_client):
            t = time.perf_counter()
            try:
                call(k, j)
                with lock:
                    lat.append(time.perf_counter() - t)
            except Exception:  # noqa: BLE001 - counted
                with lock:
                    errors[0] += 1

    threads = [threading.Thread(target=job, args=(k,)) for k in range(clients)]
    wall, busy = time.perf_counter(), machine_busy()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - wall
    return lat, errors[0], wall, (machine_busy() - busy) / wall


def row(label: str, seq: list[float], lat: list[float], errors: int, wall: float, cpu: float, n: int, clients: int,
        busy: float) -> float:
    throughput = len(lat) / wall
    p95 = float(serve_bench.percentile(lat, 95)) if lat else float("nan")
    fair = 1.3 * clients / throughput
    print(f"  {label:<10} sequential p50 {1000 * statistics.median(seq):5.0f} ms   {clients} clients: "
          f"{throughput:5.2f} req/s  p95 {1000 * p95:5.0f} ms (fair <= {1000 * fair:.0f}: "
          f"{'met' if p95 <= fair else 'MISSED'})  errors {errors}   server CPU {1000 * cpu / n:4.0f} ms/request  "
          f"machine busy {busy:.2f} cores", flush=True)
    return throughput


def bench_app(args, images, bundle_dir, label: str = "app", app_args: list[str] | None = None,
              pids: list[int] | None = None) -> float:
    """The app's row; app_args ["--backend", URL] puts it in front of a Serve deployment whose processes (`pids`)
    are then counted in the server CPU too."""
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_app_"))
    port = free_port()
    proc = serve_bench.start_server(port, str(bundle_dir) if args.bundle else None, tmp / "app.log", app_args or [])
    try:
        url = f"http://127.0.0.1:{port}/"
        d = serve_bench.Driver(url, None)
        d.segment(images[-1], NAMES)
        seq = [d.segment(images[i], NAMES)[0] for i in range(args.sequential)]
        drivers = [serve_bench.Driver(url, None) for _ in range(args.clients)]
        watched = [proc.pid, *(pids or [])]
        cpu = sum(serve_bench.cpu_seconds(p) for p in watched)
        lat, errors, wall, busy = concurrent(
            lambda k, j: drivers[k].segment(images[(k * args.per_client + j) % len(images)],
                                            NAMES[:4] + [EXTRA[k % len(EXTRA)]]), args.clients, args.per_client)
        cpu = sum(serve_bench.cpu_seconds(p) for p in watched) - cpu
        return row(label, seq, lat, errors, wall, cpu, args.clients * args.per_client, args.clients, busy)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def serve_pids() -> list[int]:
    from ray.util.state import list_actors

    return [a.pid for a in list_actors(filters=[("state", "=", "ALIVE")])
            if a.pid and ("Segmenter" in (a.class_name or "") or "Proxy" in (a.class_name or ""))]


def bench_serve(args, images, bundle_dir, replicas: int, port: int, front: bool) -> tuple[float, float]:
    """-> (throughput, busy cores) of the replicas' row; front: also the app>serve2 row (with two replicas)."""
    from ray import serve

    from clipteacher.serve.ray_serve import Segmenter

    serve.run(Segmenter.options(num_replicas=replicas).bind(bundle=str(bundle_dir), threads=1), name="clipteacher",
              route_prefix="/segment")
    url = f"http://127.0.0.1:{port}/segment"
    bodies = [base64.b64encode(p.read_bytes()).decode() for p in images]
    clients = [httpx.Client(timeout=120) for _ in range(args.clients)]

    def call(k: int, j: int, names=None):
        r = clients[k].post(url, json={"image": bodies[(k * args.per_client + j) % len(bodies)],
                                       "names": names or NAMES[:4] + [EXTRA[k % len(EXTRA)]]})
        r.raise_for_status()

    for k in range(replicas * 2):
        call(0, k)  # warm-up: every replica has embedded the names once
    seq = []
    for i in range(args.sequential):
        t = time.perf_counter()
        call(0, i, NAMES)
        seq.append(time.perf_counter() - t)
    pids = serve_pids()
    cpu = sum(serve_bench.cpu_seconds(p) for p in pids)
    lat, errors, wall, busy = concurrent(call, args.clients, args.per_client)
    cpu = sum(serve_bench.cpu_seconds(p) for p in pids) - cpu
    throughput = row(f"serve x{replicas}", seq, lat, errors, wall, cpu, args.clients * args.per_client, args.clients,
                     busy)
    if replicas == 2 and front:  # the app as the deployment's front end (clipteacher-app --backend)
        bench_app(args, images, bundle_dir, "app>serve2", ["--backend", url], pids)
    serve.delete("clipteacher")
    return throughput, busy


def bench_data(args, paths: list[Path], bundle_dir, actors: int) -> tuple[float, float]:
    """-> (steady images/s, busy cores over the whole run)."""
    from clipteacher.batch import output_stems
    from clipteacher.serve import ray_data

    out = Path(tempfile.mkdtemp(prefix=f"bench_scale_data{actors}_"))
    opts = SimpleNamespace(skip_existing=False, batch=8, actors=actors, precision="fp32", name_list=NAMES,
                           gamma=None, template_list=None, overlay=False, hubness_on=None)
    t, busy = time.perf_counter(), machine_busy()
    counts = ray_data.run(opts, [str(p) for p in paths], output_stems(paths), out, bundle_dir)
    wall = time.perf_counter() - t
    busy = (machine_busy() - busy) / wall
    mtimes = sorted(p.stat().st_mtime for p in out.glob("*.png"))
    steady = (len(mtimes) - 1) / (mtimes[-1] - mtimes[0]) if len(mtimes) > 1 and mtimes[-1] > mtimes[0] else float("nan")
    print(f"  data x{actors}    {counts['done']} images in {wall:.1f} s = {counts['done'] / wall:.2f} images/s "
          f"(after the first row {steady:.2f} images/s)  failed {counts['failed']}  machine busy {busy:.2f} "
          f"cores", flush=True)
    return steady, busy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", default=None, help="bundle folder (default: the app's default bundle)")
    parser.add_argument("--sequential", type=int, default=20)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--data-images", type=int, default=200)
    parser.add_argument("--skip", default="", help="comma-separated rows to leave out: app, serve, front, data")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    import ray
    from ray import serve

    from clipteacher.runtime.resolve import resolve_bundle

    bundle_dir = resolve_bundle(args.bundle)
    tmp = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    images = serve_bench.make_images(tmp, max(args.sequential, args.clients * args.per_client) + 1)
    print(f"bench/scale.py  bundle={bundle_dir.name}  cores={os.cpu_count()}  images 512 px  names {len(NAMES)}-"
          f"{len(NAMES[:4]) + 1}  {args.clients} clients x {args.per_client}", flush=True)
    results, busy = {}, {}
    if "app" not in skip:
        results["app"] = bench_app(args, images, bundle_dir)
    ray.init(num_cpus=2, logging_level="WARNING", log_to_driver=False)
    try:
        if "serve" not in skip:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for n in (1, 2):
                results[f"serve{n}"], busy[f"serve{n}"] = bench_serve(args, images, bundle_dir, n, port, "front" not in skip)
            serve.shutdown()
        if "data" not in skip:
            more = serve_bench.make_images(tmp / "data", args.data_images) if (tmp / "data").mkdir() is None else []
            for n in (1, 2):
                results[f"data{n}"], busy[f"data{n}"] = bench_data(args, more, bundle_dir, n)
    finally:
        ray.shutdown()
    cores = len(os.sched_getaffinity(0))  # what this process may use (Ray was started with 2 CPUs)

    def ceiling(one: str, two: str) -> str:
        # the ratio = (busy cores with two workers / with one) x (work done per busy core-second, two / one): with
        # one worker the clients, the proxy, the driver and Ray's own processes already keep part of the second
        # core busy, which caps the first factor at cores / busy[one]
        text = f"; busy cores {busy[one]:.2f} -> {busy[two]:.2f} of {cores} (at most {cores / busy[one]:.2f}x more)"
        if one.startswith("serve"):  # (Ray Data's busy cores span the whole run, its rate the steady part)
            text += f", requests per busy core-second {results[one] / busy[one]:.2f} -> {results[two] / busy[two]:.2f}"
        return text

    if "serve1" in results:
        r = results["serve2"] / results["serve1"]
        print(f"  Serve 2 replicas / 1: {r:.3f}x throughput (target >= 1.7x: {'met' if r >= 1.7 else 'MISSED'}"
              f"{ceiling('serve1', 'serve2')})")
    if "data1" in results:
        r = results["data2"] / results["data1"]
        print(f"  Ray Data 2 actors / 1: {r:.3f}x steady images/s (target >= 1.7x: {'met' if r >= 1.7 else 'MISSED'}"
              f"{ceiling('data1', 'data2')})")


if __name__ == "__main__":
    main()

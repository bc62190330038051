"""Beyond one process, proved on a two-node Ray cluster inside this machine (ray.cluster_utils.Cluster, one
CPU per node): the Serve deployment's replicas both answer, answers never mix under concurrent load, a
killed replica loses no request that a retry does not recover, and Ray Data batch prediction writes the
local engine's masks and resumes after a killed run. Skipped (one line) when Ray is not installed."""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clipteacher.cli import predict
from clipteacher.runtime import Bundle
from helpers import ROOT, free_port

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e .[ray])")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")

NAMES = ["sky", "grass", "cow", "zebra", "lamp"]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")  # a loaded 2-core machine starts slowly
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    c.add_node(num_cpus=1)
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def serve_url(cluster, bundle_dir):
    from clipteacher.serve.ray_serve import Segmenter

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    serve.run(Segmenter.options(num_replicas=2).bind(bundle=str(bundle_dir)), name="clipteacher",
              route_prefix="/segment")
    yield f"http://127.0.0.1:{port}/segment"
    serve.shutdown()


def picture(seed: int, size=(60, 80)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def request_body(image: np.ndarray, names: list[str]) -> dict:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return {"image": base64.b64encode(buf.getvalue()).decode(), "names": names}


def mask_of(reply: dict) -> tuple[np.ndarray, list[str]]:
    with Image.open(io.BytesIO(base64.b64decode(reply["mask_png"]))) as im:
        return np.asarray(im), json.loads(im.info["classes"])


def ask(url: str, seed: int, retries: int = 0) -> tuple[dict, int]:
    """POST one request (image `seed`, its own names); -> (reply, attempts that failed before it)."""
    names = NAMES[seed % 3: seed % 3 + 3]
    failed = 0
    while True:
        try:
            r = httpx.post(url, json=request_body(picture(seed), names), timeout=120)
            if r.status_code == 200:
                return r.json(), failed
            error = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as err:
            error = repr(err)
        failed += 1
        if failed > retries:
            raise AssertionError(f"request {seed} failed {failed} time(s): {error}")
        time.sleep(1.0)


def check(bundle: Bundle, seed: int, reply: dict) -> bool:
    """The reply is this request's: its classes, and labels as this process computes them."""
    names = NAMES[seed % 3: seed % 3 + 3]
    labels, classes = mask_of(reply)
    expected = bundle.segment(picture(seed), names)
    return classes == names and reply["classes"] == names and labels.shape == expected.shape and \
        float((labels == expected).mean()) > 0.99


# Ray Data first: the Serve replicas, once started, hold both of the cluster's CPUs until the module ends.


def write_images(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(picture(i, (48 + 8 * (i % 2), 64))).save(folder / f"img{i:02d}.png")
    (folder / "broken.png").write_bytes(b"not an image")
    return sorted(folder.glob("img*.png"))


def masks(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def test_ray_data_writes_the_local_masks_and_resumes(cluster, bundle_dir, tmp_path):
    images = write_images(tmp_path / "in", 24)
    common = ["--names", "sky, cow, zebra", "--bundle", str(bundle_dir)]
    assert predict.main([str(tmp_path / "in"), *common, "--out", str(tmp_path / "local")]) == 1  # broken.png
    # a killed Ray run (the driver, hard), then a resumed one
    env = {**os.environ, "RAY_ADDRESS": cluster.address}
    cmd = [sys.executable, "-m", "clipteacher.cli.predict", str(tmp_path / "in"), *common, "--out",
           str(tmp_path / "ray"), "--engine", "ray", "--batch", "2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list((tmp_path / "ray").glob("img*.png")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = len(list((tmp_path / "ray").glob("img*.png")))
    assert predict.main([str(tmp_path / "in"), *common, "--out", str(tmp_path / "ray"), "--engine", "ray",
                         "--skip-existing"]) == 1
    local, remote = masks(tmp_path / "local"), masks(tmp_path / "ray")
    assert sorted(remote) == sorted(local) == [p.name for p in images] and first >= 1
    assert all((remote[k] == local[k]).mean() > 0.99 for k in local)
    lines = [json.loads(x) for x in (tmp_path / "ray" / "summary.jsonl").read_text().splitlines()]
    assert sorted(x["mask"] for x in lines if "mask" in x) == sorted(local)  # one line per mask
    assert [x["error"] for x in lines if "error" in x] and all("broken.png" in x["file"] for x in lines if "error" in x)
    assert not list((tmp_path / "ray").glob(".*partial*"))


def test_ray_data_reads_a_parquet_list_of_paths(cluster, bundle_dir, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = write_images(tmp_path / "in", 5)
    listed = [str(p) for p in images[:3]] + [str(tmp_path / "in" / "missing.png")]
    pq.write_table(pa.table({"path": listed}), tmp_path / "list.parquet")
    out = tmp_path / "out"
    assert predict.main([str(tmp_path / "list.parquet"), "--names", "sky, cow", "--bundle", str(bundle_dir),
                         "--out", str(out), "--engine", "ray"]) == 1  # missing.png: one error line
    assert sorted(p.name for p in out.glob("img*.png")) == [p.name for p in images[:3]]
    errors = [json.loads(x) for x in (out / "summary.jsonl").read_text().splitlines() if '"error"' in x]
    assert len(errors) == 1 and "missing.png" in errors[0]["file"] and "cannot read" in errors[0]["error"]


def test_a_path_list_without_the_ray_engine_is_one_line(tmp_path, capsys):
    (tmp_path / "list.csv").write_text("path\nx.png\n")
    assert predict.main([str(tmp_path / "list.csv"), "--names", "cow", "--out", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().endswith("read it with --engine ray")


def test_a_dead_ray_address_is_one_line(bundle_dir, tmp_path):
    """Ray retries an address where nothing listens for minutes; the command must say so at once instead.
    (Before the address check this ran into the subprocess timeout.)"""
    import subprocess

    from helpers import free_port
    from PIL import Image

    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "a.png")
    env = {**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"}
    res = subprocess.run([sys.executable, "-m", "clipteacher.cli.predict", str(tmp_path / "a.png"), "--names", "sky",
                          "--out", str(tmp_path / "out"), "--bundle", str(bundle_dir), "--engine", "ray"],
                         capture_output=True, text=True, env=env, timeout=240)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and "RAY_ADDRESS" in lines[0] and "nothing answers" in lines[0], res.stderr


def test_both_replicas_answer_and_answers_never_mix(serve_url, bundle_dir):
    bundle = Bundle(bundle_dir, verbose=False)
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda seed: ask(serve_url, seed)[0], range(32)))
    assert len({r["replica"] for r in replies}) == 2
    assert all(check(bundle, seed, r) for seed, r in enumerate(replies))  # 0 mixed-up answers


def test_the_app_front_end_shares_the_replicas(serve_url, bundle_dir, tmp_path):
    """clipteacher-app --backend: the Segment view's requests are answered by the deployment's replicas, each with
    the labels this process computes for the same image and names (concurrent, so a mix-up would show)."""
    from clipteacher.app import service as svc
    from clipteacher.serve.client import ServeClient

    bundle = Bundle(bundle_dir, verbose=False)
    service = svc.Service(bundle, backend=ServeClient(serve_url, timeout=120))
    assert service.backend_info["vocabulary"] == bundle.vocabulary

    def one(seed: int) -> tuple[bool, str]:
        path = tmp_path / f"{seed}.png"
        Image.fromarray(picture(seed)).save(path)
        image, _ = svc.load_image(path)
        names = NAMES[seed % 3: seed % 3 + 3]
        seg = service.segment_remote(image, path.read_bytes(), ", ".join(names))
        same = seg.names == names and float((seg.labels == bundle.segment(picture(seed), names)).mean()) > 0.99
        return same, seg.replica

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(300, 316)))
    assert all(same for same, _ in results) and all(replica for _, replica in results)  # which: Serve's choice


def test_errors_are_one_line_and_the_replicas_keep_serving(serve_url):
    info = httpx.get(serve_url, timeout=60).json()
    assert info["provider"] == "CPUExecutionProvider" and "sky" in info["vocabulary"]
    cases = [(b"{not json", 400), (json.dumps({"image": "!!", "names": "cow"}).encode(), 400),
             (json.dumps({"image": base64.b64encode(b"no image").decode(), "names": "cow"}).encode(), 400),
             (json.dumps({**request_body(picture(0), ["cow"]), "gamma": 1e308}).encode(), 400),
             (json.dumps({**request_body(picture(0), ["cow"]), "extra": 1}).encode(), 400),
             (b"x" * 30_000_000, 413)]
    for body, status in cases:
        r = httpx.post(serve_url, content=body, timeout=60)
        assert r.status_code == status, r.text
        message = r.json()["error"]
        assert message and "\n" not in message and "Traceback" not in message
    assert ask(serve_url, 3)[0]["classes"] == NAMES[0:3]


def test_a_killed_replica_loses_no_request_and_the_survivor_answers(serve_url, bundle_dir):
    from ray.util.state import list_actors

    bundle = Bundle(bundle_dir, verbose=False)
    replicas = [a for a in list_actors(filters=[("state", "=", "ALIVE")]) if "Segmenter" in (a.class_name or "")]
    assert len(replicas) == 2
    results, done = {}, threading.Event()

    def load(seed: int):
        results[seed] = ask(serve_url, seed, retries=3)
        if len(results) >= 4:
            done.set()

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(load, seed) for seed in range(100, 132)]
        assert done.wait(300)
        ray.kill(ray.get_actor(replicas[0].name, namespace="serve"))  # mid-load
        for f in futures:
            f.result()
    assert all(check(bundle, seed, reply) for seed, (reply, _) in results.items())
    after = [ask(serve_url, seed)[0] for seed in range(200, 204)]  # answered after the kill, no retry needed
    assert all(check(bundle, 200 + i, r) for i, r in enumerate(after))


def test_serve_config_is_valid_and_its_import_path_builds_the_app(bundle_dir):
    import importlib

    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = ServeDeploySchema.model_validate(yaml.safe_load((ROOT / "deploy" / "ray" / "serve.yaml").read_text()))
    app = config.applications[0]
    module, name = app.import_path.split(":")
    built = getattr(importlib.import_module(module), name)({**app.args, "bundle": str(bundle_dir)})
    assert isinstance(built, serve.Application)
    assert [d.name for d in app.deployments] == ["Segmenter"]  # the deployment the YAML configures exists

"""Tiny models, datasets and bundles shared by the tests (imported as `helpers`; pytest puts tests/ on the path)."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from clipteacher.config import Config, from_dict
from clipteacher.train.datasets import write_folder_dataset

ROOT = Path(__file__).resolve().parents[1]
MSRC = ROOT.parent / "shared" / "data" / "msrc21"
# A random open_clip CLIP small enough to build in a second; its positional grid is resized to any input size.
TINY_CLIP = dict(
    embed_dim=32,
    vision_cfg={"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    text_cfg={"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
)
CLASSES = ["sky", "cat", "grass", "cow"]
UNSEEN = ["cat"]
# The unseen class sits in the middle of the list so training must re-index labels into its vocabulary.
COLORS = np.array([[90, 150, 230], [200, 200, 200], [40, 160, 40], [120, 80, 40]], dtype=np.uint8)  # class order


def synthetic_sample(rng: np.random.Generator, h: int = 48, w: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Sky over grass with a cow and a cat box, a void band: H x W x 3 image, H x W label."""
    label = np.zeros((h, w), dtype=np.uint8)
    label[h // 2 :] = 2  # grass
    y, x = rng.integers(4, h // 2), rng.integers(0, w // 2)
    label[y : y + 14, x : x + 18] = 3  # cow
    label[y : y + 12, x + 22 : x + 36] = 1  # cat
    label[:, :3] = 255
    image = COLORS[np.minimum(label, 3)].astype(np.int16) + rng.integers(-12, 12, (h, w, 3))
    image[label == 255] = 10
    return np.clip(image, 0, 255).astype(np.uint8), label


def make_dataset(root, n_train: int = 6, n_val: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    samples = {
        "train": [(f"t{i}", *synthetic_sample(rng)) for i in range(n_train)],
        "val": [(f"v{i}", *synthetic_sample(rng)) for i in range(n_val)],
    }
    return write_folder_dataset(root, CLASSES, UNSEEN, samples, name="tiny")


def tiny_config(data_root, out_dir, **sections) -> Config:
    values = {
        "data": {"root": str(data_root), "crop_size": 48, "base_size": 48, "eval_size": 48, "num_workers": 0},
        "teacher": {"kind": "clip", "clip_config": TINY_CLIP, "input_size": 32, "mode": "online"},
        "student": {"backbone": "tf_efficientnet_lite0", "pretrained": False, "head_dim": 16},
        "optim": {"warmup_iters": 1},
        "train": {"out_dir": str(out_dir), "iters": 4, "batch_size": 2, "val_every": 0, "ckpt_every": 2,
                  "log_every": 1, "threads": 1},
        "plm": {"decoder_heads": 4},
    }
    for section, fields in sections.items():
        values.setdefault(section, {}).update(fields)
    return from_dict(values)


APP_CLASSES = ["sky", "grass", "cow", "tree"]
APP_SEEN = ["sky", "grass", "cow"]


def tiny_bundle(base: Path) -> Path:
    """A bundle of an untrained student and a tiny random CLIP (8 x 8 teacher tokens); built once per session."""
    out = base / "app_bundle"
    if (out / "bundle.json").is_file():
        return out
    from clipteacher.export.bundle import export_bundle, write_untrained_checkpoint
    from clipteacher.config import Config

    cfg = Config()
    cfg.teacher.kind, cfg.teacher.clip_config, cfg.teacher.input_size = "clip", TINY_CLIP, 64
    cfg.student.pretrained, cfg.student.head_dim, cfg.data.eval_size = False, 32, 64
    teacher = write_untrained_checkpoint(cfg, APP_CLASSES, APP_SEEN, base / "app_ckpt.pt")
    export_bundle(base / "app_ckpt.pt", out, teacher=teacher, log=lambda *_: None)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_app(bundle: Path, port: int, log: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    """app/run.py (with extra command-line `args` and `env` variables) in a subprocess; returns once it answers HTTP."""
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
    proc = subprocess.Popen([sys.executable, str(ROOT / "app" / "run.py"), "--bundle", str(bundle), "--host",
                             "127.0.0.1", "--port", str(port), *args], cwd=ROOT, env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 90
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"app exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"app did not answer within 90 s: {log.read_text()[-2000:]}")


from clipteacher.train.datasets import write_synthetic_layout as make_official_layout  # noqa: E402,F401


def _smoke_helpers():
    """docker/smoke_helpers.py (a script, not a package module): docker/smoke.sh's checks of a running app."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("smoke_helpers", ROOT / "docker" / "smoke_helpers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


smoke_helpers = _smoke_helpers()
inline_bytes = smoke_helpers.inline_bytes  # a file the app sent inside its response (a base64 data URL) -> bytes

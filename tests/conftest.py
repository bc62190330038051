"""Shared fixtures: a tiny synthetic dataset in the msrc21 layout and a tiny, fast training config."""
from __future__ import annotations

import numpy as np
import pytest

from training.config import Config, from_dict
from training.datasets import write_folder_dataset

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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "tiny")


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

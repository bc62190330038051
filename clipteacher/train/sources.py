"""Training sources of a run: the primary dataset (`data`), more datasets and unlabelled image pools (`data.extra`).

Each labelled source keeps its own training vocabulary, so its seen-class loss only ever scores its
own classes: a pixel labelled "body" in MSRC-21 is never a negative for SIFT Flow's "person". The
student's classifier is the union of those vocabularies (text embeddings computed once); `Sources.mask`
says which union classes each source may score. An image pool has no classes at all: it feeds the
GLM and the PLM (every pixel is unlabelled to the PLM) and no NEL.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipteacher.io import DatasetError
from clipteacher.config import Config, SourceConfig
from clipteacher.train.datasets import DatasetInfo, SegmentationFolder, _existing_dir, build_dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
PROBE_SIZE = 200  # images of a named pool kept for the open-vocabulary probe (training.experiments.probe)


def name_hash(name: str) -> float:
    """A file name's place in [0, 1), from its SHA-1: a split by it does not depend on order or count."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:8], 16) / 2**32


def pool_names(root: str | Path) -> dict[str, str]:
    """file name -> class name of a pool that names its images (root/images.json, as imagenet_samples does);
    {} for a pool without names."""
    path = Path(root) / "images.json"
    try:
        images = json.loads(path.read_text())["images"]
        return {str(k): str(v["name"]) for k, v in images.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent, or not in that layout
        return {}


def probe_ids(names: list[str], size: int = PROBE_SIZE) -> list[str]:
    """The `size` file names with the lowest `name_hash`, sorted: the probe set of a named pool."""
    return sorted(sorted(names, key=name_hash)[:size])


class ImagePool(SegmentationFolder):
    """A folder of unlabelled images (root/images/ when it exists, else root), sorted by file name.

    Same reader interface as a dataset: `read_label` is all ignore (H x W uint8), the class list is empty.
    exclude_probe: leave out the probe's images (`probe_ids`) when the pool names its images (images.json),
    so that the open-vocabulary probe scores images no student trained on.
    """

    def __init__(self, root: str | Path, exclude_probe: bool = True):
        root = _existing_dir(Path(root), "image pool folder")
        image_dir = root / "images" if (root / "images").is_dir() else root
        ids = sorted(p.name for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        named = pool_names(root)
        if exclude_probe and named:
            probe = set(probe_ids(list(named)))
            ids = [i for i in ids if i not in probe]
        if not ids:
            raise DatasetError(f"image pool {image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        # ids are file names, so image_path needs no suffix; there is no label folder.
        self._open(root, "pool", DatasetInfo(root.name, [], []), image_dir, image_dir, "", "", ids)

    def read_label(self, i: int) -> np.ndarray:
        with Image.open(self.image_path(i)) as im:  # the stored grid, as read_image(upright=False) returns
            w, h = im.size
        return np.full((h, w), self.info.ignore_index, dtype=np.uint8)

    def validate(self, check_labels: bool | None = None, progress: bool = True) -> None:
        for i in range(len(self)):
            if not self.image_path(i).is_file():
                raise DatasetError(f"image {self.image_path(i)} of pool {self.root} does not exist")


def open_source(src: SourceConfig) -> tuple[SegmentationFolder, SegmentationFolder | None]:
    """(training reader, val reader or None) of one `data.extra` entry."""
    if src.kind == "images":
        return ImagePool(src.root, src.exclude_probe), None
    return build_dataset(src.kind, src.root, src.split), (build_dataset(src.kind, src.root, src.val_split)
                                                          if src.val_split else None)


def heldout_split(ids: list[str], fraction: float) -> tuple[list[int], list[int]]:
    """(trained indices, held-aside indices): an id is held aside when the hash of its name falls below
    `fraction`, so the slice does not depend on the order or length of the split file."""
    if fraction <= 0:
        return list(range(len(ids))), []
    u = [name_hash(s) for s in ids]
    return [i for i, x in enumerate(u) if x >= fraction], [i for i, x in enumerate(u) if x < fraction]


def vocabularies(infos: list[DatasetInfo], zero_shot: bool, holdout: list[str]) -> tuple[list[list[str]], list[str]]:
    """(own training classes per source, their ordered union).

    Zero-shot: the unseen classes of every source are hidden in every source (otherwise one dataset's
    labels would teach another's unseen class); `holdout` names are hidden everywhere too.
    """
    hidden = set(holdout) | ({c for info in infos for c in info.unseen} if zero_shot else set())
    own = [[c for c in info.classes if c not in hidden] for info in infos]
    union = list(dict.fromkeys(c for o in own for c in o))
    return own, union


@dataclass
class Sources:
    """The primary dataset first, then `data.extra`, with what each trains on."""

    folders: list[SegmentationFolder]  # training readers
    vals: list[SegmentationFolder | None]  # val readers (None: not scored, e.g. pools)
    weights: list[float]  # sampling weights
    own: list[list[str]]  # each source's training classes
    vocabulary: list[str]  # union of `own`: the classes the student is trained on, in logit order
    indices: list[list[int]]  # reader indices trained on (the primary's held-aside slice removed)
    heldout: list[int]  # primary reader indices held aside (never trained on)

    def mask(self) -> torch.Tensor:
        """S x V bool: union class v is in source s's own vocabulary."""
        return torch.tensor([[c in set(o) for c in self.vocabulary] for o in self.own], dtype=torch.bool)

    def class_names(self) -> list[str]:
        """Every class name of every labelled source (train and val), each once: the text cache."""
        names = [c for f in self.folders + [v for v in self.vals if v is not None] for c in f.info.classes]
        return list(dict.fromkeys(names))


def open_sources(cfg: Config, train_set: SegmentationFolder, val_set: SegmentationFolder,
                 verbose: bool = False) -> Sources:
    """Read and validate `data.extra`, and work out every source's vocabulary and trained indices.

    train_set's info may already list `data.holdout` as unseen (`engine.check_inputs`)."""
    folders, vals = [train_set], [val_set]
    for src in cfg.data.extra:
        tr, va = open_source(src)
        for f in (tr, va):
            if f is not None:
                f.validate(progress=verbose)
        folders.append(tr)
        vals.append(va)
    own, union = vocabularies([f.info for f in folders], cfg.data.zero_shot, list(cfg.data.holdout))
    trained, held = heldout_split(train_set.ids, cfg.data.heldout_fraction)
    if not trained:
        raise DatasetError(f"data.heldout_fraction={cfg.data.heldout_fraction} leaves no training images")
    indices = [trained] + [list(range(len(f))) for f in folders[1:]]
    return Sources(folders, vals, [cfg.data.weight] + [s.weight for s in cfg.data.extra], own, union, indices, held)

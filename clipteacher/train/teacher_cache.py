"""Teacher outputs computed once per whole training image and reused (`teacher.mode=cached`).

CLS and dense tokens are stored as memory-mapped float16 arrays with a meta.json naming the
teacher, input size and data that made them; a training crop resamples its dense tokens from
the whole-image grid (`clipteacher.train.data.crop_features`). What this gives up, measured:
docs/DESIGN.md (teacher cache).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from clipteacher.predictor import to_tensor
from clipteacher.train.data import crop_features
from clipteacher.train.datasets import SegmentationFolder


def data_signature(folder: SegmentationFolder) -> str:
    """Hash of the image ids and the images' bytes: changes when the data changes.

    Contents rather than modification times, so data copied or re-provisioned elsewhere keeps its
    cache; reading every image once per start costs far less than rebuilding the cache."""
    h = hashlib.sha1()
    for i in range(len(folder)):
        h.update(f"{folder.ids[i]};".encode())
        with open(folder.image_path(i), "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


class TeacherCache:
    """cls: N x D and dense: N x D x h x w float16 arrays in `root`, with a meta.json that names what made them."""

    def __init__(self, root: str | Path, teacher, folder: SegmentationFolder, batch_size: int = 8, verbose: bool = True):
        # A symlinked cache is shared on purpose: a rebuild replaces the folder it points to.
        self.root = Path(root).resolve() if Path(root).is_symlink() else Path(root)
        self.meta = {"teacher": teacher.fingerprint(), "input_size": teacher.input_size,
                     "data": data_signature(folder), "count": len(folder)}
        if not self._fresh():
            if (self.root / "meta.json").exists() and verbose:
                print(f"teacher cache {self.root} is stale (teacher, input size or data changed); rebuilding")
            self._build(teacher, folder, batch_size, verbose)
        self.cls = torch.from_numpy(np.load(self.root / "cls.npy", mmap_mode="r").astype(np.float32))
        self.dense = np.load(self.root / "dense.npy", mmap_mode="r")

    def _fresh(self) -> bool:
        try:
            return json.loads((self.root / "meta.json").read_text()) == self.meta
        except (OSError, ValueError):
            return False

    @torch.no_grad()
    def _build(self, teacher, folder: SegmentationFolder, batch_size: int, verbose: bool) -> None:
        tmp = self.root.with_name(self.root.name + ".building")
        # A build cut short (crash, preemption, a session ending) resumes where it stopped: building the
        # cache of a few thousand images takes hours on a CPU. progress.json is written only after the
        # arrays are flushed, so every image it counts is on disk.
        done, cls_arr, dense_arr = self._resume(tmp)
        if cls_arr is None:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        elif verbose:
            print(f"teacher cache {self.root}: resuming an interrupted build at image {done} of {len(folder)}")
        size = teacher.input_size
        device = teacher.pixel_mean.device
        bar = tqdm(range(done, len(folder), batch_size), desc="teacher cache", disable=not verbose)
        for start in bar:
            idx = list(range(start, min(start + batch_size, len(folder))))
            images = torch.stack([
                torch.nn.functional.interpolate(to_tensor(folder.read_image(i))[None], size=(size, size),
                                                mode="bilinear", align_corners=False)[0] for i in idx])
            out = teacher(images.to(device))  # N x 3 x S x S on the teacher's device; float32 (the cache is built once)
            if cls_arr is None:
                d, h, w = out.dense.shape[1:]
                cls_arr = np.lib.format.open_memmap(tmp / "cls.npy", "w+", np.float16, (len(folder), d))
                dense_arr = np.lib.format.open_memmap(tmp / "dense.npy", "w+", np.float16, (len(folder), d, h, w))
            cls_arr[idx] = out.cls.cpu().numpy().astype(np.float16)
            dense_arr[idx] = out.dense.cpu().numpy().astype(np.float16)
            cls_arr.flush()
            dense_arr.flush()
            (tmp / "progress.json").write_text(json.dumps({"meta": self.meta, "done": idx[-1] + 1}))
        del cls_arr, dense_arr
        (tmp / "progress.json").unlink()
        (tmp / "meta.json").write_text(json.dumps(self.meta))
        # Swap in whole: a crash mid-build leaves only the '.building' folder, never a half cache.
        shutil.rmtree(self.root, ignore_errors=True)
        os.replace(tmp, self.root)

    def _resume(self, tmp: Path) -> tuple[int, np.ndarray | None, np.ndarray | None]:
        """(images done, cls, dense) of an interrupted build of this same cache in `tmp`, else (0, None, None)."""
        try:
            progress = json.loads((tmp / "progress.json").read_text())
            if progress["meta"] != self.meta:
                return 0, None, None
            done = int(progress["done"])
            cls_arr = np.load(tmp / "cls.npy", mmap_mode="r+")
            dense_arr = np.load(tmp / "dense.npy", mmap_mode="r+")
        except (OSError, ValueError, KeyError, TypeError):  # unreadable leftovers: start over
            return 0, None, None
        if len(cls_arr) != self.meta["count"] or len(dense_arr) != self.meta["count"] or not 0 < done <= len(cls_arr):
            return 0, None, None
        return done, cls_arr, dense_arr

    def lookup(self, indices: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher tokens for a batch of crops (indices B, boxes B x 4, flips B, on the CPU):
        (cls B x D, dense B x D x h x w) float32 on the CPU, dense cropped by box; `TeacherSource` moves them."""
        idx = indices.cpu().numpy()
        dense = torch.from_numpy(np.stack([self.dense[i] for i in idx]).astype(np.float32))
        dense = crop_features(dense, boxes.cpu(), flips.cpu(), tuple(dense.shape[-2:]))
        dense = torch.nn.functional.normalize(dense, dim=1)  # zero outside the image stays zero
        return self.cls[idx], dense


class CacheSet:
    """One `TeacherCache` per training source; `lookup` takes each crop's source number too."""

    def __init__(self, caches: list[TeacherCache]):
        self.caches = caches

    def lookup(self, indices: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor,
               sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """As `TeacherCache.lookup`, with sources B (any device): (cls B x D, dense B x D x h x w) in batch order."""
        if len(self.caches) == 1:
            return self.caches[0].lookup(indices, boxes, flips)
        sources = sources.cpu()
        cls = dense = None
        for s in sources.unique().tolist():
            rows = (sources == s).nonzero().flatten()
            c, d = self.caches[s].lookup(indices.cpu()[rows], boxes.cpu()[rows], flips.cpu()[rows])
            if cls is None:
                cls = c.new_zeros(len(sources), *c.shape[1:])
                dense = d.new_zeros(len(sources), *d.shape[1:])
            cls[rows], dense[rows] = c, d
        return cls, dense

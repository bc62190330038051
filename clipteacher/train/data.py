"""Torch datasets over the raw readers in `clipteacher.train.datasets`, with aligned augmentation.

Every random choice for (epoch, sample) comes from its own seeded generator, so a resumed run
sees exactly the batches an uninterrupted run would have seen, whatever the worker count.
The crop is described by a box in normalised image coordinates plus a flip flag; the same box
crops cached teacher features (`crop_features`), so image, label, pseudo label and teacher
tokens stay aligned.
"""
from __future__ import annotations

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from clipteacher.config import DataConfig
from clipteacher.io import resize_short
from clipteacher.predictor import to_tensor
from clipteacher.train.datasets import DatasetInfo, SegmentationFolder


# Crop bookkeeping of a training batch: read on the host only (teacher cache lookup), never by a model.
HOST_KEYS = ("box", "flip", "index")


def to_device(batch: dict, device: torch.device, non_blocking: bool = False) -> dict:
    """The one place a batch moves: every tensor except HOST_KEYS on `device`, the rest as it is.

    non_blocking overlaps the copy with compute when the DataLoader pins memory (CUDA)."""
    return {k: v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) and k not in HOST_KEYS else v
            for k, v in batch.items()}


class TrainDataset(Dataset):
    """Random scale, crop, flip and photometric jitter.

    Labels are re-indexed into `vocabulary` (the training classes, in the order of the text
    embeddings the losses use); classes outside it (unseen, held out) become ignore.

    Items are dicts: image 3 x S x S float, label S x S long (vocabulary index / ignore), valid S x S bool
    (False on padding), box 4 (x0, y0, x1, y1 in [0, 1] image coords, may exceed), flip bool,
    index int, source int. Indexed by (sample, epoch) pairs from `EpochSampler`.

    Several sources (`clipteacher.train.sources`): `vocabulary` is this source's own training classes,
    `union` the run's whole training vocabulary that labels index into, `source` this source's number.
    """

    def __init__(self, folder: SegmentationFolder, cfg: DataConfig, seed: int, vocabulary: list[str],
                 source: int = 0, union: list[str] | None = None):
        self.folder, self.cfg, self.seed, self.source = folder, cfg, seed, source
        self.lut = vocabulary_lut(folder.info, vocabulary, union)

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, epoch = key
        # Source 0 keeps the single-dataset stream; other sources get their own.
        rng = np.random.default_rng([self.seed, epoch, index] + ([self.source] if self.source else []))
        image = self.folder.read_image(index)
        label = self.folder.read_label(index)
        label = self.lut[label]
        h, w = label.shape
        c = self.cfg.crop_size
        scale = self.cfg.base_size / min(h, w) * rng.uniform(*self.cfg.scale_range)
        sh, sw = h * scale, w * scale
        oy = rng.uniform(0, max(0.0, sh - c))
        ox = rng.uniform(0, max(0.0, sw - c))
        flip = bool(self.cfg.flip and rng.random() < 0.5)
        # dst = scale * src - offset (then mirrored): one affine map for image, label and valid mask
        m = np.array([[scale, 0, -ox], [0, scale, -oy]], dtype=np.float64)
        if flip:
            m = np.array([[-1, 0, c - 1], [0, 1, 0]], dtype=np.float64) @ np.vstack([m, [0, 0, 1]])
        img = cv2.warpAffine(image, m, (c, c), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        lab = cv2.warpAffine(label, m, (c, c), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=255)
        valid = cv2.warpAffine(np.ones_like(label), m, (c, c), flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        if self.cfg.photometric:
            img = photometric(img, rng)
        x0, y0 = ox / scale / w, oy / scale / h
        box = [x0, y0, x0 + c / scale / w, y0 + c / scale / h]
        lab = lab.astype(np.int64)
        lab[valid == 0] = self.folder.info.ignore_index
        return {
            "image": to_tensor(img),
            "label": torch.from_numpy(lab),
            "valid": torch.from_numpy(valid.astype(bool)),
            "box": torch.tensor(box, dtype=torch.float32),
            "flip": torch.tensor(flip),
            "index": torch.tensor(index),
            "source": torch.tensor(self.source),
        }


class MixedDataset(Dataset):
    """Several `TrainDataset`s behind one index: keys (source, sample, epoch) from `MixtureSampler`."""

    def __init__(self, parts: list[TrainDataset]):
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __getitem__(self, key: tuple[int, int, int]) -> dict:
        source, index, epoch = key
        return self.parts[source][(index, epoch)]


def vocabulary_lut(info: DatasetInfo, vocabulary: list[str], target: list[str] | None = None) -> np.ndarray:
    """uint8[256]: dataset class id -> index in `target` (default `vocabulary`) for the classes in
    `vocabulary`, ignore for every other value."""
    missing = [c for c in vocabulary if c not in info.classes]
    if missing:
        raise ValueError(f"training vocabulary names {missing}, not classes of {info.name}")
    target = vocabulary if target is None else target
    lut = np.full(256, info.ignore_index, dtype=np.uint8)
    for c in vocabulary:
        lut[info.classes.index(c)] = target.index(c)
    return lut


def photometric(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation jitter (each applied with probability 0.5)."""
    x = img.astype(np.float32)
    if rng.random() < 0.5:
        x = x + rng.uniform(-32, 32)
    if rng.random() < 0.5:
        x = (x - x.mean()) * rng.uniform(0.5, 1.5) + x.mean()
    if rng.random() < 0.5:
        gray = x.mean(axis=2, keepdims=True)
        x = (x - gray) * rng.uniform(0.5, 1.5) + gray
    return np.clip(x, 0, 255).astype(np.uint8)


class EvalDataset(Dataset):
    """Whole images resized to a short side of `size`; labels stay at full resolution.

    Items: image 3 x h x w float, label H x W long (dataset class ids, nothing made ignore), index.
    """

    def __init__(self, folder: SegmentationFolder, size: int):
        self.folder, self.size = folder, size

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, index: int) -> dict:
        image = self.folder.read_image(index)
        label = self.folder.read_label(index)
        return {
            "image": to_tensor(resize_short(image, self.size)),
            "label": torch.from_numpy(label.astype(np.int64)),
            "index": index,
        }


class EpochSampler(Sampler):
    """Yields (index, epoch) pairs batch by batch, one seeded permutation per epoch, sharded by rank.

    `start` skips that many batches of the first epoch, which is how `--resume` lands on the
    exact batch an uninterrupted run would have drawn next. `indices` (n of them) are the sample
    numbers drawn from (default 0..n-1), e.g. a split without its held-aside slice.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1, start: int = 0,
                 indices: list[int] | None = None):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.indices = np.arange(n) if indices is None else np.asarray(indices)
        if len(self.indices) != n:
            raise ValueError(f"EpochSampler: {len(self.indices)} indices for n={n}")
        self.per_epoch = (n // world) // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"dataset of {n} images is smaller than one batch ({batch_size} x {world} processes)")
        self.start = start

    def __iter__(self):
        step = self.start
        while True:
            epoch, pos = divmod(step, self.per_epoch)
            perm = self.indices[np.random.default_rng([self.seed, epoch]).permutation(self.n)][self.rank :: self.world]
            batch = perm[pos * self.batch_size : (pos + 1) * self.batch_size]
            yield [(int(i), epoch) for i in batch]
            step += 1


class MixtureSampler(Sampler):
    """Batches that mix several sources by weight: yields lists of (source, sample, epoch) keys.

    Each batch slot picks its source with probabilities `weights` from a generator seeded by
    (seed, step); within a source, samples come in a seeded permutation per epoch of that source,
    so every sample of a source is drawn once before any repeats. `start` replays the source choices
    of the earlier steps (cheap: no permutations), so a resumed run draws exactly the batches an
    uninterrupted run would have. The global batch is batch_size x world; rank r takes slots r::world.
    """

    def __init__(self, pools: list[list[int]], weights: list[float], batch_size: int, seed: int, rank: int = 0,
                 world: int = 1, start: int = 0):
        w = np.asarray(weights, dtype=np.float64)
        w = np.where([len(p) > 0 for p in pools], w, 0.0)
        if w.sum() <= 0:
            raise ValueError("MixtureSampler: every source is empty or has weight 0")
        self.pools, self.p = [np.asarray(p) for p in pools], w / w.sum()
        self.batch_size, self.seed, self.rank, self.world, self.start = batch_size, seed, rank, world, start
        self.per_epoch = max(1, sum(len(p) for p in pools) // (batch_size * world))  # the engine's epoch marks

    def _choose(self, step: int) -> np.ndarray:
        return np.random.default_rng([self.seed, step]).choice(len(self.pools), size=self.batch_size * self.world, p=self.p)

    def __iter__(self):
        counts = np.zeros(len(self.pools), dtype=np.int64)
        for step in range(self.start):
            counts += np.bincount(self._choose(step), minlength=len(self.pools))
        perms: dict[tuple[int, int], np.ndarray] = {}
        step = self.start
        while True:
            keys = []
            for k in self._choose(step):
                epoch, pos = divmod(int(counts[k]), len(self.pools[k]))
                if (k, epoch) not in perms:
                    perms = {key: v for key, v in perms.items() if key[0] != k}  # keep one epoch per source
                    perms[(k, epoch)] = self.pools[k][np.random.default_rng([self.seed, 7919 + k, epoch]).permutation(len(self.pools[k]))]
                keys.append((int(k), int(perms[(k, epoch)][pos]), epoch))
                counts[k] += 1
            yield keys[self.rank :: self.world]
            step += 1


def crop_features(features: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop and resample whole-image feature maps to the training crops.

    features: B x D x h x w (whole image), boxes: B x 4 normalised (x0, y0, x1, y1), flips: B bool,
    size: output (h', w'). Outside the image the result is zero. Returns B x D x h' x w'.
    """
    b = features.shape[0]
    ys = torch.linspace(0, 1, size[0] * 2 + 1, device=features.device)[1::2]  # cell centres
    xs = torch.linspace(0, 1, size[1] * 2 + 1, device=features.device)[1::2]
    xs = xs.view(1, -1).expand(b, -1)
    xs = torch.where(flips.view(-1, 1), 1 - xs, xs)
    gx = boxes[:, 0:1] + xs * (boxes[:, 2:3] - boxes[:, 0:1])
    gy = boxes[:, 1:2] + ys.view(1, -1) * (boxes[:, 3:4] - boxes[:, 1:2])
    grid = torch.stack(torch.broadcast_tensors(gx[:, None, :], gy[:, :, None]), dim=-1) * 2 - 1
    return F.grid_sample(features.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)

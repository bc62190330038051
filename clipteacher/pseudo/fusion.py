"""Mask fusion: the K-Means clusters of every scale become one set of pseudo regions
(docs/METHOD.md, Pixel Learning Module; the choice of criterion is argued in docs/DESIGN.md).

Candidates are the clusters of all scales, largest first. The largest remaining candidate
starts a region and absorbs, one at a time, the largest candidate that is redundant with it
(centroid cosine, or overlap over the smaller area, above the threshold), its centroid
recomputed after every merge. Regions built from different scales may share tokens; each
shared token goes to the region whose centroid it is closest to.
"""
from __future__ import annotations

import numpy as np

from clipteacher.pseudo.kmeans import (multiscale_kmeans, normalise, resize_nearest, segment_sum, single_blas_thread,
                                       token_ignore_mask)

CRITERIA = ("centroid", "overlap")


def _atoms(xn: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Group tokens that carry the same label at every scale.

    xn: N x D unit tokens, labels: S x N cluster ids per scale (-1 = none). Every candidate and
    every union of candidates is a set of atoms, so centroids and overlaps cost O(atoms).
    Returns (atom_of N, atom_sum A x D, atom_size A, atom_labels S x A).
    """
    _, atom_of = np.unique(labels, axis=1, return_inverse=True)
    atom_of = atom_of.reshape(-1)
    n_atoms = int(atom_of.max()) + 1
    atom_sum, atom_size = segment_sum(atom_of, n_atoms, xn)
    atom_labels = np.zeros((len(labels), n_atoms), dtype=np.int64)
    atom_labels[:, atom_of] = labels
    return atom_of, atom_sum, atom_size.astype(np.float32), atom_labels


def _candidates(atom_labels: np.ndarray, atom_size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every cluster of every scale as a K x A bool atom set, largest first. Returns (sets, areas K)."""
    cand = np.concatenate([row[None, :] == np.unique(row[row >= 0])[:, None] for row in atom_labels])
    cand = cand[np.any(cand, axis=1)]
    area = cand @ atom_size
    order = np.argsort(-area, kind="stable")
    return cand[order], area[order]


def _merge(cand: np.ndarray, area: np.ndarray, atom_sum: np.ndarray, atom_size: np.ndarray, threshold: float,
           criterion: str) -> np.ndarray:
    """NMS-like merging of candidates (K x A, largest first) -> regions R x A bool."""
    cent = normalise(cand.astype(np.float32) @ atom_sum)
    alive = np.ones(len(cand), dtype=bool)
    regions = []
    for i in range(len(cand)):
        if not alive[i]:
            continue
        alive[i] = False
        r_atoms = cand[i].copy()
        while alive.any():
            rest = np.flatnonzero(alive)
            if criterion == "centroid":
                score = cent[rest] @ normalise(r_atoms @ atom_sum)
            else:
                inter = (cand[rest] & r_atoms) @ atom_size
                score = inter / np.maximum(np.minimum(area[rest], r_atoms @ atom_size), 1)
            hit = rest[score > threshold]
            if not len(hit):
                break
            alive[hit[0]] = False  # largest redundant candidate first, then re-score with the new centroid
            r_atoms |= cand[hit[0]]
        regions.append(r_atoms)
    return np.stack(regions)


def _assign(regions: np.ndarray, xn: np.ndarray, atom_of: np.ndarray, atom_sum: np.ndarray,
            min_tokens: int) -> np.ndarray:
    """Give every token to the most similar region covering it; drop regions under `min_tokens`.

    regions: R x A bool, xn: N x D. Returns N region ids, renumbered by size (largest 0), -1 = none.
    """
    sim = xn @ normalise(regions.astype(np.float32) @ atom_sum).T  # N x R
    holds = regions[:, atom_of].T  # N x R: region covers token
    keep = np.ones(len(regions), dtype=bool)
    while True:  # a dropped region hands its tokens to any other region covering them
        score = np.where(holds & keep[None, :], sim, -np.inf)
        owned = np.isfinite(score).any(1)
        owner = np.where(owned, np.argmax(score, axis=1), -1)
        size = np.bincount(owner[owned], minlength=len(regions))
        small = keep & (size < max(1, int(min_tokens)))
        if not small.any():
            break
        keep &= ~small
    ranked = np.flatnonzero(keep)[np.argsort(-size[keep], kind="stable")]
    remap = np.full(len(regions) + 1, -1, dtype=np.int64)
    remap[ranked] = np.arange(len(ranked))
    return remap[owner]  # owner -1 hits the last slot, which stays -1


@single_blas_thread
def fuse_regions(tokens: np.ndarray, scale_maps: list[np.ndarray], threshold: float = 0.8,
                 criterion: str = "centroid", min_tokens: int = 1) -> np.ndarray:
    """Fuse the clusters of all scales into regions.

    tokens: h x w x D; scale_maps: list of h x w int (-1 = none). Returns h x w int64 with
    region ids 0..R-1 ordered by area (largest first), -1 = no region.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"fuse_regions: unknown criterion '{criterion}' (plm.fusion must be centroid | overlap)")
    tokens = np.asarray(tokens)
    if tokens.ndim != 3:
        raise ValueError(f"fuse_regions: tokens must be h x w x D, got shape {tokens.shape}")
    h, w, d = tokens.shape
    out = np.full((h, w), -1, dtype=np.int64)
    maps = [np.asarray(m, dtype=np.int64).reshape(-1) for m in scale_maps]
    for m in maps:
        if m.size != h * w:
            raise ValueError(f"fuse_regions: scale map has {m.size} cells, tokens grid is {h}x{w}")
    covered = np.zeros(h * w, dtype=bool)
    for m in maps:
        covered |= m >= 0
    if not covered.any():
        return out
    xn = normalise(tokens).reshape(-1, d)[covered]
    atom_of, atom_sum, atom_size, atom_labels = _atoms(xn, np.stack([m[covered] for m in maps]))
    cand, area = _candidates(atom_labels, atom_size)
    regions = _merge(cand, area, atom_sum, atom_size, threshold, criterion)
    out.reshape(-1)[covered] = _assign(regions, xn, atom_of, atom_sum, min_tokens)
    return out


def pseudo_label_map(label: np.ndarray, fused: np.ndarray, num_seen: int, ignore_index: int = 255,
                     valid: np.ndarray | None = None) -> np.ndarray:
    """H x W label + h x w fused regions -> H x W int64 label with pseudo classes.

    Region r is written as num_seen + r at pixels that are `ignore_index` in `label` (and
    `valid`, if given: padding stays ignore). Seen pixels are never overwritten; ignored
    pixels without a region stay `ignore_index`.
    """
    label = np.asarray(label)
    fused = np.asarray(fused)
    if label.ndim != 2 or fused.ndim != 2:
        raise ValueError(f"pseudo_label_map: need H x W label and h x w fused, got {label.shape} and {fused.shape}")
    up = resize_nearest(fused, label.shape)
    write = (label == ignore_index) & (up >= 0)
    if valid is not None:
        write &= np.asarray(valid, dtype=bool)
    out = label.astype(np.int64)
    out[write] = int(num_seen) + up[write]
    return out


@single_blas_thread
def pseudo_regions(tokens: np.ndarray, mask: np.ndarray, windows=(3, 7), init: str = "grid", iters: int = 10,
                   threshold: float = 0.8, criterion: str = "centroid",
                   min_tokens: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    """multiscale_kmeans + fuse_regions -> (per-window h x w maps, fused h x w map)."""
    maps = multiscale_kmeans(tokens, mask, windows, init, iters)
    return maps, fuse_regions(tokens, maps, threshold, criterion, min_tokens)


def regions_for_image(tokens: np.ndarray, label: np.ndarray | None = None, *, windows=(3, 7), init: str = "grid",
                      iters: int = 10, threshold: float = 0.8, criterion: str = "centroid", min_tokens: int = 1,
                      ignore_fraction: float = 0.5, ignore_index: int = 255) -> tuple[list[np.ndarray], np.ndarray]:
    """tokens: h x w x D teacher tokens of a whole image; label: H x W or None.

    With a label, only tokens in its ignored area are clustered (as in training); without one,
    every token. Returns (per-window h x w cluster maps, fused h x w regions), -1 = not clustered.
    """
    if label is None:
        mask = np.ones(np.asarray(tokens).shape[:2], dtype=bool)
    else:
        mask = token_ignore_mask(label, np.asarray(tokens).shape[:2], ignore_index, ignore_fraction)
    return pseudo_regions(tokens, mask, windows, init, iters, threshold, criterion, min_tokens)

"""Pseudo regions for the Pixel Learning Module: multi-scale K-Means and mask fusion (SPEC A.4).

Numpy and scipy.sparse only (plus threadpoolctl, which comes with scikit-learn). The app
imports this file to show pseudo labels and has no torch, so nothing here (or below it)
may import torch.

Pipeline for one image, on the teacher's h x w x D token grid:
  1. `token_ignore_mask`: which tokens lie in the ignored (unlabelled / unseen) area.
  2. `multiscale_kmeans`: for each window size k, spherical K-Means over the ignored tokens
     only, seeded with k*k grid-window means (SPEC Eq. 4-5). Each scale is a disjoint
     partition of the ignored tokens.
  3. `fuse_regions`: NMS-like fusion of all candidate masks into potential regions.
  4. `pseudo_label_map`: region r becomes class id num_seen + r on ignored pixels.

Fusion decision. The paper's Algorithm 1 is lost; it only says fusion is "inspired by NMS",
uses a 0.8 threshold, and exists because K-Means with 9 + 49 centres cuts one object into
too many small pieces. We compare the cosine similarity of the candidates' L2-normalised
centroids (mean of the normalised tokens of each mask), not their overlap: inside one
K-Means run the masks are disjoint, so IoU (or any overlap) between two fragments of the
same object is exactly 0 and an overlap test could never repair the over-fragmentation it
is meant to repair. Overlap can only ever fire across scales, where it merely says "the
7x7 piece lies inside the 3x3 piece". The centroid is also the only semantic signal we
have, and 0.8 is a natural cosine cut. So: `criterion="centroid"` is the default and
"overlap" (intersection over the smaller area, the IoU-NMS reading) is kept as a config
option (`plm.fusion`) to ablate against it.

The procedure, per SPEC A.4: pool the masks of all scales, sort by area (descending), pop
the largest, then repeatedly union into it the largest remaining mask that is redundant
with it, recomputing its centroid after every merge (a merge can bring further candidates
over the threshold), until none is; repeat with the next largest. Fused regions built
from different scales can still overlap; each contested token goes to the region whose
centroid it is most similar to.

Tokens are always L2-normalised with an eps, so zero vectors stay zero (cosine 0 with
everything) instead of becoming NaN.
"""
from __future__ import annotations

import contextlib
import functools

import numpy as np
from scipy import sparse

try:
    from threadpoolctl import ThreadpoolController  # ships with scikit-learn
except ImportError:  # without it BLAS keeps its default thread count
    ThreadpoolController = None

_EPS = 1e-8
_BLAS = None


def _single_blas_thread(fn):
    """Run `fn` with numpy's BLAS on one thread.

    The products here are small (1024 x 512 by 49). On a busy 2-core machine a multi-threaded
    OpenBLAS keeps waiting for a descheduled worker thread: measured ~50x slower (550 ms
    instead of 10 ms per image), while one thread costs ~1.3x when the machine is idle.
    The limit is process-wide; two threads calling at once may leave BLAS at one thread.
    """
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _BLAS
        if ThreadpoolController is None:
            limit = contextlib.nullcontext()
        else:
            if _BLAS is None:
                _BLAS = ThreadpoolController()
            limit = _BLAS.limit(limits=1, user_api="blas")
        with limit:
            return fn(*args, **kwargs)
    return wrapper


def _normalise(x: np.ndarray) -> np.ndarray:
    """... x D -> float32 rows of unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def _segment_sum(ids: np.ndarray, n: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum the rows of x (N x D) per id (N ints in 0..n-1, -1 = skip) -> (n x D sums, n counts).

    A sparse one-hot product: O(N * D) work, where a dense one-hot matmul is O(n * N * D).
    """
    keep = ids >= 0
    onehot = sparse.csr_matrix((np.ones(int(keep.sum()), dtype=np.float32), (ids[keep], np.flatnonzero(keep))),
                               shape=(n, len(ids)))
    return np.asarray(onehot @ x, dtype=np.float32), np.bincount(ids[keep], minlength=n)


def _cell_starts(n_pixels: int, n_cells: int) -> np.ndarray:
    """First pixel of each of `n_cells` cells covering `n_pixels` pixels (n_cells + 1 edges).

    Cell i covers pixels [floor(i * n_pixels / n_cells), floor((i+1) * n_pixels / n_cells)),
    the footprint of patch i when the image is resized to the teacher input.
    """
    return (np.arange(n_cells + 1) * n_pixels) // n_cells


def _cell_bounds(n_pixels: int, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """[lo, hi) pixel range per cell, at least one pixel wide so a grid finer than the label
    still gets a value everywhere."""
    edges = _cell_starts(n_pixels, n_cells)
    lo = np.minimum(edges[:-1], n_pixels - 1)
    hi = np.maximum(edges[1:], lo + 1)
    return lo, hi


def _pixel_to_cell(n_pixels: int, n_cells: int) -> np.ndarray:
    """Cell index of every pixel; the inverse of `_cell_starts` (nearest resampling)."""
    starts = _cell_starts(n_pixels, n_cells)[:-1]
    return np.searchsorted(starts, np.arange(n_pixels), side="right") - 1


def resize_nearest(ids: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """h x w map -> H x W map, each pixel taking the token cell it lies in.

    Same cell geometry as `token_ignore_mask`, so a pseudo label lands exactly on the pixels
    whose token was clustered (cv2's nearest resize rounds differently for non-divisible sizes).
    """
    ids = np.asarray(ids)
    if ids.ndim != 2:
        raise ValueError(f"resize_nearest: need an h x w map, got shape {ids.shape}")
    return ids[_pixel_to_cell(int(hw[0]), ids.shape[0])][:, _pixel_to_cell(int(hw[1]), ids.shape[1])]


def token_ignore_mask(label: np.ndarray, grid_hw: tuple[int, int], ignore_index: int = 255,
                      fraction: float = 0.5, valid: np.ndarray | None = None) -> np.ndarray:
    """H x W label -> h x w bool, True where >= `fraction` of a token's pixels are ignored.

    label: H x W int class ids, `ignore_index` = unlabelled. valid: optional H x W bool,
    False = padding; padding pixels never count as ignored but still count in the token's
    pixel total, so a token that is mostly padding is not clustered (its teacher feature
    describes the padding, not an object).
    """
    label = np.asarray(label)
    if label.ndim != 2:
        raise ValueError(f"token_ignore_mask: label must be H x W, got shape {label.shape}")
    h, w = int(grid_hw[0]), int(grid_hw[1])
    if h < 1 or w < 1:
        raise ValueError(f"token_ignore_mask: grid_hw must be positive, got {grid_hw}")
    H, W = label.shape
    ignored = label == ignore_index
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        if valid.shape != label.shape:
            raise ValueError(f"token_ignore_mask: valid has shape {valid.shape}, label {label.shape}")
        ignored &= valid
    if H == 0 or W == 0:
        return np.zeros((h, w), dtype=bool)
    # Summed-area table: every cell's ignored count in one vectorised lookup.
    sat = np.zeros((H + 1, W + 1), dtype=np.int64)
    sat[1:, 1:] = ignored.cumsum(0).cumsum(1)
    y0, y1 = _cell_bounds(H, h)
    x0, x1 = _cell_bounds(W, w)
    count = sat[y1][:, x1] - sat[y0][:, x1] - sat[y1][:, x0] + sat[y0][:, x0]
    area = (y1 - y0)[:, None] * (x1 - x0)[None, :]
    return count >= fraction * area


def _window_ids(h: int, w: int, k: int, init: str) -> tuple[np.ndarray, int]:
    """h x w grid -> (window id per token (-1 = in no window), number of windows)."""
    if init == "grid":
        # Eq. 4-5: k x k windows of stride floor(h/k); the remainder rows/cols seed nothing.
        sh, sw = max(1, h // k), max(1, w // k)
        nh, nw = k, k
    elif init == "stride":
        # Windows of side k with stride k; the last, partial window is kept so every token seeds.
        sh, sw = k, k
        nh, nw = -(-h // k), -(-w // k)
    else:
        raise ValueError(f"grid_centres: unknown init '{init}' (plm.init must be grid | stride)")
    rows = np.arange(h) // sh
    cols = np.arange(w) // sw
    ids = rows[:, None] * nw + cols[None, :]
    ids[(rows >= nh)[:, None] | (cols >= nw)[None, :]] = -1
    return ids, nh * nw


def grid_centres(tokens: np.ndarray, k: int, init: str = "grid", mask: np.ndarray | None = None) -> np.ndarray:
    """h x w x D tokens -> K x D initial centres, window means in row-major window order.

    "grid": up to k*k centres (SPEC Eq. 4-5). "stride": windows of side k, stride k.
    With `mask` (h x w bool) only masked tokens count; windows without one are dropped, as
    are windows that fall off a grid smaller than k, so K can be anything from 0 to k*k.
    """
    tokens = np.asarray(tokens, dtype=np.float32)
    if tokens.ndim != 3:
        raise ValueError(f"grid_centres: tokens must be h x w x D, got shape {tokens.shape}")
    if int(k) < 1:
        raise ValueError(f"grid_centres: window k must be >= 1, got {k}")
    h, w, d = tokens.shape
    ids, n = _window_ids(h, w, int(k), init)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (h, w):
            raise ValueError(f"grid_centres: mask has shape {mask.shape}, tokens grid is {(h, w)}")
        ids = np.where(mask, ids, -1)
    sums, counts = _segment_sum(ids.reshape(-1), n, tokens.reshape(-1, d))
    present = counts > 0
    return sums[present] / counts[present, None]


def spherical_kmeans(x: np.ndarray, centres: np.ndarray, iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Cosine K-Means. x: N x D, centres: K x D (both L2-normalised here).

    Returns (labels N in 0..K'-1, centres K' x D unit rows). Clusters that go empty are
    dropped and the rest renumbered in their original order. Stops once labels settle.
    """
    x = _normalise(x)
    c = _normalise(centres)
    if x.ndim != 2 or c.ndim != 2 or (len(c) and c.shape[1] != x.shape[1]):
        raise ValueError(f"spherical_kmeans: need x N x D and centres K x D, got {x.shape} and {c.shape}")
    n = len(x)
    if len(c) == 0:  # nothing to assign to
        return np.full(n, -1, dtype=np.int64), c
    if n == 0:  # every cluster is empty, so every cluster is dropped
        return np.zeros(0, dtype=np.int64), c[:0]
    labels = None
    for _ in range(max(1, int(iters))):
        new = np.argmax(x @ c.T, axis=1)
        used, new = np.unique(new, return_inverse=True)  # drop empty clusters, renumber
        if labels is not None and len(used) == len(c) and np.array_equal(new, labels):
            break
        labels = new
        c = _normalise(_segment_sum(labels, len(used), x)[0])
    return labels.astype(np.int64), c


@_single_blas_thread
def multiscale_kmeans(tokens: np.ndarray, mask: np.ndarray, windows=(3, 7), init: str = "grid",
                      iters: int = 10) -> list[np.ndarray]:
    """h x w x D tokens, h x w bool mask -> one h x w int map per window (cluster id, -1 = not clustered).

    Tokens are normalised before seeding, so a grid centre is the mean direction of its
    window and large-norm tokens do not dominate it.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 3:
        raise ValueError(f"multiscale_kmeans: tokens must be h x w x D, got shape {tokens.shape}")
    h, w, _ = tokens.shape
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (h, w):
        raise ValueError(f"multiscale_kmeans: mask has shape {mask.shape}, tokens grid is {(h, w)}")
    xn = _normalise(tokens)
    picked = xn[mask]
    maps = []
    for k in windows:
        out = np.full((h, w), -1, dtype=np.int64)
        if len(picked):
            labels, _ = spherical_kmeans(picked, grid_centres(xn, int(k), init, mask), iters)
            out[mask] = labels
        maps.append(out)
    return maps


@_single_blas_thread
def fuse_regions(tokens: np.ndarray, scale_maps: list[np.ndarray], threshold: float = 0.8,
                 criterion: str = "centroid", min_tokens: int = 1) -> np.ndarray:
    """Fuse the candidate masks of all scales into regions (see the module docstring).

    tokens: h x w x D; scale_maps: list of h x w int (-1 = none). Returns h x w int64 with
    region ids 0..R-1 ordered by area (largest first), -1 = no region.
    """
    if criterion not in ("centroid", "overlap"):
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
    xn = _normalise(tokens).reshape(-1, d)[covered]
    labels = np.stack([m[covered] for m in maps])  # S x N', N' = tokens in some mask

    # Atoms: tokens sharing one label per scale. Every candidate mask and every union of
    # candidates is a set of atoms, so merged centroids and overlaps cost O(atoms), not O(tokens).
    _, atom_of = np.unique(labels, axis=1, return_inverse=True)
    atom_of = atom_of.reshape(-1)
    n_atoms = int(atom_of.max()) + 1
    atom_sum, atom_size = _segment_sum(atom_of, n_atoms, xn)  # A x D, A
    atom_size = atom_size.astype(np.float32)
    atom_labels = np.zeros((len(maps), n_atoms), dtype=np.int64)
    atom_labels[:, atom_of] = labels

    # Candidates: K x A bool, sorted by area (descending).
    cand = np.concatenate([atom_labels[s][None, :] == np.unique(atom_labels[s][atom_labels[s] >= 0])[:, None]
                           for s in range(len(maps))])
    cand = cand[np.any(cand, axis=1)]
    area = cand @ atom_size
    order = np.argsort(-area, kind="stable")
    cand, area = cand[order], area[order]
    cent = _normalise(cand.astype(np.float32) @ atom_sum)

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
                score = cent[rest] @ _normalise(r_atoms @ atom_sum)
            else:
                inter = (cand[rest] & r_atoms) @ atom_size
                score = inter / np.maximum(np.minimum(area[rest], r_atoms @ atom_size), 1)
            hit = rest[score > threshold]
            if not len(hit):
                break
            alive[hit[0]] = False  # largest redundant candidate first, then re-score with the new centroid
            r_atoms |= cand[hit[0]]
        regions.append(r_atoms)

    regions = np.stack(regions)  # R x A
    sim = xn @ _normalise(regions.astype(np.float32) @ atom_sum).T  # N' x R
    holds = regions[:, atom_of].T  # N' x R: region covers token
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
    out.reshape(-1)[covered] = remap[owner]  # owner -1 hits the last slot, which stays -1
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


@_single_blas_thread
def pseudo_regions(tokens: np.ndarray, mask: np.ndarray, windows=(3, 7), init: str = "grid", iters: int = 10,
                   threshold: float = 0.8, criterion: str = "centroid",
                   min_tokens: int = 1) -> tuple[list[np.ndarray], np.ndarray]:
    """multiscale_kmeans + fuse_regions -> (per-window h x w maps, fused h x w map)."""
    maps = multiscale_kmeans(tokens, mask, windows, init, iters)
    return maps, fuse_regions(tokens, maps, threshold, criterion, min_tokens)

"""Multi-scale spherical K-Means over the teacher's dense tokens (docs/METHOD.md, Pixel Learning Module).

Numpy and scipy.sparse only: the app imports this to show pseudo labels and has no torch.
Tokens are L2-normalised with an eps, so zero vectors stay zero (cosine 0 with everything)
instead of becoming NaN. `fusion.py` turns the per-scale clusters into regions.
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


def single_blas_thread(fn):
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


def normalise(x: np.ndarray) -> np.ndarray:
    """... x D -> float32 rows of unit length (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), _EPS)


def segment_sum(ids: np.ndarray, n: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
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

    "grid": up to k*k centres (docs/METHOD.md#multi-scale-k-means). "stride": windows of side k, stride k.
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
    sums, counts = segment_sum(ids.reshape(-1), n, tokens.reshape(-1, d))
    present = counts > 0
    return sums[present] / counts[present, None]


def spherical_kmeans(x: np.ndarray, centres: np.ndarray, iters: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Cosine K-Means. x: N x D, centres: K x D (both L2-normalised here).

    Returns (labels N in 0..K'-1, centres K' x D unit rows). Clusters that go empty are
    dropped and the rest renumbered in their original order. Stops once labels settle.
    """
    x = normalise(x)
    c = normalise(centres)
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
        c = normalise(segment_sum(labels, len(used), x)[0])
    return labels.astype(np.int64), c


@single_blas_thread
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
    xn = normalise(tokens)
    picked = xn[mask]
    maps = []
    for k in windows:
        out = np.full((h, w), -1, dtype=np.int64)
        if len(picked):
            labels, _ = spherical_kmeans(picked, grid_centres(xn, int(k), init, mask), iters)
            out[mask] = labels
        maps.append(out)
    return maps

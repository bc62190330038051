"""Wall time of PLM pseudo-region mining (multi-scale K-Means + fusion) per image.

    python bench/kmeans_timing.py            # prints the median ms per image
    from kmeans_timing import time_kmeans_fusion
"""
from __future__ import annotations

import time

import numpy as np


from clipteacher.pseudo import pseudo_regions


def planted_tokens(h: int = 32, w: int = 32, d: int = 512, n_clusters: int = 6, noise: float = 0.6,
                   seed: int = 0) -> np.ndarray:
    """h x w x d unit tokens: `n_clusters` random directions laid out as vertical bands, plus noise.

    Noise 0.6 per token (norm ~0.6 * sqrt(d) against a unit direction scaled by sqrt(d))
    keeps the clusters separable but not trivially so, so K-Means does not converge at once.
    """
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((n_clusters, d))
    band = (np.arange(w) * n_clusters) // w
    x = dirs[np.broadcast_to(band, (h, w))] + noise * rng.standard_normal((h, w, d))
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def time_kmeans_fusion(h: int = 32, w: int = 32, d: int = 512, repeats: int = 50) -> float:
    """Median ms per image of `pseudo_regions` (windows 3 and 7, 10 iters, centroid fusion)
    on an h x w x d grid with all but the top two token rows marked as ignored."""
    tokens = planted_tokens(h, w, d)
    mask = np.ones((h, w), dtype=bool)
    mask[:2] = False
    pseudo_regions(tokens, mask)  # warm-up: BLAS threads, first-call allocations
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        pseudo_regions(tokens, mask, windows=(3, 7), iters=10)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1e3)


if __name__ == "__main__":
    ms = time_kmeans_fusion()
    print(f"PLM K-Means (3, 7) + fusion, 32 x 32 x 512 tokens: {ms:.2f} ms/image (median of 50)")

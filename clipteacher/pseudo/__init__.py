"""Pseudo regions for the Pixel Learning Module and their pictures (numpy only; the app uses them too).

    kmeans   token masks, grid-initialised spherical K-Means per window size
    fusion   clusters of all scales -> regions -> pseudo-label map
    vis      colour maps, overlays and the summary panel
"""
from clipteacher.pseudo.fusion import fuse_regions, pseudo_label_map, pseudo_regions, regions_for_image
from clipteacher.pseudo.kmeans import multiscale_kmeans, resize_nearest, token_ignore_mask

__all__ = ["fuse_regions", "multiscale_kmeans", "pseudo_label_map", "pseudo_regions", "regions_for_image",
           "resize_nearest", "token_ignore_mask"]

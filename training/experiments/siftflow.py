"""SIFT Flow zero-shot benchmark with the offline ConSE teacher (33 classes, 6 unseen), beside MSRC-21.

    python -m training.experiments.siftflow [--iters 200] [--rows full,no_glm,...] [--resume] [overrides ...]

The rows, the gamma calibration and the outputs are the shared runner's (`training/experiments/runner.py`).
"""
from __future__ import annotations

from training.experiments.runner import Benchmark, main

SIFTFLOW = Benchmark(
    name="siftflow",
    title="SIFT Flow zero-shot benchmark (offline ConSE teacher, CPU)",
    config="training/configs/siftflow.yaml",
    data="../shared/data/siftflow",
    holdout=["car", "person", "sidewalk", "rock"],  # pseudo-unseen: frequent seen things and stuff
    figure_ids=["coast_cdmc988", "highway_gre141", "insidecity_a111017", "coast_land277", "insidecity_art847"],  # val images with unseen classes
    heldout_fraction=0.1,  # about 190 of the 1900 train images
    default_rows=["teacher", "full", "no_glm", "no_plm", "supervised", "full_pool"],
    notes=["Data: `../shared/data/siftflow`, trained on `train` (1900 images, 256 x 256; 27 seen classes, the 6 "
           "unseen classes boat, bridge, bus, door, sand, window hidden as ignore), scored on `val` (250 images) "
           "over all 33 classes. Numbers are percentages; hIoU = 2 S U / (S + U). full_pool adds the 1000 unlabelled "
           "images of `../shared/data/imagenet_samples` (GLM + PLM only, a third of each batch)."],
)

if __name__ == "__main__":
    main(SIFTFLOW)

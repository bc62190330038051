"""MSRC-21 zero-shot ablation with the offline ConSE teacher, the paper's Table 3/4 at CPU scale.

    python -m training.experiments.msrc21 [--iters 200] [--rows full,no_glm,...] [--resume] [overrides ...]

The rows, the gamma calibration and the outputs are the shared runner's (`training/experiments/runner.py`).
"""
from __future__ import annotations

from training.experiments.runner import Benchmark, main

MSRC21 = Benchmark(
    name="msrc21",
    title="MSRC-21 zero-shot ablation (offline ConSE teacher, CPU)",
    config="training/configs/msrc21.yaml",
    data="../shared/data/msrc21",
    holdout=["sheep", "car", "bird", "dog"],  # pseudo-unseen objects, like the real unseen ones
    figure_ids=["15_17_s", "4_19_s", "8_25_s", "14_3_s", "13_17_s"],  # val images with unseen classes
    heldout_fraction=0.15,  # about 50 of the 355 train images
    default_rows=["full", "no_glm", "no_plm", "seen_only", "supervised", "teacher"],
    notes=["Data: `../shared/data/msrc21`, trained on `train` (355 images; 16 seen classes, the 5 unseen classes "
           "aeroplane, bicycle, book, cat, chair hidden as ignore), scored on `val` (59 images) over all 21 classes. "
           "Numbers are percentages; hIoU = 2 S U / (S + U)."],
)

if __name__ == "__main__":
    main(MSRC21)

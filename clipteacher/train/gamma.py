"""The unseen bias gamma, chosen without unseen labels (docs/DESIGN.md#unseen-bias-gamma).

A student trained on seen classes scores classes it never saw too low; gamma is added to the logits of
every class outside its training vocabulary. `gamma_confusions` scores a split once per image for a list
of gammas from one student pass; `choose_gamma` applies the one-standard-error rule to those counts
(the rule the zero-shot benchmarks use on a held-aside slice with pseudo-unseen classes); `sweep_gamma`
sums them into one summary per gamma (the oracle sweeps of docs/RESULTS.md).
"""
from __future__ import annotations

import numpy as np
import torch

from clipteacher.predictor import Segmenter
from clipteacher.train.engine import image_logits
from clipteacher.train.metrics import ConfusionMatrix, summarize

GAMMAS = [-4.0, -3.0, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0]  # either sign: the bias can go both ways


@torch.no_grad()
def gamma_confusions(seg: Segmenter, folder, classes: list[str], vocabulary: list[str], gammas: list[float]):
    """Yields, per image of `folder`, a G x C x C confusion count (one C x C per gamma) from one student pass.

    classes: the label space scored (others in the ground truth become ignore); gamma goes to
    every class outside `vocabulary`.
    """
    info = folder.info
    lut = np.full(256, 255, dtype=np.int64)
    for j, c in enumerate(classes):
        lut[info.classes.index(c)] = j
    text = seg.text_embeddings(classes)
    outside = torch.tensor([c not in vocabulary for c in classes], dtype=torch.float32).view(-1, 1, 1)
    for logits, label in image_logits(seg.student, folder, text, seg.cfg.student.logit_scale,
                                      torch.zeros(len(classes)), seg.cfg.data.eval_size, progress=False,
                                      unseen=outside.flatten() > 0):
        logits, label = logits[0], lut[label]
        counts = []
        for g in gammas:
            cm = ConfusionMatrix(len(classes))
            cm.update((logits + g * outside).argmax(0).numpy(), label)
            counts.append(cm.matrix)
        yield np.stack(counts)


def sweep_gamma(seg: Segmenter, folder, classes: list[str], vocabulary: list[str], gammas: list[float],
                unseen: list[str]) -> dict:
    """{gamma: summary} over the whole of `folder`; `unseen` are the classes averaged into mIoU(U)."""
    total = sum(gamma_confusions(seg, folder, classes, vocabulary, gammas))
    return {g: summarize(total[k], classes, unseen) for k, g in enumerate(gammas)}


def choose_gamma(per_image: np.ndarray, gammas: list[float], classes: list[str], unseen: list[str],
                 resamples: int = 200, seed: int = 0) -> tuple[float, dict]:
    """The one-standard-error rule: the gamma nearest 0 whose hIoU is within one bootstrap standard error
    of the best gamma's.

    per_image: N x G x C x C confusion counts (`gamma_confusions`). The standard error comes from
    `resamples` bootstrap resamples of the images. Why not the plain argmax: a held-aside slice of a few
    hundred images measures hIoU to a point or two, and its pseudo-unseen classes are not the real unseen
    ones; a gamma away from 0 claims the model is biased, so the slice must show that beyond its own noise
    (with a flat curve the argmax is noise: SIFT Flow, docs/RESULTS.md).
    Returns (gamma, {"best": argmax gamma, "se": standard error at it, str(gamma): {mIoU(S), mIoU(U), hIoU, se}}).
    """
    def hiou(cms: np.ndarray) -> np.ndarray:  # G x C x C -> G; an absent side counts as 0
        return np.nan_to_num(np.array([summarize(cm, classes, unseen)["hIoU"] for cm in cms]))

    whole = [summarize(cm, classes, unseen) for cm in per_image.sum(0)]
    h = np.nan_to_num(np.array([s["hIoU"] for s in whole]))
    rng = np.random.default_rng(seed)
    n = len(per_image)
    boot = np.stack([hiou(per_image[rng.integers(0, n, n)].sum(0)) for _ in range(resamples)])
    se = boot.std(0)
    best = int(h.argmax())
    within = [k for k in range(len(gammas)) if h[k] >= h[best] - se[best]]
    pick = min(within, key=lambda k: (abs(gammas[k]), -h[k]))
    info = {"best": gammas[best], "se": float(se[best])}
    info.update({str(g): {"mIoU(S)": whole[k]["mIoU(S)"], "mIoU(U)": whole[k]["mIoU(U)"], "hIoU": float(h[k]),
                          "se": float(se[k])} for k, g in enumerate(gammas)})
    return gammas[pick], info



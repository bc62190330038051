"""PLM speed on this machine, in one run:

1. K-Means (windows 3, 7) + fusion per image on a 32 x 32 x 512 token grid (target < 20 ms);
2. training iterations per second with the online vs the cached teacher on the MSRC-21 config,
   the same batches, measured side by side (target: cached >= 3x online).

    python bench/plm.py [--steps 8] [--config training/configs/msrc21.yaml] [key=value ...]
    python bench/plm.py --vit-b16     # same comparison with the paper's teacher (random weights, speed only)
"""
from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path


import torch
from torch.utils.data import DataLoader

from kmeans_timing import time_kmeans_fusion
from clipteacher.config import load_config
from clipteacher.train.data import EpochSampler, TrainDataset
from clipteacher.train.datasets import build_dataset
from clipteacher.train.distill import Distiller, TeacherSource
from clipteacher.train.teacher_cache import TeacherCache
from clipteacher.models.teachers import ClipTeacher, build_teacher


def iterations_per_second(source: TeacherSource, core: Distiller, batches: list[dict]) -> float:
    """Full training steps (teacher tokens, pseudo labels, forward, backward, AdamW) per second."""
    opt = torch.optim.AdamW(core.parameters(), lr=1e-5)

    def step(b: dict) -> None:
        cls, dense = source(b)
        pseudo = core.pseudo_labels(dense, b["label"], b["valid"])
        losses = core(b["image"], b["label"], b["valid"], cls, pseudo)
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()

    step(batches[0])  # warm-up
    start = time.perf_counter()
    for b in batches[1:]:
        step(b)
    return (len(batches) - 1) / (time.perf_counter() - start)


@torch.no_grad()
def cache_fidelity(teacher, cache: TeacherCache, core: Distiller, batches: list[dict]) -> dict:
    """What cached mode gives up, measured on augmented crops: cosine of cached vs online CLS and
    dense tokens, and agreement of the pseudo-label partitions (adjusted Rand index over the
    pixels either run labels as pseudo regions)."""
    from sklearn.metrics import adjusted_rand_score

    cls_cos, dense_cos, ari = [], [], []
    for b in batches:
        online_cls, online_dense = TeacherSource(teacher)(b)
        cached_cls, cached_dense = TeacherSource(teacher, cache)(b)
        cls_cos.append(torch.nn.functional.cosine_similarity(online_cls, cached_cls, dim=-1))
        inside = online_dense.norm(dim=1) > 0
        dense_cos.append(torch.nn.functional.cosine_similarity(online_dense, cached_dense, dim=1)[inside])
        a = core.pseudo_labels(online_dense, b["label"], b["valid"])
        c = core.pseudo_labels(cached_dense, b["label"], b["valid"])
        num_seen = core.text_seen.shape[0]
        for x, y in zip(a, c):
            region = (x >= num_seen) & (x != 255) | (y >= num_seen) & (y != 255)
            if region.any():
                ari.append(adjusted_rand_score(x[region].numpy(), y[region].numpy()))
    return {"cls_cos": float(torch.cat(cls_cos).mean()), "dense_cos": float(torch.cat(dense_cos).mean()),
            "pseudo_ari": float(sum(ari) / max(1, len(ari)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="training/configs/msrc21.yaml")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--cache-dir", default=None, help="reuse a teacher cache (default: a temp folder, built once)")
    parser.add_argument("--vit-b16", action="store_true",
                        help="time the paper's teacher instead (CLIP ViT-B/16 at 448, random weights, speed only)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    ms = time_kmeans_fusion()
    print(f"K-Means (3, 7) + fusion, 32 x 32 x 512 tokens: {ms:.2f} ms/image (median of 50; target < 20)")

    cfg = load_config(args.config, args.overrides)
    torch.manual_seed(0)
    folder = build_dataset(cfg.data.kind, cfg.data.root, cfg.data.train_split)
    if args.vit_b16:
        # The paper's teacher, for speed only: random weights (none can be downloaded here).
        import open_clip

        teacher = ClipTeacher(input_size=448, clip_config=open_clip.get_model_config("ViT-B-16"))
        name = "CLIP ViT-B/16 (random weights, speed only)"
    else:
        teacher = build_teacher(cfg.teacher)
        name = cfg.teacher.conse_backbone if cfg.teacher.kind == "conse" else cfg.teacher.clip_model
    info = folder.info
    text = teacher.encode_text(info.seen, cfg.teacher.templates)
    core = Distiller(cfg, teacher.embed_dim, text, info.ignore_index).train()
    data = TrainDataset(folder, cfg.data, 0, info.seen)
    loader = iter(DataLoader(data, batch_sampler=EpochSampler(len(data), cfg.train.batch_size, 0), num_workers=0))
    batches = [next(loader) for _ in range(args.steps + 1)]
    if args.vit_b16:
        # Cache only the images the benchmark uses: a ViT-B/16 pass over all of them takes minutes.
        used = sorted({int(i) for b in batches for i in b["index"]})
        remap = {i: j for j, i in enumerate(used)}
        folder = copy.copy(folder)
        folder.ids = [folder.ids[i] for i in used]
        for b in batches:
            b["index"] = torch.tensor([remap[int(i)] for i in b["index"]])
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cache = TeacherCache(args.cache_dir or Path(tmp) / "cache", teacher, folder)
        build = time.perf_counter() - t0
        online = iterations_per_second(TeacherSource(teacher), core, batches)
        cached = iterations_per_second(TeacherSource(teacher, cache), core, batches)
        fidelity = None if args.vit_b16 else cache_fidelity(teacher, cache, core, batches)
    print(f"training, batch {cfg.train.batch_size}, crop {cfg.data.crop_size}, teacher {name} "
          f"@ {teacher.input_size}, {args.steps} steps each:")
    print(f"  online teacher: {online:.3f} it/s")
    print(f"  cached teacher: {cached:.3f} it/s   ({cached / online:.2f}x online; target >= 3x)")
    print(f"  one-off cache build: {build:.1f} s for {len(folder)} images")
    if fidelity is None:
        return
    print(f"what cached mode gives up, on the same {len(batches) * cfg.train.batch_size} augmented crops:")
    print(f"  CLS token cosine, cached (whole image) vs online (crop): {fidelity['cls_cos']:.3f}")
    print(f"  dense token cosine, cached (resampled) vs online:        {fidelity['dense_cos']:.3f}")
    print(f"  pseudo-label agreement (adjusted Rand index):            {fidelity['pseudo_ari']:.3f}")


if __name__ == "__main__":
    main()

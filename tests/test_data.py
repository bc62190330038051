import numpy as np
import torch

from clipteacher.config import DataConfig
from clipteacher.train.data import EpochSampler, TrainDataset, crop_features
from clipteacher.train.datasets import SegmentationFolder, write_folder_dataset

COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0]], dtype=np.uint8)


def quadrant_dataset(tmp_path, n=3):
    samples = []
    for i in range(n):
        label = np.zeros((40, 60), dtype=np.uint8)
        label[:20, 30:] = 1
        label[20:, :30] = 2
        label[20:, 30:] = 3
        label[:5, :5] = 255
        samples.append((f"s{i}", COLORS[np.minimum(label, 3)], label))
    root = write_folder_dataset(tmp_path / "quad", ["a", "b", "c", "d"], ["d"], {"train": samples})
    return SegmentationFolder(root, "train")


def test_augmentation_keeps_image_and_label_aligned(tmp_path):
    folder = quadrant_dataset(tmp_path)
    cfg = DataConfig(crop_size=48, base_size=40, scale_range=(0.7, 1.6), photometric=False)
    ds = TrainDataset(folder, cfg, seed=0, vocabulary=["a", "b", "c", "d"])
    for epoch in range(6):
        item = ds[(epoch % 3, epoch)]
        img = (item["image"].permute(1, 2, 0).numpy() * 255).round().astype(int)
        lab = item["label"].numpy()
        for cls in range(4):
            ys, xs = np.nonzero(lab == cls)
            # compare away from edges where bilinear colour mixing happens
            inner = [(y, x) for y, x in zip(ys, xs) if (lab[max(0, y - 2):y + 3, max(0, x - 2):x + 3] == cls).all()]
            for y, x in inner[:50]:
                assert np.abs(img[y, x] - COLORS[cls]).max() <= 2
        assert (lab[~item["valid"].numpy()] == 255).all()


def test_labels_index_the_training_vocabulary(tmp_path):
    """Unseen class in the middle of the class list: later classes must shift down, unseen -> ignore."""
    folder = quadrant_dataset(tmp_path)
    cfg = DataConfig(crop_size=40, base_size=40, scale_range=(1.0, 1.0), flip=False, photometric=False)
    full = TrainDataset(folder, cfg, seed=0, vocabulary=["a", "b", "c", "d"])[(0, 0)]["label"].numpy()
    zs = TrainDataset(folder, cfg, seed=0, vocabulary=["a", "c", "d"])[(0, 0)]["label"].numpy()
    assert (full == 1).sum() > 100 and (full == 3).sum() > 100
    assert (zs[full == 1] == 255).all()  # "b" hidden
    assert (zs[full == 2] == 1).all() and (zs[full == 3] == 2).all() and (zs[full == 0] == 0).all()


def test_same_key_gives_same_sample(tmp_path):
    folder = quadrant_dataset(tmp_path)
    ds = TrainDataset(folder, DataConfig(crop_size=32, base_size=40), seed=3, vocabulary=["a", "b", "c", "d"])
    a, b = ds[(1, 5)], ds[(1, 5)]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["box"], b["box"])


def test_crop_features_follows_box_and_flip():
    h, w = 8, 8
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) / h, (torch.arange(w) + 0.5) / w, indexing="ij")
    feats = torch.stack([xs, ys])[None]  # 1 x 2 x h x w: each cell stores its own centre
    full = crop_features(feats, torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([False]), (h, w))
    assert torch.allclose(full, feats, atol=1e-6)
    right = crop_features(feats, torch.tensor([[0.5, 0.0, 1.0, 1.0]]), torch.tensor([False]), (8, 4))
    assert torch.allclose(right, feats[:, :, :, 4:], atol=1e-6)
    flipped = crop_features(feats, torch.tensor([[0.5, 0.0, 1.0, 1.0]]), torch.tensor([True]), (8, 4))
    assert torch.allclose(flipped, feats[:, :, :, 4:].flip(-1), atol=1e-6)
    outside = crop_features(feats, torch.tensor([[1.0, 0.0, 2.0, 1.0]]), torch.tensor([False]), (8, 8))
    assert outside[..., 2:].abs().max() == 0


def test_epoch_sampler_resume_and_shards():
    full = EpochSampler(10, 2, seed=1)
    it = iter(full)
    first = [next(it) for _ in range(12)]
    resumed = iter(EpochSampler(10, 2, seed=1, start=7))
    assert [next(resumed) for _ in range(5)] == first[7:]
    r0 = next(iter(EpochSampler(10, 2, seed=1, rank=0, world=2)))
    r1 = next(iter(EpochSampler(10, 2, seed=1, rank=1, world=2)))
    assert not set(i for i, _ in r0) & set(i for i, _ in r1)

import os
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_CLIP
from clipteacher.config import PLMConfig, TeacherConfig
from clipteacher.predictor import to_tensor
from clipteacher.train.datasets import SegmentationFolder
from clipteacher.train.plm import PixelLearningModule, make_pseudo_labels, region_means
from clipteacher.train.teacher_cache import TeacherCache, data_signature
from clipteacher.models.teachers import build_teacher


def test_region_means_are_per_image_means_of_unit_features():
    unit = F.normalize(torch.randn(2, 4, 3, 3), dim=1)
    labels = torch.tensor([[[0, 0, 1], [1, 1, 255], [2, 2, 2]], [[2, 2, 2], [2, 2, 2], [2, 2, 2]]])
    means, present = region_means(unit, labels, 3)
    assert present.tolist() == [[True, True, True], [False, False, True]]
    assert torch.allclose(means[0, 1], unit[0][:, labels[0] == 1].mean(1), atol=1e-6)
    assert torch.allclose(means[1, 0], torch.zeros(4))


@pytest.mark.parametrize("generator", ["decoder", "mlp", "centroid"])
def test_ce_and_mse_are_finite_and_backpropagate(generator):
    torch.manual_seed(0)
    plm = PixelLearningModule(PLMConfig(generator=generator, decoder_heads=4), 8)
    feats = torch.randn(2, 8, 6, 6, requires_grad=True)
    text = F.normalize(torch.randn(3, 8), dim=-1)
    pseudo = torch.full((2, 6, 6), 255)
    pseudo[0, :3] = 0
    pseudo[0, 3:] = 3  # pseudo region 0 of image 0
    pseudo[1, :, :2] = 4  # pseudo region 1 of image 1
    # image 1 has no seen class at all
    out = plm(F.normalize(feats, dim=1), pseudo, F.normalize(torch.randn(2, 8), dim=-1), text, 20.0)
    assert torch.isfinite(out["ce"]) and torch.isfinite(out["gen"]) and out["ce"] > 0
    (out["ce"] + out["gen"]).backward()
    assert feats.grad is not None and torch.isfinite(feats.grad).all() and feats.grad.abs().sum() > 0
    if generator != "centroid":
        grads = [p.grad for p in plm.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_no_labelled_pixels_gives_zero_not_nan():
    plm = PixelLearningModule(PLMConfig(decoder_heads=4), 8)
    feats = torch.randn(1, 8, 4, 4, requires_grad=True)
    out = plm(F.normalize(feats, dim=1), torch.full((1, 4, 4), 255), torch.randn(1, 8), torch.randn(2, 8), 20.0)
    assert float(out["ce"].detach()) == 0 and float(out["gen"].detach()) == 0
    (out["ce"] + out["gen"]).backward()


def blobs(h=8, w=8, d=16, seed=0):
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=d), rng.normal(size=d)
    tok = np.where((np.arange(w) < w // 2)[None, :, None], a, b) * np.ones((h, 1, 1))
    return torch.from_numpy(tok + 0.01 * rng.normal(size=(h, w, d))).float().permute(2, 0, 1)[None]


@pytest.mark.parametrize("case", ["none_ignored", "all_ignored", "small_grid", "identical"])
def test_pseudo_labels_degenerate_inputs(case):
    cfg = PLMConfig()
    dense = blobs()
    labels = torch.full((1, 32, 32), 255)
    valid = torch.ones(1, 32, 32, dtype=torch.bool)
    if case == "none_ignored":
        labels[:] = 1
    if case == "small_grid":
        dense = dense[:, :, :2, :2]
    if case == "identical":
        dense = torch.ones(1, 16, 8, 8)
    out = make_pseudo_labels(dense, labels, valid, num_seen=3, cfg=cfg)
    ids = set(out.unique().tolist())
    if case == "none_ignored":
        assert ids == {1}
    elif case == "identical":
        assert ids == {3}  # exactly one region
    else:
        assert ids <= {3, 4, 5, 6, 255} and ids & {3, 4}
    if case == "all_ignored":
        assert len(ids - {255}) == 2  # the two blobs


def test_pseudo_labels_never_overwrite_seen_pixels():
    labels = torch.full((1, 32, 32), 255)
    labels[0, :10, :] = 0
    labels[0, 20:, 5:9] = 2
    out = make_pseudo_labels(blobs(), labels, torch.ones(1, 32, 32, dtype=torch.bool), num_seen=3, cfg=PLMConfig())
    seen = labels != 255
    assert torch.equal(out[seen], labels[seen])
    assert (out[~seen] >= 3).any()


def test_cached_and_online_teacher_give_same_pseudo_labels(tiny_data, tmp_path):
    torch.manual_seed(0)
    teacher = build_teacher(TeacherConfig(kind="clip", clip_config=TINY_CLIP, input_size=64))
    folder = SegmentationFolder(tiny_data, "train")
    cache = TeacherCache(tmp_path / "cache", teacher, folder, verbose=False)
    size = teacher.input_size
    cfg = PLMConfig(windows=(2, 3))
    for i in range(len(folder)):
        image = F.interpolate(to_tensor(folder.read_image(i))[None], size=(size, size), mode="bilinear", align_corners=False)
        label = torch.from_numpy(np.array(folder.read_label(i), dtype=np.int64))
        label = F.interpolate(label[None, None].float(), size=(size, size), mode="nearest")[0].long()
        online = teacher(image)
        cls, dense = cache.lookup(torch.tensor([i]), torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([False]))
        assert torch.allclose(cls, online.cls, atol=2e-3)
        valid = torch.ones_like(label, dtype=torch.bool)
        a = make_pseudo_labels(online.dense, label, valid, 3, cfg)
        b = make_pseudo_labels(dense, label, valid, 3, cfg)
        assert torch.equal(a, b)


def test_stale_cache_is_rebuilt(tiny_data, tmp_path, capsys):
    torch.manual_seed(0)
    folder = SegmentationFolder(tiny_data, "train")
    t32 = build_teacher(TeacherConfig(kind="clip", clip_config=TINY_CLIP, input_size=32))
    TeacherCache(tmp_path / "c", t32, folder, verbose=False)
    t64 = build_teacher(TeacherConfig(kind="clip", clip_config=TINY_CLIP, input_size=64))
    cache = TeacherCache(tmp_path / "c", t64, folder, verbose=True)
    assert "stale" in capsys.readouterr().out
    assert cache.dense.shape[-1] == 8


def test_cache_survives_copied_data_and_notices_changed_bytes(tiny_data, tmp_path):
    folder = SegmentationFolder(tiny_data, "train")
    before = data_signature(folder)
    for i in range(len(folder)):  # data copied to a new machine: same bytes, new modification times
        os.utime(folder.image_path(i), (1, 1))
    assert data_signature(folder) == before
    path = folder.image_path(0)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # same size, one byte different
    path.write_bytes(bytes(data))
    assert data_signature(folder) != before


def test_stale_cache_behind_a_symlink_is_rebuilt_in_place(tiny_data, tmp_path):
    torch.manual_seed(0)
    folder = SegmentationFolder(tiny_data, "train")
    t32 = build_teacher(TeacherConfig(kind="clip", clip_config=TINY_CLIP, input_size=32))
    TeacherCache(tmp_path / "shared", t32, folder, verbose=False)
    (tmp_path / "link").symlink_to(tmp_path / "shared")
    t64 = build_teacher(TeacherConfig(kind="clip", clip_config=TINY_CLIP, input_size=64))
    cache = TeacherCache(tmp_path / "link", t64, folder, verbose=False)
    assert cache.dense.shape[-1] == 8
    assert TeacherCache(tmp_path / "shared", t64, folder, verbose=False).dense.shape[-1] == 8


class FlakyTeacher(torch.nn.Module):
    """Wraps a teacher: counts the images it sees and fails once after `fail_after` batches (a crash mid-build)."""

    def __init__(self, teacher, fail_after=None):
        super().__init__()
        self.teacher, self.fail_after, self.images, self.batches = teacher, fail_after, 0, 0
        self.input_size, self.pixel_mean, self.fingerprint = teacher.input_size, teacher.pixel_mean, teacher.fingerprint

    def forward(self, images):
        if self.fail_after is not None and self.batches == self.fail_after:
            raise KeyboardInterrupt
        self.batches += 1
        self.images += len(images)
        return self.teacher(images)


def test_interrupted_cache_build_resumes_and_matches_a_whole_build(tiny_data, tmp_path):
    torch.manual_seed(0)
    folder = SegmentationFolder(tiny_data, "train")
    teacher = build_teacher(TeacherConfig(kind="clip", clip_config=TINY_CLIP, input_size=32))
    assert len(folder) > 2
    with pytest.raises(KeyboardInterrupt):
        TeacherCache(tmp_path / "c", FlakyTeacher(teacher, fail_after=2), folder, batch_size=1, verbose=False)
    assert not (tmp_path / "c").exists()
    again = FlakyTeacher(teacher)
    resumed = TeacherCache(tmp_path / "c", again, folder, batch_size=1, verbose=False)
    assert again.images == len(folder) - 2  # the two images done before the crash are not recomputed
    whole = TeacherCache(tmp_path / "whole", teacher, folder, batch_size=1, verbose=False)
    assert torch.equal(resumed.cls, whole.cls)
    assert np.array_equal(np.asarray(resumed.dense), np.asarray(whole.dense))
    assert not (tmp_path / "c.building").exists()


def test_interrupted_build_of_another_teacher_is_not_resumed(tiny_data, tmp_path):
    torch.manual_seed(0)
    folder = SegmentationFolder(tiny_data, "train")
    t32 = build_teacher(TeacherConfig(kind="clip", clip_config=TINY_CLIP, input_size=32))
    with pytest.raises(KeyboardInterrupt):
        TeacherCache(tmp_path / "c", FlakyTeacher(t32, fail_after=2), folder, batch_size=1, verbose=False)
    t64 = FlakyTeacher(build_teacher(TeacherConfig(kind="clip", clip_config=TINY_CLIP, input_size=64)))
    cache = TeacherCache(tmp_path / "c", t64, folder, batch_size=1, verbose=False)
    assert t64.images == len(folder) and cache.dense.shape[-1] == 8

"""Several training sources: per-dataset vocabularies, unlabelled image pools, mixing, held-aside slices."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_dataset, synthetic_sample, tiny_config
from clipteacher.checkpoint import load_checkpoint
from clipteacher.config import ConfigError, load_config
from clipteacher.train.data import MixtureSampler
from clipteacher.train.datasets import DatasetInfo, write_folder_dataset
from clipteacher.train.engine import train
from clipteacher.train.losses import nel_loss
from clipteacher.train.plm import PixelLearningModule
from clipteacher.config import PLMConfig
from clipteacher.train.sources import ImagePool, heldout_split, vocabularies


def test_vocabularies_hide_every_sources_unseen_classes_everywhere():
    a = DatasetInfo("a", ["sky", "body", "boat", "cat"], ["cat"])
    b = DatasetInfo("b", ["person", "sky", "boat", "road"], ["boat"])
    own, union = vocabularies([a, b], zero_shot=True, holdout=["road"])
    # boat is unseen in b, so a's boat labels must not teach it; road is held out
    assert own == [["sky", "body"], ["person", "sky"]]
    assert union == ["sky", "body", "person"]
    own, union = vocabularies([a, b, DatasetInfo("pool", [], [])], zero_shot=False, holdout=[])
    assert own == [["sky", "body", "boat", "cat"], ["person", "sky", "boat", "road"], []]
    assert union == ["sky", "body", "boat", "cat", "person", "road"]


def test_other_datasets_classes_are_never_negatives_in_nel():
    # union vocabulary [body, person]; image 0 comes from a dataset that only knows "body"
    logits = torch.randn(1, 2, 4, 4, requires_grad=True)
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, 0] = 255  # an ignored row: with ignore_as_negative it is a negative for body only
    mask = torch.tensor([[True, False]])
    out = nel_loss(logits, labels, 255, 20.0, 1.0, class_mask=mask)
    sum(out.values()).backward()
    assert torch.all(logits.grad[0, 1] == 0)  # "person" gets no gradient from this image
    # and the loss equals the single-class loss over the image's own vocabulary
    own = nel_loss(logits.detach()[:, :1], labels, 255, 20.0, 1.0)
    for k in out:
        assert torch.allclose(out[k], own[k])


def test_pool_image_has_no_nel_and_plm_never_chooses_masked_classes():
    logits = torch.randn(2, 2, 4, 4, requires_grad=True)
    labels = torch.full((2, 4, 4), 255)
    labels[0] = 1
    mask = torch.tensor([[True, True], [False, False]])  # image 1: a pool image
    out = nel_loss(logits, labels, 255, 20.0, 0.0, class_mask=mask)
    out["focal"].backward()
    assert torch.all(logits.grad[1] == 0)
    # PLM: pseudo region 0 (id 2) on image 0; seen class 1 masked for it -> its text never scores
    plm = PixelLearningModule(PLMConfig(generator="centroid"), 3)
    unit = torch.nn.functional.normalize(torch.randn(1, 3, 4, 4), dim=1)
    pseudo = torch.full((1, 4, 4), 2)
    text = torch.nn.functional.normalize(torch.randn(2, 3), dim=1).requires_grad_(True)
    ce = plm(unit, pseudo, torch.randn(1, 3), text, 20.0, torch.tensor([[True, False]]))["ce"]
    ce.backward()
    assert torch.all(text.grad[1] == 0) and not torch.all(text.grad[0] == 0)


def test_mixture_sampler_resumes_exactly_and_respects_weights():
    pools = [[0, 1, 2, 3, 4], [10, 11, 12], [20, 21]]
    full = iter(MixtureSampler(pools, [1.0, 1.0, 0.0], 4, seed=3))
    batches = [next(full) for _ in range(10)]
    resumed = iter(MixtureSampler(pools, [1.0, 1.0, 0.0], 4, seed=3, start=6))
    assert [next(resumed) for _ in range(4)] == batches[6:]
    keys = [k for b in batches for k in b]
    assert all(s != 2 for s, _, _ in keys)  # weight 0: never drawn
    for s, pool in ((0, pools[0]), (1, pools[1])):
        drawn = [i for src, i, e in keys if src == s and e == 0]
        assert sorted(drawn) == sorted(pool)  # each epoch of a source is a permutation of it
    # shards: two ranks split the global batch
    r0 = next(iter(MixtureSampler(pools, [1, 1, 0], 2, seed=3, rank=0, world=2)))
    r1 = next(iter(MixtureSampler(pools, [1, 1, 0], 2, seed=3, rank=1, world=2)))
    assert r0 == batches[0][0::2] and r1 == batches[0][1::2]


def test_heldout_split_is_stable_and_disjoint():
    ids = [f"img{i}" for i in range(200)]
    trained, held = heldout_split(ids, 0.2)
    assert sorted(trained + held) == list(range(200)) and not set(trained) & set(held)
    assert 20 < len(held) < 60
    # the same ids are held aside whatever the order of the split file
    _, held_rev = heldout_split(ids[::-1], 0.2)
    assert sorted(ids[::-1][i] for i in held_rev) == sorted(ids[i] for i in held)
    assert heldout_split(ids, 0.0) == (list(range(200)), [])


def test_image_pool_reads_images_with_all_ignore_labels(tmp_path):
    (tmp_path / "pool" / "images").mkdir(parents=True)
    Image.new("RGB", (30, 20), (10, 20, 30)).save(tmp_path / "pool" / "images" / "b.jpg")
    Image.new("RGB", (16, 12)).save(tmp_path / "pool" / "images" / "a.png")
    (tmp_path / "pool" / "images.json").write_text("{}")
    pool = ImagePool(tmp_path / "pool")
    assert pool.ids == ["a.png", "b.jpg"] and pool.info.classes == []
    assert pool.read_image(1).shape == (20, 30, 3)
    assert pool.read_label(1).shape == (20, 30) and np.all(pool.read_label(1) == 255)


def test_extra_sources_config_is_typed_and_checked():
    cfg = load_config(None, ["data.extra=[{kind: images, root: /pool, weight: 0.5}]"])
    assert cfg.data.extra[0].kind == "images" and cfg.data.extra[0].weight == 0.5
    with pytest.raises(ConfigError, match=r"data.extra\[0\].kind"):
        load_config(None, ["data.extra=[{kind: pool, root: /pool}]"])
    with pytest.raises(ConfigError, match=r"data.extra\[0\].root"):
        load_config(None, ["data.extra=[{kind: images}]"])
    with pytest.raises(ConfigError, match="heldout_fraction"):
        load_config(None, ["data.heldout_fraction=1"])


def second_dataset(root):
    """Street-like classes beside the tiny dataset's (sky, cat, grass, cow): person and road are new,
    sky is shared, 'cow' is unseen here."""
    rng = np.random.default_rng(5)
    samples = {s: [(f"{s}{i}", *synthetic_sample(rng)) for i in range(n)] for s, n in (("train", 4), ("val", 2))}
    return write_folder_dataset(root, ["sky", "person", "road", "cow"], ["cow"], samples, name="street")


def pool_folder(root):
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(3):
        Image.fromarray(synthetic_sample(rng)[0]).save(root / "images" / f"p{i}.png")
    return root


@pytest.mark.parametrize("mode", ["online", "cached"])
def test_training_on_two_datasets_and_a_pool(tmp_path, mode):
    main = make_dataset(tmp_path / "main")
    extra = [{"kind": "folder", "root": str(second_dataset(tmp_path / "street")), "weight": 1.0},
             {"kind": "images", "root": str(pool_folder(tmp_path / "pool")), "weight": 1.0}]
    cfg = tiny_config(main, tmp_path / "run", data={"extra": extra, "heldout_fraction": 0.3},
                      teacher={"mode": mode, "cache_dir": str(tmp_path / "cache")}, train={"stop_at": 2})
    train(cfg, verbose=False)
    cfg.train.stop_at = 0
    metrics = train(cfg, resume="auto", verbose=False)
    ckpt = load_checkpoint(tmp_path / "run" / "last.pt")
    # cat (tiny) and cow (street) are unseen somewhere, so hidden everywhere
    assert ckpt["vocabulary"] == ["sky", "grass", "person", "road"]
    assert {"sky", "cat", "grass", "cow", "person", "road"} == set(ckpt["text_cache"])
    assert set(metrics["datasets"]) == {"street"} and "hIoU" in metrics["datasets"]["street"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("val/street/hIoU" in x for x in lines)
    if mode == "cached":
        assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["pool_pool", "street_train", "tiny_train"]


def test_epoch_sampler_draws_only_the_trained_indices():
    from clipteacher.train.data import EpochSampler

    it = iter(EpochSampler(3, 3, seed=0, indices=[2, 5, 7]))
    assert sorted(i for i, _ in next(it)) == [2, 5, 7]

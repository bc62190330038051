import json

import cv2
import numpy as np
import pytest
from PIL import Image

from clipteacher.train.datasets import (COCO_STUFF_CLASSES, CONTEXT59_CLASSES, VOC_CLASSES, COCOStuff164k,
                                        DatasetError, DatasetInfo, PascalContext59, SegmentationFolder, VOC2012,
                                        build_dataset, write_folder_dataset, zero_shot_label)
from helpers import MSRC

CLASSES = ["a", "b", "c", "d"]


def _sample(sid, h=6, w=8, seed=0, values=(0, 1, 2, 3, 255)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = rng.choice(np.array(values, dtype=np.uint8), size=(h, w))
    return sid, image, label


@pytest.fixture
def tiny(tmp_path):
    samples = {"train": [_sample("x0", seed=0), _sample("x1", seed=1)], "val": [_sample("y0", seed=2)]}
    root = write_folder_dataset(tmp_path / "tiny", CLASSES, ["c"], samples)
    return root, samples


@pytest.mark.skipif(not MSRC.is_dir(), reason="msrc21 not available")
def test_msrc21_loads_indices_not_colours():
    train, val = SegmentationFolder(MSRC, "train"), SegmentationFolder(MSRC, "val")
    assert (len(train), len(val)) == (355, 59)
    assert len(train.info.classes) == 21 and len(train.info.unseen) == 5
    assert len(train.info.seen) == 16 and set(train.info.unseen_ids).isdisjoint(train.info.seen_ids)
    values = set()
    for i in range(0, len(val), 6):
        image, label = val.read_image(i), val.read_label(i)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert label.dtype == np.uint8 and label.shape == image.shape[:2]
        values |= set(np.unique(label).tolist())
    assert values <= set(range(21)) | {255}
    assert len(values - {255}) > 3  # real class ids, not a handful of colour channels
    val.validate(check_labels=True)


def test_folder_roundtrip_and_zero_shot(tiny):
    root, samples = tiny
    ds = build_dataset("folder", root, "train")
    assert ds.ids == ["x0", "x1"] and ds.info.unseen_ids == [2] and ds.info.seen == ["a", "b", "d"]
    assert Image.open(ds.label_path(0)).mode == "P"
    for i, (_, image, label) in enumerate(samples["train"]):
        np.testing.assert_array_equal(ds.read_image(i), image)
        np.testing.assert_array_equal(ds.read_label(i), label)
    ds.validate()
    label = ds.read_label(0)
    zs = zero_shot_label(label, ds.info)
    np.testing.assert_array_equal(zs[label == 2], 255)
    keep = label != 2
    np.testing.assert_array_equal(zs[keep], label[keep])
    assert (label == 2).any()


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="nope"):
        SegmentationFolder(tmp_path / "nope", "train")


def test_split_names_missing_image(tiny):
    root, _ = tiny
    (root / "splits" / "train.txt").write_text("x0\nghost\n")
    with pytest.raises(DatasetError, match=r"ghost\.png"):
        SegmentationFolder(root, "train").validate(check_labels=False)
    with pytest.raises(DatasetError, match=r"splits/test\.txt"):
        SegmentationFolder(root, "test")


def test_corrupt_image(tiny):
    root, _ = tiny
    (root / "images" / "x1.png").write_bytes(b"not an image at all")
    ds = SegmentationFolder(root, "train")
    ds.validate(check_labels=False)  # existence only
    with pytest.raises(DatasetError, match=r"x1\.png.*unreadable"):
        ds.validate()
    with pytest.raises(DatasetError, match=r"x1\.png"):
        ds.read_image(1)


def test_label_out_of_range_and_size(tiny):
    root, _ = tiny
    label = np.zeros((6, 8), np.uint8)
    label[2, 3] = 37
    Image.fromarray(label).save(root / "labels" / "x1.png")
    with pytest.raises(DatasetError, match=r"labels/x1\.png has value 37 outside 0\.\.3 \(ignore is 255\)"):
        SegmentationFolder(root, "train").validate()
    Image.fromarray(np.zeros((5, 8), np.uint8)).save(root / "labels" / "x1.png")
    with pytest.raises(DatasetError, match=r"x1\.png is 8x5 but its image is 8x6"):
        SegmentationFolder(root, "train").validate()


def test_rgb_label_rejected(tiny):
    root, _ = tiny
    Image.fromarray(np.zeros((6, 8, 3), np.uint8)).save(root / "labels" / "x0.png")
    with pytest.raises(DatasetError, match=r"x0\.png is a RGB image"):
        SegmentationFolder(root, "train").read_label(0)


def test_missing_json_key(tiny):
    root, _ = tiny
    meta = json.loads((root / "dataset.json").read_text())
    del meta["label_suffix"]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=r"dataset\.json is missing key\(s\) label_suffix"):
        SegmentationFolder(root, "train")


def test_info_checks():
    with pytest.raises(DatasetError, match="zebra"):
        DatasetInfo("x", ["a", "b"], ["zebra"])
    info = DatasetInfo("x", ["a", "b", "c"], ["b"])
    assert len(info.palette) == 3 and info.palette[1] != info.palette[2]
    with pytest.raises(DatasetError, match="valid kinds: folder, voc, coco_stuff, context"):
        build_dataset("cityscapes", "/tmp", "train")


def _save(path, array, palette=False):
    """Write an image / grey label (or an official-style palette PNG) creating parent folders."""
    im = Image.fromarray(array)
    if palette:
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


def _save_jpg(path, h=4, w=5):
    _save(path, np.full((h, w, 3), 128, np.uint8))


def test_voc_layout(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    raw = np.array([[0, 1, 2, 20, 255]] * 4, np.uint8)
    for sid in ("2007_000032", "2007_000033"):
        _save_jpg(root / "JPEGImages" / f"{sid}.jpg")
        _save(root / "SegmentationClass" / f"{sid}.png", raw, palette=True)
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("2007_000032\n")
    (sets / "val.txt").write_text("2007_000033\n")
    ds = build_dataset("voc", root, "val")
    assert ds.ids == ["2007_000033"] and ds.info.unseen_ids == [15, 16, 17, 18, 19]
    assert VOC_CLASSES[15] == "pottedplant"
    ds.validate()
    np.testing.assert_array_equal(ds.read_label(0)[0], [255, 0, 1, 19, 255])
    assert VOC2012(root, "train").ids == ["2007_000032"]
    # SBD-augmented labels and train_aug.txt take over for 'train' when present
    _save(root / "SegmentationClassAug" / "2007_000033.png", raw)
    (sets / "train_aug.txt").write_text("2007_000033\n")
    ds = VOC2012(root, "train")
    assert ds.ids == ["2007_000033"] and ds.label_dir.name == "SegmentationClassAug"
    bad = raw.copy()
    bad[0, 0] = 21
    Image.fromarray(bad).save(root / "SegmentationClassAug" / "2007_000033.png")
    with pytest.raises(DatasetError, match=r"2007_000033\.png has value 21 \(maps to 20\) outside 0\.\.19"):
        ds.validate()


def test_coco_stuff_layout(tmp_path):
    assert len(COCO_STUFF_CLASSES) == 171
    for sid in ("000000000139", "000000000009"):
        _save_jpg(tmp_path / "images" / "val2017" / f"{sid}.jpg")
        _save(tmp_path / "annotations" / "val2017" / f"{sid}_labelTrainIds.png",
              np.array([[0, 19, 170, 255, 5]] * 4, np.uint8))
    ds = build_dataset("coco_stuff", tmp_path, "val")
    assert ds.ids == ["000000000009", "000000000139"]
    assert len(ds.info.seen) == 156 and len(ds.info.unseen) == 15
    assert ds.info.unseen_ids == [19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160]
    assert ds.info.unseen == ["cow", "giraffe", "suitcase", "frisbee", "skateboard", "carrot", "scissors",
                              "cardboard", "clouds", "grass", "playingfield", "river", "road", "tree",
                              "wall-concrete"]
    ds.validate()
    np.testing.assert_array_equal(ds.read_label(1)[0], [0, 19, 170, 255, 5])
    np.testing.assert_array_equal(zero_shot_label(ds.read_label(1), ds.info)[0], [0, 255, 170, 255, 5])
    with pytest.raises(DatasetError, match="train2017"):
        COCOStuff164k(tmp_path, "train")


def test_context_layout(tmp_path):
    assert len(CONTEXT59_CLASSES) == 59
    _save_jpg(tmp_path / "JPEGImages" / "2008_000002.jpg")
    _save(tmp_path / "SegmentationClassContext" / "2008_000002.png", np.array([[0, 1, 59, 20, 255]] * 4, np.uint8))
    sets = tmp_path / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True)
    (sets / "val.txt").write_text("2008_000002\n")
    ds = PascalContext59(tmp_path, "val")
    assert len(ds.info.seen) == 49 and len(ds.info.unseen) == 10
    assert ds.info.classes[19] == "cow" and 19 in ds.info.unseen_ids
    ds.validate()
    np.testing.assert_array_equal(ds.read_label(0)[0], [255, 0, 58, 19, 255])
    assert isinstance(build_dataset("context", tmp_path, "val"), PascalContext59)


def test_16bit_rgba_grey_images_read_as_rgb_uint8(tiny):
    root, _ = tiny
    ds = SegmentationFolder(root, "train")
    grey16 = (np.arange(48).reshape(6, 8) * 1365).astype(np.uint16)
    cv2.imwrite(str(ds.image_path(0)), grey16)
    assert Image.open(ds.image_path(0)).mode.startswith("I;16")
    img = ds.read_image(0)
    assert img.shape == (6, 8, 3) and img.dtype == np.uint8
    np.testing.assert_array_equal(img[..., 0], np.rint(grey16 / 257.0).astype(np.uint8))  # rescaled, not clipped
    rgb16 = np.zeros((6, 8, 3), np.uint16)
    rgb16[..., 2] = 65535  # cv2 is BGR: red channel full
    cv2.imwrite(str(ds.image_path(0)), rgb16)
    img = ds.read_image(0)
    assert img.shape == (6, 8, 3) and img.dtype == np.uint8 and (img[..., 0] == 255).all() and img[..., 1:].max() == 0
    rgba = np.dstack([np.full((6, 8, 3), 77, np.uint8), np.zeros((6, 8), np.uint8)])
    Image.fromarray(rgba).save(ds.image_path(1))
    img = ds.read_image(1)
    assert img.shape == (6, 8, 3) and (img == 77).all()
    ds.validate()

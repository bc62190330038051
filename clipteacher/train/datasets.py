"""Raw segmentation dataset readers (no augmentation, no torch).

Each reader lists the samples of one split, reads an image (H x W x 3 uint8 RGB) and its
label (H x W uint8 class ids in the dataset's own class order, `ignore_index` elsewhere),
and validates the files before training. Layouts:

- `SegmentationFolder`: the msrc21 layout (images/, labels/, splits/<split>.txt, dataset.json).
- `VOC2012`, `COCOStuff164k`, `PascalContext59`: the official / mmsegmentation layouts, with
  the zero-shot unseen classes of the paper's protocol (docs/METHOD.md#zero-shot-protocol).

Labels are always read as stored indices: palette PNGs give their palette indices, never
their colours.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from clipteacher.io import DatasetError, read_image_file, read_label_file


def voc_palette(n: int) -> list[list[int]]:
    """The PASCAL VOC bit-interleaved colour map: a deterministic palette for any class count."""
    palette = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.append([r, g, b])
    return palette


@dataclass
class DatasetInfo:
    name: str
    classes: list[str]  # class names in index order
    unseen: list[str]  # zero-shot unseen classes, a subset of `classes`
    ignore_index: int = 255
    palette: list[list[int]] = field(default_factory=list)  # per class RGB; VOC colour map when empty

    def __post_init__(self):
        missing = [c for c in self.unseen if c not in self.classes]
        if missing:
            raise DatasetError(f"dataset {self.name}: unseen classes {missing} are not in its class list")
        if len(set(self.classes)) != len(self.classes):
            raise DatasetError(f"dataset {self.name}: class names are not unique")
        if not 0 <= self.ignore_index <= 255 or self.ignore_index < len(self.classes):
            raise DatasetError(f"dataset {self.name}: ignore_index {self.ignore_index} must be in "
                               f"{len(self.classes)}..255 (labels are uint8)")
        if not self.palette:
            self.palette = voc_palette(len(self.classes))
        if len(self.palette) != len(self.classes):
            raise DatasetError(f"dataset {self.name}: palette has {len(self.palette)} colours "
                               f"for {len(self.classes)} classes")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def seen(self) -> list[str]:
        return [c for c in self.classes if c not in self.unseen]

    @property
    def seen_ids(self) -> list[int]:
        return [i for i, c in enumerate(self.classes) if c not in self.unseen]

    @property
    def unseen_ids(self) -> list[int]:
        return [i for i, c in enumerate(self.classes) if c in self.unseen]


def zero_shot_label(label: np.ndarray, info: DatasetInfo) -> np.ndarray:
    """H x W uint8 label -> the same with every unseen-class pixel set to ignore (docs/METHOD.md#zero-shot-protocol)."""
    lut = np.arange(256, dtype=np.uint8)
    lut[info.unseen_ids] = info.ignore_index
    return lut[label]


def _shift_lut(num_classes: int, ignore_index: int = 255) -> np.ndarray:
    """Raw 0 = background -> ignore, raw 1..C -> 0..C-1 (mmseg's reduce_zero_label)."""
    lut = (np.arange(256) - 1).astype(np.uint8)  # raw values > C stay out of range, so validate sees them
    lut[0] = ignore_index
    lut[255] = ignore_index
    return lut


def _existing_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{what} {path} does not exist or is not a folder")
    return path


def _read_split(path: Path) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"split file {path} does not exist")
    ids = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not ids:
        raise DatasetError(f"split file {path} lists no samples")
    return ids


class SegmentationFolder:
    """VOC-style folder exactly like ../shared/data/msrc21.

    root/dataset.json   {classes, unseen, ignore_index, palette, image_dir, label_dir,
                         image_suffix, label_suffix} (name optional)
    root/<image_dir>/<id><image_suffix>, root/<label_dir>/<id><label_suffix>
    root/splits/<split>.txt   one id per line

    Attributes: root, split, info (DatasetInfo), ids (list[str]), image_dir, label_dir,
    image_suffix, label_suffix, label_lut (uint8[256] raw value -> class id, or None = identity).
    """

    META_KEYS = ("classes", "unseen", "ignore_index", "palette", "image_dir", "label_dir",
                 "image_suffix", "label_suffix")

    def __init__(self, root: str | Path, split: str):
        root = _existing_dir(Path(root), "dataset folder")
        meta_path = root / "dataset.json"
        if not meta_path.is_file():
            raise DatasetError(f"dataset file {meta_path} does not exist")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"dataset file {meta_path} is not valid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise DatasetError(f"dataset file {meta_path} must hold a JSON object")
        missing = [k for k in self.META_KEYS if k not in meta]
        if missing:
            raise DatasetError(f"dataset file {meta_path} is missing key(s) {', '.join(missing)}")
        info = DatasetInfo(meta.get("name", root.name), list(meta["classes"]), list(meta["unseen"]),
                           int(meta["ignore_index"]), [list(c) for c in meta["palette"]])
        self._open(root, split, info, root / meta["image_dir"], root / meta["label_dir"],
                   meta["image_suffix"], meta["label_suffix"], _read_split(root / "splits" / f"{split}.txt"))

    def _open(self, root: Path, split: str, info: DatasetInfo, image_dir: Path, label_dir: Path,
              image_suffix: str, label_suffix: str, ids: list[str], label_lut: np.ndarray | None = None):
        self.root, self.split, self.info, self.ids = root, split, info, ids
        self.image_dir, self.label_dir = image_dir, label_dir
        self.image_suffix, self.label_suffix = image_suffix, label_suffix
        self.label_lut = label_lut

    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, split={self.split!r}, n={len(self)})"

    def image_path(self, i: int) -> Path:
        return self.image_dir / f"{self.ids[i]}{self.image_suffix}"

    def label_path(self, i: int) -> Path:
        return self.label_dir / f"{self.ids[i]}{self.label_suffix}"

    def read_image(self, i: int) -> np.ndarray:
        """H x W x 3 uint8 RGB (grey, palette, RGBA and 16-bit files converted)."""
        return read_image_file(self.image_path(i), upright=False)  # labels are drawn on the stored grid

    def read_raw_label(self, i: int) -> np.ndarray:
        """H x W uint8 stored label values (palette indices for 'P' PNGs), before any mapping."""
        return read_label_file(self.label_path(i))

    def read_label(self, i: int) -> np.ndarray:
        """H x W uint8 class ids 0..C-1 in `info.classes` order, `info.ignore_index` elsewhere."""
        raw = self.read_raw_label(i)
        return raw if self.label_lut is None else self.label_lut[raw]

    def validate(self, check_labels: bool | None = None, progress: bool = True) -> None:
        """Check the files before training; raise DatasetError naming the first bad file.

        Always: every listed image and label exists. With `check_labels` (default: when the split
        has <= 3000 samples) also decode every image and check each label's values and size.
        """
        if not self.ids:
            raise DatasetError(f"split {self.split!r} of {self.root} has no samples")
        _existing_dir(self.image_dir, "image folder")
        _existing_dir(self.label_dir, "label folder")
        for i in range(len(self)):
            for path, what in ((self.image_path(i), "image"), (self.label_path(i), "label")):
                if not path.is_file():
                    raise DatasetError(f"{what} {path} listed in split {self.split!r} does not exist")
        if check_labels is None:
            check_labels = len(self) <= 3000
        if not check_labels:
            return
        C, ignore = self.info.num_classes, self.info.ignore_index
        lut = self.label_lut if self.label_lut is not None else np.arange(256, dtype=np.uint8)
        valid = (lut < C) | (lut == ignore)  # indexed by raw value
        for i in tqdm(range(len(self)), desc=f"checking {self.root.name}/{self.split}", leave=False,
                      disable=not progress):
            path = self.image_path(i)
            try:
                with Image.open(path) as im:
                    size = im.size
                    im.load()  # decodes, so truncated files fail here and not mid-training
            except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
                raise DatasetError(f"image {path} is unreadable: {e}") from None
            raw = self.read_raw_label(i)
            if (raw.shape[1], raw.shape[0]) != size:
                raise DatasetError(f"label {self.label_path(i)} is {raw.shape[1]}x{raw.shape[0]} but its "
                                   f"image is {size[0]}x{size[1]}")
            present = np.flatnonzero(np.bincount(raw.ravel(), minlength=256))
            bad = present[~valid[present]]
            if bad.size:
                v = int(bad[0])
                mapped = "" if self.label_lut is None else f" (maps to {int(lut[v])})"
                raise DatasetError(f"label {self.label_path(i)} has value {v}{mapped} outside 0..{C - 1} "
                                   f"(ignore is {ignore})")


VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]
VOC_UNSEEN = ["pottedplant", "sheep", "sofa", "train", "tvmonitor"]  # ids 15..19 (ZegCLIP)

COCO_STUFF_CLASSES = [  # mmsegmentation's 171-class order (COCO-Stuff 164k labelTrainIds)
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush", "banner", "blanket", "branch", "bridge",
    "building-other", "bush", "cabinet", "cage", "cardboard", "carpet", "ceiling-other",
    "ceiling-tile", "cloth", "clothes", "clouds", "counter", "cupboard", "curtain", "desk-stuff",
    "dirt", "door-stuff", "fence", "floor-marble", "floor-other", "floor-stone", "floor-tile",
    "floor-wood", "flower", "fog", "food-other", "fruit", "furniture-other", "grass", "gravel",
    "ground-other", "hill", "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss",
    "mountain", "mud", "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic",
    "platform", "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug",
    "salad", "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs",
    "stone", "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree",
    "vegetable", "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone",
    "wall-tile", "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
]
COCO_STUFF_UNSEEN_IDS = [19, 23, 28, 29, 36, 51, 76, 88, 94, 112, 133, 136, 137, 157, 160]  # the paper's 15 unseen classes
COCO_STUFF_UNSEEN = [COCO_STUFF_CLASSES[i] for i in COCO_STUFF_UNSEEN_IDS]

CONTEXT59_CLASSES = [  # mmsegmentation's PascalContextDataset59 order (raw label 1..59)
    "aeroplane", "bag", "bed", "bedclothes", "bench", "bicycle", "bird", "boat", "book", "bottle",
    "building", "bus", "cabinet", "car", "cat", "ceiling", "chair", "cloth", "computer", "cow",
    "cup", "curtain", "dog", "door", "fence", "floor", "flower", "food", "grass", "ground", "horse",
    "keyboard", "light", "motorbike", "mountain", "mouse", "person", "plate", "platform",
    "pottedplant", "road", "rock", "sheep", "shelves", "sidewalk", "sign", "sky", "snow", "sofa",
    "table", "track", "train", "tree", "truck", "tvmonitor", "wall", "water", "window", "wood",
]
CONTEXT59_UNSEEN = ["cow", "motorbike", "sofa", "cat", "boat", "fence", "bird", "tvmonitor",
                    "keyboard", "aeroplane"]


class VOC2012(SegmentationFolder):
    """PASCAL VOC 2012, 20 classes (15 seen / 5 unseen); background is ignored.

    root = VOCdevkit/VOC2012 with JPEGImages/, SegmentationClass/ (official palette PNGs) and
    optionally SegmentationClassAug/ (SBD-augmented, greyscale). Split 'train' reads
    ImageSets/Segmentation/train_aug.txt (or mmseg's aug.txt; 10,582 ids) with the Aug labels
    when both exist, else train.txt; other splits read <split>.txt with the official labels.
    Raw labels: 0 background -> 255, 1..20 -> 0..19, 255 stays.
    """

    def __init__(self, root: str | Path, split: str):
        root = _existing_dir(Path(root), "VOC2012 folder")
        sets = root / "ImageSets" / "Segmentation"
        aug_dir, label_dir = root / "SegmentationClassAug", root / "SegmentationClass"
        split_file = sets / f"{split}.txt"
        if split == "train" and aug_dir.is_dir():
            aug_list = [p for p in (sets / "train_aug.txt", sets / "aug.txt") if p.is_file()]
            if aug_list:
                split_file, label_dir = aug_list[0], aug_dir
        if not label_dir.is_dir() and aug_dir.is_dir():
            label_dir = aug_dir
        info = DatasetInfo("voc2012", list(VOC_CLASSES), list(VOC_UNSEEN))
        self._open(root, split, info, root / "JPEGImages", label_dir, ".jpg", ".png",
                   _read_split(split_file), _shift_lut(len(VOC_CLASSES)))


class COCOStuff164k(SegmentationFolder):
    """COCO-Stuff 164k in mmsegmentation's converted layout, 171 classes (156 seen / 15 unseen).

    root/images/{train2017,val2017}/*.jpg, root/annotations/{...}/*_labelTrainIds.png (0..170, 255).
    There are no split files: the sorted image folder is the split ('train' -> train2017, 'val' -> val2017).
    """

    def __init__(self, root: str | Path, split: str):
        root = _existing_dir(Path(root), "COCO-Stuff folder")
        folder = {"train": "train2017", "val": "val2017"}.get(split, split)
        image_dir = _existing_dir(root / "images" / folder, "image folder")
        ids = sorted(p.stem for p in image_dir.glob("*.jpg"))
        if not ids:
            raise DatasetError(f"image folder {image_dir} holds no .jpg files")
        info = DatasetInfo("coco_stuff164k", list(COCO_STUFF_CLASSES), list(COCO_STUFF_UNSEEN))
        self._open(root, split, info, image_dir, root / "annotations" / folder, ".jpg",
                   "_labelTrainIds.png", ids)


class PascalContext59(SegmentationFolder):
    """PASCAL Context, 59-class setting, mmsegmentation layout; 49 seen + 10 unseen.

    root/JPEGImages/, root/SegmentationClassContext/*.png (0 = background, 1..59 classes),
    root/ImageSets/SegmentationContext/{train,val}.txt. Background is mapped to ignore in both
    training and evaluation, so the seen set has 49 classes (CLIPTeacher's count). ZegCLIP instead
    counts background as a 50th seen class; numbers from the two settings are not comparable.
    """

    def __init__(self, root: str | Path, split: str):
        root = _existing_dir(Path(root), "PASCAL Context folder")
        info = DatasetInfo("pascal_context59", list(CONTEXT59_CLASSES), list(CONTEXT59_UNSEEN))
        self._open(root, split, info, root / "JPEGImages", root / "SegmentationClassContext", ".jpg", ".png",
                   _read_split(root / "ImageSets" / "SegmentationContext" / f"{split}.txt"),
                   _shift_lut(len(CONTEXT59_CLASSES)))


DATASET_KINDS = ("folder", "voc", "coco_stuff", "context")


def build_dataset(kind: str, root: str | Path, split: str) -> SegmentationFolder:
    """DataConfig.kind -> reader for `split` of the dataset at `root`."""
    if kind == "folder":
        return SegmentationFolder(root, split)
    elif kind == "voc":
        return VOC2012(root, split)
    elif kind == "coco_stuff":
        return COCOStuff164k(root, split)
    elif kind == "context":
        return PascalContext59(root, split)
    raise DatasetError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASET_KINDS)}")


def write_folder_dataset(root: str | Path, classes: list[str], unseen: list[str],
                         samples: dict[str, list[tuple[str, np.ndarray, np.ndarray]]],
                         name: str = "synthetic", image_suffix: str = ".png") -> Path:
    """Write a tiny dataset in the msrc21 layout (for tests and synthetic data).

    samples: split -> [(id, image H x W x 3 uint8, label H x W uint8)]. Labels are saved as
    palette PNGs; images as `image_suffix` (PNG by default, so pixels read back exactly).
    """
    root = Path(root)
    info = DatasetInfo(name, list(classes), list(unseen))
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    (root / "splits").mkdir(exist_ok=True)
    flat_palette = [v for rgb in info.palette for v in rgb]
    flat_palette += [0] * (768 - len(flat_palette))
    flat_palette[3 * info.ignore_index:3 * info.ignore_index + 3] = [255, 255, 255]
    for split, items in samples.items():
        for sid, image, label in items:
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(root / "images" / f"{sid}{image_suffix}")
            lab = Image.fromarray(np.asarray(label, dtype=np.uint8))
            lab.putpalette(flat_palette)  # turns the L image into a P image holding the same indices
            lab.save(root / "labels" / f"{sid}.png")
        (root / "splits" / f"{split}.txt").write_text("".join(f"{sid}\n" for sid, _, _ in items))
    meta = {"name": name, "classes": info.classes, "unseen": info.unseen, "ignore_index": info.ignore_index,
            "palette": info.palette, "image_dir": "images", "label_dir": "labels",
            "image_suffix": image_suffix, "label_suffix": ".png", "splits": sorted(samples)}
    (root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return root


def write_synthetic_layout(kind: str, root, n_train: int = 2, n_val: int = 2, h: int = 48, w: int = 64,
                         seed: int = 0) -> Path:
    """Synthetic images and labels in the official layout of 'voc' (root = VOCdevkit/VOC2012), 'context'
    (VOC2010 + SegmentationClassContext) or 'coco_stuff' (mmseg's converted 164k): blocks of random raw ids
    (background 0 for VOC/Context, every class reachable) and a void border. Returns root. For tests and
    for dry runs of the paper configs without their datasets (`training/experiments/dry_runs.py`)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    top = {"voc": 20, "context": 59, "coco_stuff": 170}[kind]  # raw 0 is background in VOC/Context, a class in COCO

    def write(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    for split, n in (("train", n_train), ("val", n_val)):
        ids = [f"{2008 + (split == 'val')}_{i:06d}" if kind != "coco_stuff" else f"{i + 100 * (split == 'val'):012d}"
               for i in range(n)]
        for sid in ids:
            blocks = rng.integers(0, top + 1, (4, 4)).astype(np.uint8)
            label = np.kron(blocks, np.ones((h // 4, w // 4), np.uint8))
            label[:, :2] = 255
            image = np.clip(label[..., None].astype(np.int16) * 3 + rng.integers(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
            if kind == "coco_stuff":
                folder = {"train": "train2017", "val": "val2017"}[split]
                write(root / "images" / folder / f"{sid}.jpg", image)
                write(root / "annotations" / folder / f"{sid}_labelTrainIds.png", label)
            else:
                write(root / "JPEGImages" / f"{sid}.jpg", image)
                write(root / ("SegmentationClass" if kind == "voc" else "SegmentationClassContext") / f"{sid}.png", label)
        if kind != "coco_stuff":
            sets = root / "ImageSets" / ("Segmentation" if kind == "voc" else "SegmentationContext")
            sets.mkdir(parents=True, exist_ok=True)
            (sets / f"{split}.txt").write_text("".join(f"{s}\n" for s in ids))
    return root

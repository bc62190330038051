"""Training and evaluation loops: plain functions, a progress bar, JSONL metrics, atomic checkpoints.

`train(cfg)` checks every input (`check_inputs`), builds the run (`build_run`), restores a
checkpoint (`restore`) and runs `run_steps` between validations and checkpoints until
`train.iters`; `evaluate` scores a student on a split.
Under `torchrun` each process trains on its shard of every epoch (DDP, gloo on CPU, nccl on GPU).
Device rule: the teacher and the Distiller live on the run's device; `run_steps` moves each batch
there in one call (`clipteacher.train.data.to_device`); everything a model returns stays there.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from clipteacher.checkpoint import (load_checkpoint, model_record, rng_state, save_checkpoint, set_rng_state,
                                    training_checkpoint)
from clipteacher.config import Config, ConfigError, save_config
from clipteacher.train.data import EpochSampler, EvalDataset, MixedDataset, MixtureSampler, TrainDataset, to_device
from clipteacher.train.datasets import SegmentationFolder, build_dataset
from clipteacher.models.build import build_model, fill_vocabulary_bank
from clipteacher.train.distill import Distiller, TeacherSource
from clipteacher.train.zegclip import ZegCLIPLearner
from clipteacher.train.metrics import ConfusionMatrix, summarize
from clipteacher.predictor import predict_logits, unseen_bias
from clipteacher.prompts import outside_vocabulary
from clipteacher.train.sources import Sources, open_sources
from clipteacher.train.teacher_cache import CacheSet, TeacherCache
from clipteacher.models.teachers import build_teacher, imagenet_class_names

# Config fields that define the weights: a checkpoint made with other values cannot be resumed.
MODEL_KEYS = [(None, "method"), ("student", "backbone"), ("student", "head_dim"), ("teacher", "kind"),
              ("teacher", "clip_model"), ("teacher", "conse_backbone"), ("plm", "generator"), ("plm", "decoder_layers"),
              ("glm", "bank_size"), ("zegclip", "prompt_tokens"), ("zegclip", "decoder_dim"),
              ("zegclip", "decoder_layers"), ("zegclip", "trusty")]


def resolve_device(name: str, what: str = "device") -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> torch.device; auto is CUDA when usable. `what` names the setting in the error."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{what}=cuda but this machine has no usable CUDA device; use cpu (or auto), "
                          f"or --dry-run for a CPU check of a training config")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def launch_rank() -> int:
    """This process's rank as torchrun announced it, before any process group exists; 0 outside torchrun
    (a stray RANK left in a shell without WORLD_SIZE > 1 does not silence a single-process run)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def setup_distributed(device: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun (nccl on GPUs, else gloo).

    Each process uses GPU LOCAL_RANK of its node."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    target = resolve_device(device, "train.device")
    use_cuda = target.type == "cuda"
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPU(s); "
                              f"start at most that many processes per node (--nproc_per_node)")
        torch.cuda.set_device(local)  # before the process group, so NCCL binds this GPU
        target = torch.device("cuda", local)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    return rank, world, target


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """train.amp -> autocast dtype (None = float32). auto: bf16 on GPUs that support it, else fp16; off on the CPU."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[mode]


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warm-up, then poly decay towards min_lr (as a fraction of the base lr)."""
    oc, total = cfg.optim, cfg.train.iters
    if step < oc.warmup_iters:
        return (step + 1) / oc.warmup_iters
    frac = min(1.0, (step - oc.warmup_iters) / max(1, total - oc.warmup_iters))
    floor = oc.min_lr / oc.lr if oc.lr > 0 else 0.0  # lr 0 (weights held, e.g. to check an init) is allowed
    return floor + (1 - floor) * (1 - frac) ** oc.poly_power


def check_resumable(ckpt: dict, cfg: Config, path: Path) -> None:
    old = ckpt["config"]
    defaults = Config()
    for section, key in MODEL_KEYS:
        mine = getattr(cfg if section is None else getattr(cfg, section), key)
        # a key the checkpoint predates had its default value then
        default = getattr(defaults if section is None else getattr(defaults, section), key)
        theirs = old.get(key, default) if section is None else old.get(section, {}).get(key, default)
        if isinstance(mine, tuple):
            mine = list(mine)
        if theirs != mine:
            raise ValueError(f"checkpoint {path} was made by another model: {section + '.' if section else ''}{key}={theirs!r}, "
                             f"this config has {mine!r}")


@torch.no_grad()
def image_logits(student, folder: SegmentationFolder, text: torch.Tensor, scale: float, bias: torch.Tensor,
                 size: int, window: int = 0, rank: int = 0, world: int = 1, device=None, progress: bool = True,
                 limit: int = 0, unseen: torch.Tensor | None = None):
    """The evaluation loop: yields (logits 1 x C x H x W on `device`, label H x W uint8 numpy) per image of this
    rank's shard, the image resized to short side `size` and the logits brought back to the label's size.

    text: C x D; bias: C; device: where the student lives (default CPU); limit > 0: the first `limit` images only;
    unseen: C bool, the classes outside the training vocabulary (default: those with a nonzero bias)."""
    device = device or torch.device("cpu")
    unseen = (bias != 0) if unseen is None else unseen
    was_training = student.training
    student.eval()
    data = EvalDataset(folder, size)
    try:
        for i in tqdm(range(rank, min(len(data), limit) if limit > 0 else len(data), world), desc="evaluate",
                      disable=not progress or rank != 0, leave=False):
            item = data[i]
            label = item["label"]
            yield predict_logits(student, item["image"][None].to(device), text.to(device), scale, bias.to(device),
                                 tuple(label.shape), window, unseen=unseen.to(device)), label.numpy()
    finally:
        student.train(was_training)


@torch.no_grad()
def evaluate(student, folder: SegmentationFolder, text: torch.Tensor, bias: torch.Tensor, scale: float,
             size: int, window: int = 0, rank: int = 0, world: int = 1, device=None, progress: bool = True,
             limit: int = 0, absent: str = "mmseg", unseen: torch.Tensor | None = None) -> dict:
    """Accumulate one confusion matrix over the split (sharded over ranks, then summed) and summarise it.

    text: C x D for the dataset's classes in index order, then any distractor names (their pixels are errors,
    `metrics.summarize`); bias: one per row of text (gamma on names outside the training vocabulary).
    Arguments as `image_logits`; absent: which classes enter the means (`metrics.summarize`).
    """
    device = device or torch.device("cpu")
    info = folder.info
    c = len(info.classes)
    cm = ConfusionMatrix(text.shape[0], info.ignore_index)  # a column per distractor name; their rows stay zero
    for logits, label in image_logits(student, folder, text, scale, bias, size, window, rank, world, device,
                                      progress, limit, unseen):
        cm.update(logits.argmax(1)[0].cpu().numpy(), label)
    if world > 1:
        matrix = torch.from_numpy(cm.matrix).to(device)  # NCCL reduces GPU tensors only
        dist.all_reduce(matrix)
        cm.matrix = matrix.cpu().numpy()
    result = summarize(cm.matrix, info.classes, info.unseen, absent)
    if text.shape[0] > c:  # share of the labelled pixels per distractor (index into the names after the dataset's)
        result["distractor_wins"] = (cm.matrix[:c, c:].sum(0) / max(int(cm.matrix.sum()), 1) * 100).tolist()
    return result


class MetricsLog:
    """Appends JSON lines (and TensorBoard scalars when tensorboard is installed) on rank 0."""

    def __init__(self, out_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = out_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(out_dir / "tb"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self.tb = None

    def keep_until(self, step: int) -> None:
        """Drop records after `step`: a run resumed from a checkpoint at `step` logs those steps again
        (and a fresh run, step 0, starts a fresh file). Rewritten atomically."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if int(json.loads(line).get("step", 0)) <= step:
                    kept.append(line + "\n")
            except (ValueError, TypeError, AttributeError):  # a line cut short by a kill
                continue
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "step":
                    self.tb.add_scalar(k, v, record.get("step", 0))


def run_steps(model, source: TeacherSource, batches, optimizer, scheduler, cfg: Config, state: dict,
              steps: int, log: MetricsLog, bar, device, scaler: torch.amp.GradScaler | None = None) -> None:
    """Run `steps` optimisation steps from the batch iterator, updating state['step'] in place.

    Each batch moves to `device` (where the teacher and `model` live) here and nowhere else; `scaler`
    scales the loss for float16 autocast (None or disabled: plain backward and step)."""
    core = model.module if isinstance(model, DistributedDataParallel) else model
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    sums: dict[str, float] = {}
    t0 = time.time()
    for _ in range(steps):
        batch = to_device(next(batches), device, non_blocking=device.type == "cuda")
        cls, dense = source(batch) if core.needs_teacher else (None, None)
        pseudo = core.pseudo_labels(dense, batch["label"], batch["valid"])
        losses = model(batch["image"], batch["label"], batch["valid"], cls, pseudo, batch.get("source"), dense,
                       step=state["step"])
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {state['step']}: { {k: float(v) for k, v in losses.items()} }")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        state["step"] += 1
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
        sums["n"] = sums.get("n", 0) + 1
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
        if state["step"] % cfg.train.log_every == 0:
            n = sums.pop("n")
            rec = {"step": state["step"], **{k: v / n for k, v in sums.items()},
                   "lr": optimizer.param_groups[-1]["lr"], "it_per_s": n / (time.time() - t0)}
            log.write(rec)
            sums, t0 = {}, time.time()


@dataclass
class Run:
    """Everything a training run is made of, built by `build_run` before the first step."""

    cfg: Config
    rank: int
    world: int
    device: torch.device
    out: Path
    train_set: SegmentationFolder
    val_set: SegmentationFolder
    vocabulary: list[str]  # training classes (union over sources), in the order of the text embeddings the losses use
    text_all: torch.Tensor  # C x D embeddings of every class of the dataset (validation)
    text_cache: dict  # class name -> D embedding of every class of every source, saved with checkpoints
    teacher: torch.nn.Module
    source: TeacherSource
    core: Distiller | ZegCLIPLearner  # what learns: the student with its modules, or ZegCLIP/TagCLIP
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler  # loss scaling for float16 autocast of the student; disabled otherwise
    sources: Sources  # the primary dataset and data.extra: readers, vocabularies, weights, trained indices
    state: dict = field(default_factory=lambda: {"step": 0})

    @property
    def main(self) -> bool:
        return self.rank == 0


def check_inputs(cfg: Config, resume: str | None, verbose: bool, main: bool):
    """Validate both splits and the checkpoint to resume before anything is built.

    Returns (train split, val split, checkpoint dict or None)."""
    train_set = build_dataset(cfg.data.kind, cfg.data.root, cfg.data.train_split)
    val_set = build_dataset(cfg.data.kind, cfg.data.root, cfg.data.val_split)
    train_set.validate(progress=verbose and main)
    val_set.validate(progress=verbose and main)
    info = train_set.info
    unknown = [c for c in cfg.data.holdout if c not in info.seen]
    if unknown:
        raise ConfigError(f"data.holdout names {unknown}, which are not seen classes of {info.name}")
    if cfg.data.holdout:
        # Pseudo-unseen classes are hidden exactly like the unseen ones.
        train_set.info = dataclasses.replace(info, unseen=list(info.unseen) + list(cfg.data.holdout))
    ckpt = None
    if resume:
        path = Path(cfg.train.out_dir) / "last.pt" if resume == "auto" else Path(resume)
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, cfg, path)
        if not ckpt.get("optimizer"):
            raise ConfigError(f"{path} is an inference copy (no optimiser state) and cannot be resumed; "
                              f"fine-tune from it with train.init_from={path}")
    if cfg.train.init_from:
        check_resumable(load_checkpoint(cfg.train.init_from), cfg, Path(cfg.train.init_from))
    return train_set, val_set, ckpt


def distillation_names(cfg: Config, dataset_names: list[str]) -> list[str]:
    """The vocabulary of `loss.vocab_weight`: ImageNet's 1000 class names, every dataset class, `loss.vocab_file`'s lines."""
    extra = []
    if cfg.loss.vocab_file:
        path = Path(cfg.loss.vocab_file)
        if not path.is_file():
            raise ConfigError(f"loss.vocab_file not found: {path}")
        extra = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(imagenet_class_names() + list(dataset_names) + extra))


def build_run(cfg: Config, train_set: SegmentationFolder, val_set: SegmentationFolder, verbose: bool = True,
              sources: Sources | None = None) -> Run:
    """Teacher (and its caches), text embeddings, the learning modules and the optimiser.

    sources: from `open_sources` (read here when not given)."""
    rank, world, device = setup_distributed(cfg.train.device)
    amp = amp_dtype(cfg.train.amp, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size: the fastest kernels are chosen once
    out = Path(cfg.train.out_dir)
    info = train_set.info
    sources = sources or open_sources(cfg, train_set, val_set, verbose and rank == 0)
    torch.manual_seed(cfg.train.seed)
    teacher = build_teacher(cfg.teacher).to(device)
    vocabulary = sources.vocabulary
    names = sources.class_names()  # every source's classes, embedded once
    text_cache = {c: e for c, e in zip(names, teacher.encode_text(names, cfg.teacher.templates).cpu())}
    text_all = torch.stack([text_cache[c] for c in info.classes])
    text_seen = torch.stack([text_cache[c] for c in vocabulary])
    cache = None
    if cfg.teacher.mode == "cached" and cfg.method != "zegclip":  # ZegCLIP runs its own CLIP on every crop
        base = Path(cfg.teacher.cache_dir) if cfg.teacher.cache_dir else out.parent / "teacher_cache"
        # No two processes write one cache: global rank 0 builds it; then the first process of every
        # other node opens it, building its own copy only when cache_dir is node-local (not fresh there);
        # then everyone else opens the fresh cache.
        local = int(os.environ.get("LOCAL_RANK", "0"))
        mine = 0 if rank == 0 else 1 if local == 0 else 2
        for turn in range(3 if world > 1 else 1):
            if turn == mine:
                cache = CacheSet([TeacherCache(base / f"{f.info.name}_{f.split}", teacher, f, verbose=verbose and local == 0)
                                  for f in sources.folders])
            if world > 1:
                dist.barrier()

    text_vocab = None
    if cfg.loss.vocab_weight > 0:
        text_vocab = teacher.encode_text(distillation_names(cfg, names), cfg.teacher.templates).cpu()
    torch.manual_seed(cfg.train.seed)  # same init whatever the teacher's construction consumed
    if cfg.method == "zegclip":
        model = build_model(cfg, teacher.embed_dim, visual=teacher.visual)  # one frozen CLIP tower, shared
        core = ZegCLIPLearner(cfg, model, text_seen, info.ignore_index, sources.mask()).to(device)
    else:
        text_names = None
        if cfg.method == "maskclip_plus":
            names = vocabulary + ([c for c in info.classes if c not in vocabulary] if cfg.maskclip.names == "dataset" else [])
            text_names = torch.stack([text_cache[c] for c in names])
        core = Distiller(cfg, teacher.embed_dim, text_seen, info.ignore_index, sources.mask(), text_vocab,
                         text_names)
        imagenet = fill_vocabulary_bank(core.student, teacher, cfg.teacher.templates)
        if imagenet is not None:
            core.text_imagenet = imagenet  # the vocabulary head's loss scores its classifier against these
        core = core.to(device)
    core.amp = amp if cfg.train.amp_student else None
    scaler = torch.amp.GradScaler(device.type, enabled=core.amp == torch.float16)
    gate = {"gate_mult": cfg.optim.gate_lr_mult} if getattr(core.student, "vocab_gate", None) is not None else {}
    groups = core.student.param_groups(cfg.optim.lr, cfg.optim.backbone_lr_mult, cfg.optim.weight_decay, **gate)
    if core.plm is not None and any(True for _ in core.plm.parameters()):
        groups.append({"params": list(core.plm.parameters()), "lr": cfg.optim.lr, "weight_decay": cfg.optim.weight_decay})
    optimizer = torch.optim.AdamW(groups, lr=cfg.optim.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    return Run(cfg, rank, world, device, out, train_set, val_set, vocabulary, text_all, text_cache, teacher,
               TeacherSource(teacher, cache, amp), core, optimizer, scheduler, scaler, sources)


def restore(run: Run, ckpt: dict) -> None:
    """Continue from a checkpoint: weights, optimiser, schedule, step and every RNG."""
    run.core.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    if run.scaler.is_enabled() and ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.state["step"] = ckpt["step"]
    set_rng_state(ckpt["rng"])


def initialise(run: Run, path: str) -> None:
    """Fine-tuning start: the learned weights of checkpoint `path` (its student must match this config's),
    float32; the optimiser, schedule and step start fresh. Weights the checkpoint lacks (a PLM generator
    of an inference copy; a vocabulary head added to a student trained without one) and weights named by
    `train.init_skip` keep their initialisation."""
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, run.cfg, Path(path))
    skip = tuple(run.cfg.train.init_skip)
    state = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()
             if not (skip and k.startswith(skip))}
    missing, unexpected = run.core.load_state_dict(state, strict=False)
    fresh = ("student.vocab.", "student.vocab_mix", "student.vocab_gate.") + skip
    if unexpected or any(k.startswith("student.") and not k.startswith(fresh) for k in missing):
        raise ValueError(f"train.init_from={path}: its weights do not fit this model "
                         f"({', '.join((unexpected or [k for k in missing if k.startswith('student.') and not k.startswith(fresh)])[:3])} ...)")


def save(run: Run, metrics: dict | None = None) -> None:
    """Write <out_dir>/last.pt (rank 0 only), with the config that rebuilds the model."""
    if not run.main:
        return
    record = model_record(run.cfg.to_dict(), run.core.state_dict(), run.vocabulary, run.text_cache,
                          run.teacher.embed_dim, run.cfg.train.gamma, run.teacher.fingerprint(),
                          run.train_set.info.name, run.state["step"], metrics)
    save_checkpoint(training_checkpoint(record, run.optimizer.state_dict(), run.scheduler.state_dict(),
                                        run.scaler.state_dict(), rng_state()), run.out / "last.pt")


def validate(run: Run, log: MetricsLog, verbose: bool) -> dict:
    """Score the student on each labelled source's val split with the configured gamma; logged and returned.

    Returns the primary dataset's summary; with more datasets, their summaries too under 'datasets' (by name)
    and in the log as val/<name>/<metric>."""
    cfg = run.cfg
    sets = [run.val_set] + [v for v in run.sources.vals[1:] if v is not None]
    summaries = {}
    for i, folder in enumerate(sets):
        classes = list(folder.info.classes)
        text = run.text_all if i == 0 else torch.stack([run.text_cache[c] for c in classes])
        m = evaluate(run.core.student, folder, text, unseen_bias(classes, run.vocabulary, cfg.train.gamma),
                     cfg.student.logit_scale, cfg.data.eval_size, rank=run.rank, world=run.world, device=run.device,
                     progress=verbose, limit=cfg.train.val_limit,
                     unseen=torch.tensor(outside_vocabulary(classes, run.vocabulary)))
        prefix = "val/" if i == 0 else f"val/{folder.info.name}/"
        log.write({"step": run.state["step"], **{f"{prefix}{k}": v for k, v in m.items() if k != "per_class"}})
        if run.main and verbose:
            tqdm.write(f"step {run.state['step']} {folder.info.name}: " +
                       " ".join(f"{k} {m[k]:.1f}" for k in ("pAcc", "mIoU(S)", "mIoU(U)", "hIoU")))
        summaries[i if i == 0 else folder.info.name] = m
    first = summaries.pop(0)
    return {**first, "datasets": summaries} if summaries else first


def make_loader(run: Run) -> tuple[EpochSampler | MixtureSampler, DataLoader]:
    """This rank's sampler (from the run's current step) and DataLoader; CPU batches, pinned for a GPU run.

    One source: `EpochSampler` over its trained indices. Several: `MixtureSampler` mixes them by weight."""
    cfg, src = run.cfg, run.sources
    parts = [TrainDataset(f, cfg.data, cfg.train.seed, own, k, src.vocabulary)
             for k, (f, own) in enumerate(zip(src.folders, src.own))]
    if len(parts) == 1:
        dataset = parts[0]
        sampler = EpochSampler(len(src.indices[0]), cfg.train.batch_size, cfg.train.seed, run.rank, run.world,
                               start=run.state["step"], indices=src.indices[0])
    else:
        dataset = MixedDataset(parts)
        sampler = MixtureSampler(src.indices, src.weights, cfg.train.batch_size, cfg.train.seed, run.rank, run.world,
                                 start=run.state["step"])
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.data.num_workers,
                        persistent_workers=cfg.data.num_workers > 0, pin_memory=run.device.type == "cuda")
    return sampler, loader


def train(cfg: Config, resume: str | None = None, verbose: bool = True) -> dict:
    """Train the student. Returns the final validation metrics (rank 0; {} elsewhere)."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    main = launch_rank() == 0  # the process group starts later (build_run); torchrun has set RANK already
    train_set, val_set, ckpt = check_inputs(cfg, resume, verbose, main)
    run = build_run(cfg, train_set, val_set, verbose)
    if ckpt is not None:
        restore(run, ckpt)
    elif cfg.train.init_from:
        initialise(run, cfg.train.init_from)
    cuda = run.device.type == "cuda"
    model = DistributedDataParallel(run.core, device_ids=[run.device.index] if cuda else None) if run.world > 1 else run.core
    model.train()
    if run.main:
        run.out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run.out / "config.yaml")
    log = MetricsLog(run.out, run.main)
    log.keep_until(run.state["step"])
    sampler, loader = make_loader(run)
    batches = iter(loader)

    state = run.state
    end = cfg.train.stop_at if 0 < cfg.train.stop_at < cfg.train.iters else cfg.train.iters
    metrics: dict = {}
    bar = tqdm(total=end, initial=state["step"], desc="train", disable=not (verbose and run.main), dynamic_ncols=True)
    while state["step"] < end:
        # Run to the next event (validation, checkpoint, end of epoch, end of run).
        marks = [end, (state["step"] // sampler.per_epoch + 1) * sampler.per_epoch]
        for every in (cfg.train.val_every, cfg.train.ckpt_every):
            if every > 0:
                marks.append((state["step"] // every + 1) * every)
        run_steps(model, run.source, batches, run.optimizer, run.scheduler, cfg, state, min(marks) - state["step"],
                  log, bar, run.device, run.scaler)
        at_end = state["step"] >= cfg.train.iters
        if (cfg.train.val_every > 0 and state["step"] % cfg.train.val_every == 0) or at_end:
            metrics = validate(run, log, verbose)
        if (cfg.train.ckpt_every > 0 and state["step"] % cfg.train.ckpt_every == 0) or state["step"] >= end:
            save(run, metrics)
    bar.close()
    if run.world > 1:
        dist.barrier()
    return metrics if run.main else {}


def dry_run(cfg: Config, verbose: bool = True) -> dict:
    """Check a config end to end on the CPU before renting GPUs: its data, teacher and student at their real
    sizes, step 1 and a checkpoint, then a resume, step 2, one validation on 2 val images and a checkpoint,
    all in <train.out_dir>/dry_run. Returns the validation metrics."""
    cfg = copy.deepcopy(cfg)
    cfg.train.device, cfg.train.iters, cfg.train.val_every, cfg.train.ckpt_every = "cpu", 2, 0, 1
    cfg.train.val_limit, cfg.train.log_every, cfg.train.stop_at = 2, 1, 1
    cfg.optim.warmup_iters = min(cfg.optim.warmup_iters, 1)
    cfg.train.out_dir = str(Path(cfg.train.out_dir) / "dry_run")
    train(cfg, verbose=verbose)
    cfg.train.stop_at = 0
    return train(cfg, resume="auto", verbose=verbose)

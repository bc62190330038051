"""Device placement without a GPU: the `meta` device plays the GPU.

A tensor on `meta` has a shape and a dtype but no data, and any op that mixes it with a CPU
tensor raises "Tensor on device cpu is not on the expected device meta!" -- the same error
CUDA raises when a CPU batch meets GPU weights. So a run whose models are moved to `meta`
while the DataLoader still yields CPU tensors reproduces, on this CPU-only machine, the crash
of a `device: cuda` run at its first step. `DeviceProbe` adds a forward pre-hook on every
module that names the offending tensor (module, argument, device) instead of failing deep
inside an op, and can stop the step at a chosen module: meta tensors have no values, so
data-dependent code (K-Means, `int(count)`, `isfinite`) cannot run on them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import tiny_config
from clipteacher.train import distill
from clipteacher.train.engine import MetricsLog, build_run, check_inputs, evaluate, make_loader, run_steps
from clipteacher.train.teacher_cache import TeacherCache

META = torch.device("meta")
ROOT = Path(__file__).resolve().parents[1]


class Reached(Exception):
    """Raised by the probe at its stop module: every tensor got there on the right device."""


class DeviceProbe:
    """Within the block, every module's forward checks that its tensor inputs live where its weights live.

    stop: a module whose forward raises `Reached` once its inputs passed the check.
    """

    def __init__(self, stop: torch.nn.Module | None = None):
        self.stop, self.errors, self.checked = stop, [], 0

    def hook(self, module, args, kwargs=None):
        own = next(iter([*module.parameters(recurse=False), *module.buffers(recurse=False)]), None)
        own = own if own is not None else next(iter([*module.parameters(), *module.buffers()]), None)
        if own is not None:
            inputs = list(enumerate(args)) + list((kwargs or {}).items())
            for name, value in inputs:
                if isinstance(value, torch.Tensor) and value.device != own.device:
                    self.errors.append(f"{type(module).__name__} got input {name} ({tuple(value.shape)}) on "
                                       f"{value.device}, its weights are on {own.device}")
            self.checked += 1
        assert not self.errors, "; ".join(self.errors)
        if module is self.stop:
            raise Reached

    def __enter__(self):
        self.handle = torch.nn.modules.module.register_module_forward_pre_hook(self.hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def meta_run(tiny_data, tmp_path, **sections):
    """A run built on the CPU (text embeddings, teacher cache), then moved to the pretend GPU. A `zegclip` or
    `maskclip` section selects that method."""
    cfg = tiny_config(tiny_data, tmp_path / "run", **sections)
    cfg.method = "zegclip" if "zegclip" in sections else "maskclip_plus" if "maskclip" in sections else cfg.method
    train_set, val_set, _ = check_inputs(cfg, None, False, True)
    run = build_run(cfg, train_set, val_set, verbose=False)
    run.teacher.to(META)
    run.core.to(META)
    run.device = META
    return run


@pytest.mark.parametrize("mode", ["online", "cached", "vocab_head", "anchor"])
def test_training_step_sends_every_tensor_to_the_model_device(tiny_data, tmp_path, monkeypatch, mode):
    """vocab_head: the student's vocabulary head (its bank is filled on the CPU, then moved with the model);
    anchor: its frozen pretrained classifier (loss.anchor_weight) must move with the model too."""
    extra = {"student": {"vocab_topk": 4}, "loss": {"vocab_head_weight": 1.0}} if mode == "vocab_head" else {}
    if mode == "anchor":
        extra = {"student": {"vocab_topk": 4}, "loss": {"anchor_weight": 1.0}}
    run = meta_run(tiny_data, tmp_path, teacher={"mode": "online" if mode in ("vocab_head", "anchor") else mode},
                   **extra)
    if mode == "anchor":
        assert {p.device for p in run.core.anchor.parameters()} == {META}
    if mode == "vocab_head":  # the loss's own constants (the 1000 names) must move with the model too
        assert run.core.text_imagenet.shape[0] == 1000 and run.core.text_imagenet.device == META
    got = {}

    def pseudo_stand_in(dense, labels, valid, *args, **kwargs):
        # The real K-Means runs in numpy, which meta tensors cannot reach; keep the device contract only.
        got["pseudo"] = {dense.device, labels.device, valid.device}
        return labels.clone()

    monkeypatch.setattr(distill, "make_pseudo_labels", pseudo_stand_in)
    with DeviceProbe(stop=run.core) as probe, pytest.raises(Reached):
        run_steps(run.core, run.source, iter(make_loader(run)[1]), run.optimizer, run.scheduler, run.cfg, run.state,
                  1, MetricsLog(tmp_path, False), _NoBar(), run.device, run.scaler)
    assert probe.checked > (10 if mode != "cached" else 0)  # online: the teacher's modules were checked too
    assert got["pseudo"] == {META}


@torch.no_grad()
def test_teacher_cache_build_feeds_images_to_the_teacher_device(tiny_data, tmp_path):
    run = meta_run(tiny_data, tmp_path)
    run.teacher.fingerprint = lambda: "meta"  # the real one hashes weights, which meta tensors do not hold
    with DeviceProbe(stop=run.teacher), pytest.raises(Reached):
        TeacherCache(tmp_path / "cache", run.teacher, run.train_set, verbose=False)


def test_evaluation_sends_images_to_the_student_device(tiny_data, tmp_path):
    run = meta_run(tiny_data, tmp_path)
    bias = torch.zeros(len(run.text_all))
    with DeviceProbe(stop=run.core.student), pytest.raises(Reached):
        evaluate(run.core.student, run.val_set, run.text_all, bias, 20.0, 48, device=run.device, progress=False)


def test_segmenter_predicts_on_the_student_device(tiny_data, tmp_path):
    from clipteacher.predictor import Segmenter

    run = meta_run(tiny_data, tmp_path)
    seg = Segmenter(run.cfg, run.core.student, run.vocabulary, run.text_cache, 1.5)
    with DeviceProbe(stop=run.core.student), pytest.raises(Reached):
        seg.predict(np.zeros((40, 56, 3), np.uint8), ["sky", "cow"])


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kwargs):
        pass


@pytest.mark.parametrize("kind", ["voc", "context", "coco_stuff"])
def test_paper_config_dry_run(kind, tmp_path):
    """Each paper config runs end to end on the CPU: its own dataset layout, class list, templates and
    student backbone; 2 steps, a checkpoint, a resume, one validation. Reduced for CI: a tiny random CLIP and
    64-pixel crops (the full-size ViT-B/16 run is `training/run.py --dry-run`, README)."""
    from helpers import TINY_CLIP, make_official_layout
    from clipteacher.checkpoint import load_checkpoint
    from clipteacher.config import load_config
    from clipteacher.train.engine import dry_run

    root = make_official_layout(kind, tmp_path / kind)
    cfg = load_config(ROOT / "training" / "configs" / f"{kind}.yaml", [
        f"data.root={root}", f"train.out_dir={tmp_path / 'run'}", "data.crop_size=64", "data.base_size=64",
        "data.eval_size=64", "data.num_workers=0", "teacher.input_size=64", "student.pretrained=false",
        "train.threads=1"])
    assert cfg.train.device == "cuda"  # dry_run switches to the CPU itself
    cfg.teacher.clip_config = TINY_CLIP
    metrics = dry_run(cfg, verbose=False)
    assert {"pAcc", "mIoU(S)", "mIoU(U)", "hIoU"} <= set(metrics)
    ckpt = load_checkpoint(tmp_path / "run" / "dry_run" / "last.pt")
    assert ckpt["step"] == 2 and ckpt["config"]["student"]["backbone"] == cfg.student.backbone
    assert len(ckpt["text_cache"]) == {"voc": 20, "context": 59, "coco_stuff": 171}[kind]


def test_cuda_requested_without_a_gpu_is_one_line(tiny_data, tmp_path, capsys):
    import yaml
    from clipteacher.cli import train as cli

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_data, tmp_path / "out").to_dict()))
    assert cli.main(["--config", str(path), "--quiet", "train.device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.device=cuda" in err and len(err.splitlines()) == 1


def test_zegclip_step_and_evaluation_send_every_tensor_to_the_model_device(tiny_data, tmp_path):
    """ZegCLIP holds CLIP itself: no teacher pass, the batch and the class embeddings must meet it on its device."""
    run = meta_run(tiny_data, tmp_path, zegclip={"decoder_dim": 32, "decoder_heads": 4, "prompt_tokens": 3,
                                                  "trusty": True})
    assert run.cfg.method == "zegclip"
    with DeviceProbe(stop=run.core.student.encoder) as probe, pytest.raises(Reached):
        run_steps(run.core, run.source, iter(make_loader(run)[1]), run.optimizer, run.scheduler, run.cfg, run.state,
                  1, MetricsLog(tmp_path, False), _NoBar(), run.device, run.scaler)
    assert probe.checked >= 2  # the learner and the encoder
    bias = torch.zeros(len(run.text_all))
    with DeviceProbe(stop=run.core.student.encoder), pytest.raises(Reached):
        evaluate(run.core.student, run.val_set, run.text_all, bias, 20.0, 48, device=run.device, progress=False)


def test_maskclip_plus_pseudo_labels_and_loss_on_the_model_device(tiny_data, tmp_path, monkeypatch):
    run = meta_run(tiny_data, tmp_path, maskclip={"names": "dataset"},
                   loss={"glm_weight": 0, "ce_weight": 0, "gen_weight": 0, "focal_weight": 0, "dice_weight": 0})
    seen = {}

    def labels_stand_in(dense, text, temperature, denoise):
        seen["teacher"] = {dense.device, text.device}
        return torch.zeros(dense.shape[0], *dense.shape[2:], dtype=torch.long, device=dense.device)

    def loss_stand_in(logits, labels, pseudo, valid, ignore_index=255):
        seen["loss"] = {logits.device, labels.device, pseudo.device, valid.device}
        raise Reached

    # the student's other losses check label values, which meta tensors do not have
    monkeypatch.setattr(distill, "nel_loss", lambda *a, **k: {})
    monkeypatch.setattr(distill, "make_pseudo_labels", lambda dense, labels, *a, **k: labels.clone())
    monkeypatch.setattr(distill, "teacher_pseudo_labels", labels_stand_in)
    monkeypatch.setattr(distill, "maskclip_loss", loss_stand_in)
    with DeviceProbe(), pytest.raises(Reached):
        run_steps(run.core, run.source, iter(make_loader(run)[1]), run.optimizer, run.scheduler, run.cfg, run.state,
                  1, MetricsLog(tmp_path, False), _NoBar(), run.device, run.scaler)
    assert seen["teacher"] == {META} and seen["loss"] == {META}

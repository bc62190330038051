"""Checkpoints and model folders: the one place their dicts are built, written and read.

Two forms hold the same dict (`model_record`):
- a training checkpoint `.pt`: `torch.save` of plain types only (tensors, numbers, strings, lists, dicts),
  read back with `weights_only=True`, so a crafted file cannot run code; it also carries the optimiser,
  schedule and RNG state that a resume needs (`training_checkpoint`).
- a model folder (Hugging Face Hub style, what is shipped and shared): `model.safetensors` (the student's
  weights and the cached text embeddings, no code possible), `config.json` (the full config, vocabulary,
  gamma, cache names) and `README.md` (the model card). `save_model_folder` / `load_checkpoint(DIR)`.
`load_checkpoint` takes either, so every tool that reads a model takes both. Writes go to a temp file or
folder that is renamed at the end, so a crash never leaves a broken one.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "clipteacher-checkpoint-v1"
FOLDER_FORMAT = "clipteacher-model-v1"
REQUIRED = ("config", "model", "vocabulary", "text_cache", "embed_dim", "gamma")  # what inference needs
WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"  # a model folder's files
# optional: D float32 mean unit feature, its source, and whether bundles of this model serve the correction by default
# (chosen per model on the probe; absent = clipteacher.runtime.bundle.HUBNESS_DEFAULT)
REFERENCE = ("feature_mean", "feature_mean_reference", "hubness_default")
TEXT_PREFIX = "text_cache."  # safetensors keys of the cached text embeddings (one per name, in config.json's order)
# Checkpoints written before plain-type RNG state held numpy's generator state as an array; these
# constructors rebuild plain arrays and nothing else, so such files are still read by the safe loader.
LEGACY_NUMPY = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def model_record(config: dict, model: dict, vocabulary: list[str], text_cache: dict, embed_dim: int, gamma: float,
                 teacher_fingerprint: str, dataset: str = "", step: int = 0, metrics: dict | None = None) -> dict:
    """What every checkpoint holds (what inference needs, and where it came from).

    config: `Config.to_dict()`; model: state dict (keys `student.*` are the student's); text_cache: name -> D."""
    return {"config": config, "model": model, "vocabulary": list(vocabulary), "text_cache": dict(text_cache),
            "embed_dim": int(embed_dim), "gamma": float(gamma), "teacher_fingerprint": teacher_fingerprint,
            "dataset": dataset, "step": int(step), "metrics": metrics or {}}


def training_checkpoint(record: dict, optimizer: dict, scheduler: dict, scaler: dict, rng: dict) -> dict:
    """A `model_record` plus the state a resume needs."""
    return {**record, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler, "rng": rng}


def inference_copy(ckpt: dict, gamma: float | None = None, half: bool = False) -> dict:
    """The student's weights and what inference needs, without optimiser or other learned modules.

    gamma: set (in the record and its config) instead of the checkpoint's; half: floating tensors as float16
    (half the size; `Segmenter` reads them back as float32)."""
    small = (lambda t: t.half() if t.is_floating_point() else t) if half else (lambda t: t)
    gamma = ckpt["gamma"] if gamma is None else float(gamma)
    config = {**ckpt["config"], "train": {**ckpt["config"].get("train", {}), "gamma": gamma}}
    # the hubness reference (`clipteacher.export.bundle.feature_mean`) travels with the model when it has one
    reference = {k: ckpt[k] for k in REFERENCE if k in ckpt}
    return reference | model_record(config, {k: small(v) for k, v in ckpt["model"].items() if k.startswith("student.")},
                        ckpt["vocabulary"], {c: small(e) for c, e in ckpt["text_cache"].items()}, ckpt["embed_dim"],
                        gamma, ckpt.get("teacher_fingerprint", ""), ckpt.get("dataset", ""), ckpt.get("step", 0))


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write `state` (plain types only) to `path` atomically; temp files of killed writes are removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f"{path.name}.*.tmp"):  # left by a write that was killed (SIGKILL)
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _safe_load(path: Path) -> dict:
    # One read for every file: the allowed numpy constructors only rebuild plain arrays (LEGACY_NUMPY).
    with torch.serialization.safe_globals(LEGACY_NUMPY):
        return torch.load(path, map_location="cpu", weights_only=True)


def save_model_folder(ckpt: dict, folder: str | Path, card: str = "", half: bool = True,
                      replace: bool = False) -> Path:
    """Write the inference copy of `ckpt` as a model folder, built beside it and renamed into place.

    replace: swap out an existing model folder (else it must not exist)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not (replace and is_model_folder(folder)):
        raise FileExistsError(f"{folder} already exists" + ("" if replace else "; choose another folder"))
    slim = inference_copy(ckpt, half=half)
    names = list(slim["text_cache"])
    tensors = {k[len("student."):]: v.contiguous() for k, v in slim["model"].items()}
    tensors.update({f"{TEXT_PREFIX}{i}": slim["text_cache"][n].contiguous() for i, n in enumerate(names)})
    if "feature_mean" in slim:
        tensors["reference.feature_mean"] = slim["feature_mean"].float().contiguous()
    meta = {"format": FOLDER_FORMAT, **{k: v for k, v in slim.items() if k not in ("model", "text_cache", "feature_mean")},
            "text_cache_names": names}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": FOLDER_FORMAT})
        (tmp / CONFIG).write_text(json.dumps(meta, indent=1) + "\n")
        (tmp / CARD).write_text(card or f"# clipteacher model\n\nTrained on {slim['dataset']}; see {CONFIG}.\n")
        for f in (WEIGHTS, CONFIG, CARD):
            os.chmod(tmp / f, 0o644)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.rename(folder, old)
            os.rename(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def is_model_folder(path: str | Path) -> bool:
    return (Path(path) / CONFIG).is_file() and (Path(path) / WEIGHTS).is_file()


def _load_model_folder(folder: Path) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((folder / CONFIG).read_text())
        tensors = load_file(str(folder / WEIGHTS))
    except (OSError, ValueError, SafetensorError) as err:
        raise ValueError(f"{folder} is not a clipteacher model folder (could not be read: {type(err).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FOLDER_FORMAT:
        raise ValueError(f"{folder / CONFIG}: not a clipteacher model (expected format '{FOLDER_FORMAT}')")
    names = meta.pop("text_cache_names", None)
    meta.pop("format")
    if not isinstance(names, list) or any(f"{TEXT_PREFIX}{i}" not in tensors for i in range(len(names))):
        raise ValueError(f"model folder {folder} is incomplete: its text cache does not match {WEIGHTS}")
    text = {n: tensors.pop(f"{TEXT_PREFIX}{i}") for i, n in enumerate(names)}
    if "reference.feature_mean" in tensors:
        meta["feature_mean"] = tensors.pop("reference.feature_mean")
    return {"format": FORMAT, **meta, "model": {f"student.{k}": v for k, v in tensors.items()}, "text_cache": text}


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint (`.pt`, safe loader) or a model folder and check its format; one clear error for a
    missing, foreign or unsafe file."""
    path = Path(path)
    if path.is_dir():
        if not is_model_folder(path):
            raise FileNotFoundError(f"{path} is a folder without {WEIGHTS} and {CONFIG}: not a model folder")
        ckpt = _load_model_folder(path)
    elif not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    else:
        ckpt = _load_pt(path)
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict):
        raise ValueError(f"checkpoint {path} is incomplete: missing {', '.join(missing) or 'a config mapping'}")
    return ckpt


def _load_pt(path: Path) -> dict:
    try:
        ckpt = _safe_load(path)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        if found is None:
            raise ValueError(f"{path} is not a clipteacher checkpoint (could not be read: {type(err).__name__})") from None
        raise ValueError(f"{path} is not a clipteacher checkpoint: it holds Python objects ({found.group(1)}) "
                         f"that the safe loader refuses (they could run code)") from None
    except Exception as err:  # noqa: BLE001 - zip/format errors vary
        raise ValueError(f"{path} is not a clipteacher checkpoint (could not be read: {type(err).__name__})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"{path} is not a clipteacher checkpoint (expected format '{FORMAT}')")
    return ckpt


def rng_state() -> dict:
    """Every RNG a training step draws from, as plain types (tensors, ints, floats, tuples)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()` (or the numpy tuple of checkpoints written before it was plain)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    if isinstance(n, dict):
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    np.random.set_state(n)
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])

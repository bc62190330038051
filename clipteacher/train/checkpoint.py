"""Checkpoints: plain types only (tensors, numbers, strings, lists, dicts), read with torch's safe loader.

A checkpoint is a dict saved with `torch.save`; `load_checkpoint` reads it with `weights_only=True`, so a
crafted file (people download checkpoints) cannot run code: any other Python object is refused with
one line. Writes go to a temp file that is renamed at the end, so a crash never leaves a broken one.
"""
from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

FORMAT = "clipteacher-checkpoint-v1"
REQUIRED = ("config", "model", "vocabulary", "text_cache", "embed_dim", "gamma")  # what inference needs
# Checkpoints written before plain-type RNG state held numpy's generator state as an array; these
# constructors rebuild plain arrays and nothing else, so such files are still read by the safe loader.
LEGACY_NUMPY = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


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


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint with the safe loader and check its format; one clear error for a missing,
    foreign or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
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
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing or not isinstance(ckpt["config"], dict):
        raise ValueError(f"checkpoint {path} is incomplete: missing {', '.join(missing) or 'a config mapping'}")
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

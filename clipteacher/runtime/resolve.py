"""Which bundle to serve: --bundle DIR, or bundles/default built from the default model (torch-free).

The app and `clipteacher-predict` both call `resolve_bundle`. Building bundles/default runs
`clipteacher-export` in a subprocess, so torch never enters the serving process.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from clipteacher.io import model_digest

ROOT = Path(__file__).resolve().parents[2]  # the repository checkout (clipteacher is installed editable)

DEFAULT_BUNDLE = ROOT / "bundles" / "default"
DEFAULT_CHECKPOINT = ROOT / "assets" / "default"  # the default model folder (clipteacher.checkpoint)


class StartupError(RuntimeError):
    """The app cannot start; the message says why and what to do."""


def build_default_bundle(checkpoint: Path | None = None, out: Path | None = None) -> Path:
    """Export `checkpoint` to `out` with `python -m clipteacher.cli.export` in a subprocess (once; torch stays
    out of this process).

    Defaults are read at call time (DEFAULT_CHECKPOINT, DEFAULT_BUNDLE), so they can be redirected.
    """
    checkpoint = DEFAULT_CHECKPOINT if checkpoint is None else checkpoint
    out = DEFAULT_BUNDLE if out is None else out
    if not checkpoint.exists():
        raise StartupError(f"no bundle at {out} and no default checkpoint at {checkpoint}. Train and export a model "
                           f"(python training/run.py --config training/configs/msrc21.yaml, then python export/run.py "
                           f"--checkpoint runs/msrc21/last.pt --out {out}) or pass --bundle DIR")
    print(f"building the bundle {out} from {checkpoint} (once) ...", flush=True)
    res = subprocess.run([sys.executable, "-m", "clipteacher.cli.export", "--checkpoint", str(checkpoint),
                          "--out", str(out)], capture_output=True, text=True)
    if res.returncode != 0:
        lines = (res.stderr or res.stdout).strip().splitlines() or [f"exit code {res.returncode}"]
        raise StartupError(f"building {out} from {checkpoint} failed: {lines[-1]}")
    return out


def resolve_bundle(folder: str | None) -> Path:
    if folder:
        path = Path(folder)
        if not (path / "bundle.json").is_file():
            raise StartupError(f"--bundle {folder}: not a bundle folder (no bundle.json); make one with "
                               f"python export/run.py --checkpoint CKPT --out {folder}")
        return path
    if (DEFAULT_BUNDLE / "bundle.json").is_file():
        if not DEFAULT_CHECKPOINT.exists() or built_from(DEFAULT_BUNDLE) == model_digest(DEFAULT_CHECKPOINT):
            return DEFAULT_BUNDLE
        # The default model changed (a pull or a new release): rebuild beside the old bundle, then swap.
        print(f"the default model {DEFAULT_CHECKPOINT} is not the one {DEFAULT_BUNDLE} was built from", flush=True)
        fresh = DEFAULT_BUNDLE.with_name(DEFAULT_BUNDLE.name + ".rebuild")
        shutil.rmtree(fresh, ignore_errors=True)
        build_default_bundle(DEFAULT_CHECKPOINT, fresh)
        old = DEFAULT_BUNDLE.with_name(DEFAULT_BUNDLE.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(DEFAULT_BUNDLE, old)
        os.replace(fresh, DEFAULT_BUNDLE)
        shutil.rmtree(old, ignore_errors=True)
        return DEFAULT_BUNDLE
    return build_default_bundle()


def built_from(bundle: Path) -> str | None:
    """`model_digest` of the model a bundle was exported from (None for bundles that did not record it)."""
    try:
        return json.loads((bundle / "bundle.json").read_text())["source"].get("checkpoint_sha256")
    except (OSError, ValueError, KeyError, AttributeError):
        return None

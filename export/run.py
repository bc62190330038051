"""Export a trained checkpoint to an ONNX bundle for the app (`export.runtime.Bundle` loads it).

    python export/run.py --checkpoint runs/msrc21/last.pt --out bundles/msrc21 [--int8] [--fp16]

Bad input (missing or foreign checkpoint, existing output folder, unknown teacher kind,
teacher weights not on this machine) stops with one line and leaves nothing behind.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (last.pt)")
    parser.add_argument("--out", required=True, help="bundle folder to create (must not exist)")
    parser.add_argument("--int8", action="store_true", help="also write student.int8.onnx (static int8, CPU)")
    parser.add_argument("--fp16", action="store_true", help="also write student.fp16.onnx (GPU)")
    args = parser.parse_args(argv)

    from training.config import ConfigError
    from training.teachers import TeacherWeightsError

    try:
        from export.bundle import export_bundle  # heavy imports (torch, onnx) after argument parsing

        export_bundle(args.checkpoint, args.out, int8=args.int8, fp16=args.fp16)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, TeacherWeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

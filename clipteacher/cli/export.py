"""Export a trained checkpoint to an ONNX bundle for the app (`clipteacher.runtime.Bundle` loads it).

    clipteacher-export --checkpoint runs/msrc21/last.pt --out bundles/msrc21 [--int8] [--fp16]

Bad input (missing or foreign checkpoint, existing output folder, unknown teacher kind,
teacher weights not on this machine) stops with one line and leaves nothing behind.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipteacher-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="training checkpoint (last.pt)")
    parser.add_argument("--out", required=True, help="bundle folder to create (must not exist)")
    parser.add_argument("--int8", action="store_true", help="also write student.int8.onnx (static int8, CPU)")
    parser.add_argument("--fp16", action="store_true", help="also write student.fp16.onnx (GPU)")
    args = parser.parse_args(argv)

    from clipteacher.models.weights import WeightsError
    from clipteacher.train.config import ConfigError

    try:
        from clipteacher.export.bundle import export_bundle  # heavy imports (torch, onnx) after argument parsing

        export_bundle(args.checkpoint, args.out, int8=args.int8, fp16=args.fp16)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Export a trained checkpoint to an ONNX bundle for the app (`clipteacher.runtime.Bundle` loads it).

    clipteacher-export --checkpoint runs/msrc21/last.pt --out bundles/msrc21 [--int8] [--fp16]
    clipteacher-export --checkpoint runs/msrc21/last.pt --out bundles/msrc21 --int8 --calibration photos/

    clipteacher-export --bundle bundles/msrc21 --triton triton_repo [--triton-instances cpu]
    clipteacher-export --checkpoint runs/msrc21/last.pt --out bundles/msrc21 --triton triton_repo

--triton writes a Triton Inference Server model repository of the bundle (clipteacher/export/triton.py)
and checks every config.pbtxt against its ONNX graph (with tritonclient's model-config protobuf when
installed).

--int8 calibrates on the checkpoint's training split by default (random images when it is not on
this machine; bundle.json's notes say which) and quantises only the head's stride-4 embed convolution (the rest stays fp32)
(docs/DESIGN.md#int8-student).

Bad input (missing or foreign checkpoint, existing output folder, unknown teacher kind,
teacher weights not on this machine) stops with one line and leaves nothing behind.
"""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipteacher-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="training checkpoint (last.pt) or model folder")
    parser.add_argument("--out", help="bundle folder to create (must not exist)")
    parser.add_argument("--bundle", help="an exported bundle to convert (with --triton; instead of --checkpoint)")
    parser.add_argument("--triton", metavar="DIR", help="also write a Triton model repository here (must not exist)")
    parser.add_argument("--triton-instances", choices=["gpu", "cpu"], default="gpu",
                        help="Triton instance_group kind (default gpu)")
    parser.add_argument("--triton-count", type=int, default=1, help="Triton instances per model (default 1)")
    parser.add_argument("--triton-precision", choices=["fp32", "int8", "fp16"], default="fp32",
                        help="student graph the repository serves (default fp32)")
    parser.add_argument("--int8", action="store_true", help="also write student.int8.onnx (static int8, CPU)")
    parser.add_argument("--calibration", nargs="+", metavar="IMAGES",
                        help="int8 calibration images: files, folders or patterns (default: the checkpoint's "
                             "training split; random images when it is not on this machine)")
    parser.add_argument("--calibration-images", type=int, metavar="N",
                        help="int8 calibration: use at most N of them, evenly spaced (default 32)")
    parser.add_argument("--fp16", action="store_true", help="also write student.fp16.onnx (GPU)")
    args = parser.parse_args(argv)
    if args.bundle:
        if args.checkpoint or args.out or not args.triton:
            parser.error("--bundle converts an existing bundle: give it with --triton DIR only")
        return write_triton(args)
    if not (args.checkpoint and args.out):
        parser.error("--checkpoint and --out are required (or --bundle with --triton)")
    if (args.calibration or args.calibration_images is not None) and not args.int8:
        parser.error("--calibration and --calibration-images apply to --int8 only")
    if args.calibration_images is not None and args.calibration_images < 1:
        parser.error("--calibration-images must be at least 1")

    from clipteacher.models.weights import WeightsError
    from clipteacher.config import ConfigError

    try:
        # heavy imports (torch, onnx) after argument parsing
        from clipteacher.export.bundle import CALIBRATION_IMAGES, export_bundle

        export_bundle(args.checkpoint, args.out, int8=args.int8, fp16=args.fp16, calibration=args.calibration,
                      calibration_count=args.calibration_images or CALIBRATION_IMAGES)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.triton:
        args.bundle = args.out
        return write_triton(args)
    return 0


def write_triton(args) -> int:
    from clipteacher.export.triton import check_repository, write_repository

    try:
        repo = write_repository(args.bundle, args.triton, args.triton_instances, args.triton_count,
                                args.triton_precision)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        models = check_repository(repo)
        print(f"Triton repository {repo}: {', '.join(models)} (config.pbtxt checked against the ONNX graphs)")
    except ImportError:
        print(f"Triton repository {repo} written; pip install tritonclient[grpc] to check its config.pbtxt files")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"serve it with: tritonserver --model-repository {repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

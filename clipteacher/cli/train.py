"""Train the zero-shot student.

    python training/run.py --config training/configs/msrc21.yaml [key.sub=value ...] [--resume [CKPT]]
    torchrun --nproc_per_node=N training/run.py --config ...
    python training/run.py --config training/configs/voc.yaml --dry-run   # CPU check before renting GPUs

Bad input (missing data, unknown config key, incompatible checkpoint) stops with one line
before any training starts.
"""
from __future__ import annotations

import argparse
import os
import sys

from clipteacher.config import ConfigError, load_config
from clipteacher.io import DatasetError
from clipteacher.models.weights import WeightsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipteacher-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (fields of clipteacher/config.py)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue from a checkpoint (default: <train.out_dir>/last.pt)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU, with the config's data and model sizes: 2 steps, a checkpoint, a resume and "
                             "one validation on 2 val images, in <train.out_dir>/dry_run (add "
                             "teacher.clip_pretrained=random when the CLIP weights are not on this machine)")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.iters=200")
    args = parser.parse_args(argv)
    if args.resume not in (None, "auto") and "=" in args.resume and not os.path.exists(args.resume):
        # `--resume key=value`: argparse hands the optional value the first override
        args.overrides.insert(0, args.resume)
        args.resume = "auto"
    try:
        cfg = load_config(args.config, args.overrides)
        from clipteacher.train.engine import dry_run, train  # heavy imports after the config is known to be valid

        if args.dry_run and args.resume:
            raise ConfigError("--dry-run makes its own checkpoint and resumes it; drop --resume")
        metrics = dry_run(cfg, not args.quiet) if args.dry_run else train(cfg, resume=args.resume, verbose=not args.quiet)
    except (ConfigError, DatasetError, FileNotFoundError, ValueError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if metrics:
        print(" ".join(f"{k} {metrics[k]:.2f}" for k in ("pAcc", "mIoU(S)", "mIoU(U)", "hIoU")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

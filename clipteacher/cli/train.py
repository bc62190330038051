"""Train the zero-shot student.

    python training/run.py --config training/configs/msrc21.yaml [key.sub=value ...] [--resume [CKPT]]
    torchrun --nproc_per_node=N training/run.py --config ...

Bad input (missing data, unknown config key, incompatible checkpoint) stops with one line
before any training starts.
"""
from __future__ import annotations

import argparse
import sys

from clipteacher.train.config import ConfigError, load_config
from clipteacher.io import DatasetError
from clipteacher.models.weights import WeightsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="clipteacher-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config file (fields of clipteacher/train/config.py)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="continue from a checkpoint (default: <train.out_dir>/last.pt)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.iters=200")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        from clipteacher.train.engine import train  # heavy imports after the config is known to be valid

        metrics = train(cfg, resume=args.resume, verbose=not args.quiet)
    except (ConfigError, DatasetError, FileNotFoundError, ValueError, WeightsError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if metrics:
        print(" ".join(f"{k} {metrics[k]:.2f}" for k in ("pAcc", "mIoU(S)", "mIoU(U)", "hIoU")))
    return 0


if __name__ == "__main__":
    sys.exit(main())

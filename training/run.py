"""Entry point; the same as `clipteacher-train`. The code is in clipteacher/cli/train.py."""
import sys

from clipteacher.cli.train import main

if __name__ == "__main__":
    sys.exit(main())

"""Entry point; the same as `clipteacher-eval`. The code is in clipteacher/cli/evaluate.py."""
import sys

from clipteacher.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())

"""Entry point; the same as `clipteacher-pseudo`. The code is in clipteacher/cli/pseudo_labels.py."""
import sys

from clipteacher.cli.pseudo_labels import main

if __name__ == "__main__":
    sys.exit(main())

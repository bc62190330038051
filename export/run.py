"""Entry point; the same as `clipteacher-export`. The code is in clipteacher/cli/export.py."""
import sys

from clipteacher.cli.export import main

if __name__ == "__main__":
    sys.exit(main())

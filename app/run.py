"""Entry point; the same as `clipteacher-app`. The code is in clipteacher/cli/app.py."""
import sys

from clipteacher.cli.app import main

if __name__ == "__main__":
    sys.exit(main())

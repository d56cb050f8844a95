"""Entry point PyInstaller freezes: the `moat` multi-call program."""

import sys

from moat.cli import main

if __name__ == "__main__":
    sys.exit(main())

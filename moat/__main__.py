import sys

from moat.cli import main

sys.exit(main())

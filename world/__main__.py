"""`python -m world`: generate the embedded instruction world (see world/cli.py)."""

import sys

from world.cli import main

sys.exit(main())

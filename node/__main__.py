"""``python -m node``: the same command line as ``triage-node``."""

import sys

from node.cli import main

sys.exit(main())

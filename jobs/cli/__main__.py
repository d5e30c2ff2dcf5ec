"""``python -m jobs.cli COMMAND ...``: what the ``salgl`` script runs (a submitted Ray job uses it)."""

import sys

from jobs.cli import main

sys.exit(main())

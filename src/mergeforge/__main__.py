"""``python -m mergeforge`` runs the command line."""

import sys

from mergeforge.cli import main

sys.exit(main())

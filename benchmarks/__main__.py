"""`python -m benchmarks [--help]`: see benchmarks.cli."""

import sys

from benchmarks.cli import main

sys.exit(main())

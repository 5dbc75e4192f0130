"""`python -m reproduce`: runs experiments at full schedule and writes the results table."""

import sys

from reproduce.runner import main

sys.exit(main())

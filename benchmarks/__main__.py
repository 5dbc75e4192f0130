"""`python -m benchmarks [--help]`: see benchmarks.cli."""

import sys

from cnn_jax import xla_cpu

xla_cpu.keep_freed_memory()  # As launch.py does, before JAX loads (CNN_JAX_MALLOC=0: not).

from benchmarks.cli import main  # noqa: E402  (JAX loads here)

sys.exit(main())

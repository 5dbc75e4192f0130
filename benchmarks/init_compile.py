"""`python -m benchmarks.init_compile [--models a,b]`: the initialiser's compile on the CPU.

For each registry model (one per network; 32x32x3 input, 10 classes), in one process:
seconds to compile and run `model.init` under `jax.jit` with XLA's default options, then
with `cnn_jax.steps.INIT_CPU_COMPILER_OPTIONS`, and whether the two give the same bits.
The default compile runs first, so the second cannot borrow its work.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import device_checks
from cnn_jax import steps, xla_cpu
from cnn_jax.models import MODELS


def seconds(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--models', help='comma-separated registry names (default: all)')
    args = parser.parse_args()
    xla_cpu.use_recommended_flags()  # As launch.py runs.
    names = [n for n, same in device_checks.registry_models().items() if not same]
    if args.models:
        names = args.models.split(',')
    rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
    x = jnp.zeros((1, 32, 32, 3), jnp.float32)
    print('| model | default compile + run, s | level-1 compile + run, s | same bits |')
    print('|---|---|---|---|')
    for name in names:
        init = functools.partial(MODELS[name](num_classes=10).init, train=False)
        slow, want = seconds(jax.jit(init), rngs, x)
        options = steps.INIT_CPU_COMPILER_OPTIONS
        fast, got = seconds(jax.jit(init, compiler_options=options), rngs, x)
        same = all(
            np.array_equal(np.asarray(a), np.asarray(b))
            for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True)
        )
        print(f'| {name} | {slow:.1f} | {fast:.1f} | {"yes" if same else "NO"} |', flush=True)


if __name__ == '__main__':
    main()

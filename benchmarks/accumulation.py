"""Gradient accumulation's train step on this machine: one batch of B against k micro-batches
of B/k, with `canonical_conv`'s gradients (today) and with lax's (XLA:CPU ran those as naive
loops inside the micro-batches' loop), interleaved in one process.

    python -m benchmarks.accumulation --models cifar_cnn3:64:4,resnet20:128:4 --rounds 3

Prints each model's ms per optimiser step and XLA's scratch memory for the step (MB).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax import steps
from cnn_jax.models import create_model, layers
from configs import default


def compiled_step(model_name: str, batch: int, accum: int, canonical: bool):
    """(compiled step, state, batch) at 32x32x3, momentum SGD; `canonical` False forces lax's
    convolution gradients on CPU."""
    wins = layers.canonical_conv_wins
    layers.canonical_conv_wins = lambda platform: canonical and wins(platform)
    try:
        c = default.get_config()
        c.model, c.optimizer = model_name, 'momentum'
        c.batch_size, c.grad_accum_steps = batch // accum, accum
        state = steps.create_train_state(
            c, create_model(model_name, 10), (32, 32, 3), jax.random.key(0), 100
        )
        options = steps.StepOptions.from_config(c)
        step = jax.jit(lambda s, b: steps.train_step(s, b, jax.random.key(0), options=options))
        rng = np.random.default_rng(0)
        data = {
            'image': jnp.asarray(rng.normal(size=(batch, 32, 32, 3)), jnp.float32),
            'label': jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
        }
        return step.lower(state, data).compile(), state, data
    finally:
        layers.canonical_conv_wins = wins


def ms_per_step(compiled, state, data, n: int) -> float:
    jax.block_until_ready(compiled(state, data))
    t = time.perf_counter()
    for _ in range(n):
        out = compiled(state, data)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--models', default='cifar_cnn3:64:4', help='name:batch:k,...')
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--steps', type=int, default=5, help='timed steps per measurement')
    args = parser.parse_args()
    for spec in args.models.split(','):
        name, batch, k = spec.split(':')
        runs = {
            f'batch {batch}': compiled_step(name, int(batch), 1, True),
            f'{int(batch) // int(k)} x {k}': compiled_step(name, int(batch), int(k), True),
            f'{int(batch) // int(k)} x {k}, lax grads': compiled_step(
                name, int(batch), int(k), False
            ),
        }
        for label, (compiled, _, _) in runs.items():
            mb = compiled.memory_analysis().temp_size_in_bytes / 1e6
            print(f'{name} {label}: scratch {mb:.1f} MB', flush=True)
        for r in range(args.rounds):
            times = {label: ms_per_step(*run, args.steps) for label, run in runs.items()}
            print(
                f'{name} round {r + 1}: ' + ', '.join(f'{k} {v:.1f} ms' for k, v in times.items())
            )


if __name__ == '__main__':
    main()

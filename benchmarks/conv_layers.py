"""Each convolution of a model timed alone, in cnn_jax's path and in torch eager.

`python -m benchmarks.conv_layers --model resnet18` builds every convolution of the model
at its benchmark case's batch and shapes as an `nn.Conv` with `layers.FastConv` (the path
the model's step runs: oneDNN where installed, the matrix product on 2x2 maps), times its
forward plus the gradients the step needs (no input gradient for the first layer, whose
input is the data), and torch's `conv2d` forward + backward on the same arrays, windows
interleaved, and prints a markdown table of wall milliseconds per call and their sums
weighted by count. Set against `python -m benchmarks.profile_step`, it tells a step's cost
in context from the convolutions' own.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cnn_jax.xla_cpu import keep_freed_memory, use_recommended_flags

# (count, map size, in, out, kernel, stride, padding, input gradient) per convolution.
Conv = tuple[int, int, int, int, int, int, int, bool]
CONVS: dict[str, tuple[Conv, ...]] = {
    'resnet18': (  # At 64x64 input (benchmarks.cases), batch 64.
        (1, 64, 3, 64, 7, 2, 3, False),
        (4, 16, 64, 64, 3, 1, 1, True),
        (1, 16, 64, 128, 3, 2, 1, True),
        (1, 16, 64, 128, 1, 2, 0, True),
        (3, 8, 128, 128, 3, 1, 1, True),
        (1, 8, 128, 256, 3, 2, 1, True),
        (1, 8, 128, 256, 1, 2, 0, True),
        (3, 4, 256, 256, 3, 1, 1, True),
        (1, 4, 256, 512, 3, 2, 1, True),
        (1, 4, 256, 512, 1, 2, 0, True),
        (3, 2, 512, 512, 3, 1, 1, True),
    ),
    'resnet20': (  # Batch 128.
        (1, 32, 3, 16, 3, 1, 1, False),
        (6, 32, 16, 16, 3, 1, 1, True),
        (1, 32, 16, 32, 3, 2, 1, True),
        (1, 32, 16, 32, 1, 2, 0, True),
        (5, 16, 32, 32, 3, 1, 1, True),
        (1, 16, 32, 64, 3, 2, 1, True),
        (1, 16, 32, 64, 1, 2, 0, True),
        (5, 8, 64, 64, 3, 1, 1, True),
    ),
}


def conv_calls(conv: Conv, batch: int) -> dict[str, Callable[[], Any]]:
    """'cnn_jax' and 'torch' calls of one convolution's forward and gradients."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import torch

    from cnn_jax.models import layers

    _, size, cin, cout, k, s, p, input_grad = conv
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, cin)).astype(np.float32)
    w = (rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
    out = (size + 2 * p - k) // s + 1
    g = rng.normal(size=(batch, out, out, cout)).astype(np.float32)
    module = nn.Conv(
        cout, (k, k), s, ((p, p), (p, p)), use_bias=False, conv_general_dilated_cls=layers.FastConv
    )
    variables, xj, gj = {'params': {'kernel': jnp.asarray(w)}}, jnp.asarray(x), jnp.asarray(g)
    wrt = (0, 1) if input_grad else 0  # (variables, x)
    step = jax.jit(jax.grad(lambda v, x: jnp.vdot(module.apply(v, x), gj), argnums=wrt))

    def channels_last(a: np.ndarray, order: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor(a.transpose(order)).contiguous(memory_format=torch.channels_last)

    tx = channels_last(x, (0, 3, 1, 2)).requires_grad_(input_grad)
    tw = channels_last(w, (3, 2, 0, 1)).requires_grad_(True)
    tg = channels_last(g, (0, 3, 1, 2))

    def torch_call() -> None:
        torch.nn.functional.conv2d(tx, tw, stride=s, padding=p).backward(tg)
        tx.grad = tw.grad = None

    return {'cnn_jax': lambda: jax.block_until_ready(step(variables, xj)), 'torch': torch_call}


def _wall_ms(call: Callable[[], Any], reps: int) -> float:
    start = time.perf_counter()
    for _ in range(reps):
        call()
    return (time.perf_counter() - start) / reps * 1e3


def conv_rows(model: str, batch: int, reps: int, rounds: int) -> list[str]:
    """Markdown rows: per convolution, median wall ms of `rounds` interleaved windows."""
    rows = ['| conv (count) | cnn_jax ms | torch ms |', '|---|---|---|']
    sums = dict.fromkeys(('cnn_jax', 'torch'), 0.0)
    for conv in CONVS[model]:
        count, size, cin, cout, k, s, _, input_grad = conv
        calls = conv_calls(conv, batch)
        for call in calls.values():
            call()
        ms = {name: [] for name in calls}
        for _ in range(rounds):
            for name, call in calls.items():
                ms[name].append(_wall_ms(call, reps))
        median = {name: float(np.median(v)) for name, v in ms.items()}
        for name, value in median.items():
            sums[name] += count * value
        grads = 'dW + dx' if input_grad else 'dW'
        rows.append(
            f'| {cin}->{cout} {k}x{k}/{s} at {size}x{size}, fwd + {grads} (x{count}) | '
            f'{median["cnn_jax"]:.1f} | {median["torch"]:.1f} |'
        )
    rows.append(f'| sum over the network | {sums["cnn_jax"]:.0f} | {sums["torch"]:.0f} |')
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--model', default='resnet18', choices=sorted(CONVS))
    parser.add_argument('--reps', type=int, default=5, help='calls per timed window')
    parser.add_argument('--rounds', type=int, default=5, help='interleaved windows')
    args = parser.parse_args(argv)
    keep_freed_memory()  # JAX has not loaded yet (imported lazily above).
    use_recommended_flags()
    from benchmarks.cases import CASES

    batch = CASES[args.model].batch_size
    print('\n'.join(conv_rows(args.model, batch, args.reps, args.rounds)))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

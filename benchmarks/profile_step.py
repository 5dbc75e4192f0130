"""Where a train step's time goes on the CPU, per op kind, for cnn_jax and torch eager.

`python -m benchmarks.profile_step --model resnet20` traces cnn_jax's compiled synthetic
train step (benchmarks.train_step.jax_runners) with jax.profiler and the same step in torch
eager with torch.profiler, and prints a markdown table of the time per op kind.

XLA:CPU hands convolutions to Eigen asynchronously, so the trace's convolution events are
only their dispatch; their cost is what remains of the executable's wall time after every
synchronous thunk (fusions, copies, dots, reductions), the row 'convolutions (rest)'.
Wall-clock figures: on a loaded machine read them as shares of the step, not as speeds.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

from cnn_jax.xla_cpu import use_recommended_flags

# Op kinds by HLO instruction name (XLA names fusions after their root or their kind).
_JAX_KINDS: tuple[tuple[str, str], ...] = (
    ('transpose', 'transposes and layout copies'),
    ('copy', 'transposes and layout copies'),
    ('convolution', 'convolution dispatch'),
    ('conv_general', 'convolution dispatch'),
    ('dot', 'dots (dense layer)'),
    ('reduce', 'reductions (BatchNorm statistics, loss, weight decay)'),
    ('select', 'ReLU masks / selects'),
    ('pad', 'pads and slices'),
    ('slice', 'pads and slices'),
)
_TORCH_KINDS: tuple[tuple[str, str], ...] = (
    ('convolution_backward', 'convolution backward (dW + dx)'),
    ('convolution', 'convolution forward'),
    ('batch_norm', 'BatchNorm (forward and backward)'),
    ('threshold_backward', 'ReLU backward'),
    ('relu', 'ReLU forward'),
    ('add', 'adds (residual, grad accumulation)'),
    ('sgd', 'optimizer'),
    ('mul', 'optimizer / elementwise'),
    ('addmm', 'dense layer'),
    ('mm', 'dense layer'),
)


def _kind(name: str, kinds: Sequence[tuple[str, str]], default: str) -> str:
    lowered = name.lower()
    for key, kind in kinds:
        if key in lowered:
            return kind
    return default


def jax_profile(model: str, steps: int) -> dict[str, float]:
    """Milliseconds per step by op kind, from a jax.profiler trace of `steps` steps."""
    import jax

    from benchmarks.cases import CASES
    from benchmarks.train_step import jax_runners

    runners, _ = jax_runners(CASES[model])
    run = runners['jax_synthetic']
    run(2)
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        run(steps)
        jax.profiler.stop_trace()
        path = sorted(glob.glob(os.path.join(tmp, '**', '*.xplane.pb'), recursive=True))[-1]
        data = jax.profiler.ProfileData.from_file(path)
    totals: dict[str, float] = collections.defaultdict(float)
    execute = 0.0
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if event.name.startswith('ThunkExecutor::Execute'):
                    execute += event.duration_ns
                elif 'hlo_op' in stats and not event.name.startswith('end:'):
                    kind = _kind(event.name, _JAX_KINDS, 'elementwise loop fusions')
                    totals[kind] += event.duration_ns
    totals['convolutions (rest)'] = execute - sum(totals.values())
    return {k: v / 1e6 / steps for k, v in totals.items()}


def torch_profile(model: str, steps: int) -> dict[str, float]:
    """Milliseconds per step by op kind (self CPU time of aten ops) in torch eager."""
    import torch

    from benchmarks.cases import CASES
    from benchmarks.train_step import torch_runners

    runners, _ = torch_runners(CASES[model], compile_model=False)
    run = runners['torch_eager']
    run(2)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(steps)
    totals: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        if not event.key.startswith('aten::'):
            continue
        kind = _kind(event.key, _TORCH_KINDS, 'other aten ops')
        totals[kind] += event.self_cpu_time_total
    return {k: v / 1e3 / steps for k, v in totals.items()}


# ResNet-20's convolutions at batch 128: (count, map size, in, out, kernel, stride).
RESNET20_CONVS: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 32, 3, 16, 3, 1),
    (6, 32, 16, 16, 3, 1),
    (1, 32, 16, 32, 3, 2),
    (1, 32, 16, 32, 1, 2),
    (5, 16, 32, 32, 3, 1),
    (1, 16, 32, 64, 3, 2),
    (1, 16, 32, 64, 1, 2),
    (5, 8, 64, 64, 3, 1),
)


def _cpu_ms(fn: Callable[[], Any], reps: int) -> float:
    """Process CPU milliseconds per call of `fn` (all threads; robust to other load)."""
    fn()
    start = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - start) / reps * 1e3


def jax_conv_calls(shape: tuple[int, ...], batch: int) -> dict[str, Callable[[], Any]]:
    """Jitted forward, weight-gradient and input-gradient calls of one lax convolution."""
    import jax
    from jax import lax

    _, size, cin, cout, k, s = shape
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, size, size, cin))
    w = jax.random.normal(key, (k, k, cin, cout)) * 0.1
    pad = ((k // 2, k // 2),) * 2

    def conv(x, w):
        return lax.conv_general_dilated(x, w, (s, s), pad, dimension_numbers=_NHWC)

    dy = jax.random.normal(key, conv(x, w).shape)
    fwd = jax.jit(conv)
    dw = jax.jit(lambda x, w, dy: jax.vjp(lambda w: conv(x, w), w)[1](dy)[0])
    dx = jax.jit(lambda x, w, dy: jax.vjp(lambda x: conv(x, w), x)[1](dy)[0])
    return {
        'forward': lambda: fwd(x, w).block_until_ready(),
        'weight grad': lambda: dw(x, w, dy).block_until_ready(),
        'input grad': lambda: dx(x, w, dy).block_until_ready(),
    }


def torch_conv_calls(shape: tuple[int, ...], batch: int) -> dict[str, Callable[[], Any]]:
    """torch's forward and backward (weight + input gradient) of the same convolution."""
    import torch

    _, size, cin, cout, k, s = shape
    conv = torch.nn.Conv2d(cin, cout, k, s, k // 2, bias=False).to(
        memory_format=torch.channels_last
    )
    x = torch.randn(batch, cin, size, size).contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    dy = torch.randn_like(conv(x))

    def forward() -> None:
        with torch.no_grad():
            conv(x)

    def backward() -> None:
        y = conv(x)
        y.backward(dy)

    return {'forward': forward, 'forward + backward': backward}


def layer_rows(batch: int, reps: int, with_torch: bool) -> list[str]:
    """Markdown rows: per convolution of ResNet-20, CPU ms of each part, JAX and torch."""
    rows = [
        '| conv (count) | jax fwd | jax dW | jax dx | torch fwd | torch fwd+bwd |',
        '|---|---|---|---|---|---|',
    ]
    sums = collections.Counter()
    for shape in RESNET20_CONVS:
        count, size, cin, cout, k, s = shape
        ms = {f'jax {k_}': _cpu_ms(f, reps) for k_, f in jax_conv_calls(shape, batch).items()}
        if with_torch:
            calls = torch_conv_calls(shape, batch)
            ms |= {f'torch {k_}': _cpu_ms(f, reps) for k_, f in calls.items()}
        for name, value in ms.items():
            sums[name] += count * value
        cells = ' | '.join(f'{ms.get(c, float("nan")):.1f}' for c in _LAYER_COLUMNS)
        rows.append(f'| {cin}->{cout} {k}x{k}/{s} at {size}x{size} (x{count}) | {cells} |')
    cells = ' | '.join(f'{sums.get(c, float("nan")):.0f}' for c in _LAYER_COLUMNS)
    rows.append(f'| sum over the network | {cells} |')
    return rows


_NHWC = ('NHWC', 'HWIO', 'NHWC')
_LAYER_COLUMNS = (
    'jax forward',
    'jax weight grad',
    'jax input grad',
    'torch forward',
    'torch forward + backward',
)


def step_cpu_ms(model: str, reps: int, rounds: int, with_torch: bool) -> dict[str, float]:
    """CPU ms per train step of cnn_jax's synthetic step and torch eager, interleaved."""
    from benchmarks.cases import CASES
    from benchmarks.train_step import jax_runners, torch_runners

    runners, _ = jax_runners(CASES[model])
    runs = {'cnn_jax': runners['jax_synthetic']}
    if with_torch:
        runs['torch eager'] = torch_runners(CASES[model], compile_model=False)[0]['torch_eager']
    totals = collections.Counter()
    for _ in range(rounds):
        for name, run in runs.items():
            totals[name] += _cpu_ms(lambda run=run: run(reps), 1) / reps
    return {name: value / rounds for name, value in totals.items()}


def table(title: str, ms: dict[str, float]) -> str:
    """A markdown table of `ms`, largest first, with each row's share of the total."""
    total = sum(ms.values())
    rows = [f'### {title}', '', '| op kind | ms / step | share |', '|---|---|---|']
    for kind, value in sorted(ms.items(), key=lambda kv: -kv[1]):
        rows.append(f'| {kind} | {value:.1f} | {value / total:.0%} |')
    rows.append(f'| total | {total:.1f} | 100% |')
    return '\n'.join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--model', default='resnet20')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--no-torch', action='store_true')
    parser.add_argument(
        '--cpu-time',
        action='store_true',
        help='CPU time per ResNet-20 conv part and per whole step instead of the trace',
    )
    args = parser.parse_args(argv)
    use_recommended_flags()
    # torch's OpenMP workers spin while idle, which process time would count as work.
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    if args.cpu_time:
        print('\n'.join(layer_rows(128, args.steps, not args.no_torch)))
        steps = step_cpu_ms(args.model, args.steps, 3, not args.no_torch)
        print()
        print('| whole step | CPU ms / step |')
        print('|---|---|')
        for name, value in steps.items():
            print(f'| {name} | {value:.0f} |')
        return 0
    print(table(f'cnn_jax, {args.model}', jax_profile(args.model, args.steps)))
    if not args.no_torch:
        print()
        print(table(f'torch eager, {args.model}', torch_profile(args.model, args.steps)))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

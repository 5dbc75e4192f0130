"""Where a train step's time goes on the CPU, per op kind, for cnn_jax and torch eager.

`python -m benchmarks.profile_step --model resnet20` traces cnn_jax's compiled synthetic
train step (benchmarks.train_step.jax_runners) with jax.profiler and the same step in torch
eager with torch.profiler, and prints a markdown table of the time per op kind.

cnn_jax's table splits the executable's wall time: XLA:CPU runs independent thunks on two
threads at once and splits large fusions across them, so each instant is shared evenly
among the ops running then, and instants of an execution where no op runs are the row
'no op running' (the thunk executor's own work and its waits; without oneDNN, also
Eigen's asynchronous convolutions, whose trace events are only their dispatch). torch's
rows are its ops' self CPU time on the calling thread. Wall-clock figures: on a loaded
machine read them as shares of the step, not as speeds.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from cnn_jax.xla_cpu import keep_freed_memory, use_recommended_flags

# Op kinds by HLO instruction name (XLA names fusions after their root or their kind).
_JAX_KINDS: tuple[tuple[str, str], ...] = (
    ('custom-call', 'oneDNN convolutions (custom calls)'),
    ('ffi_call', 'oneDNN convolutions (custom calls)'),
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
        start = time.perf_counter_ns()
        run(steps)
        wall = time.perf_counter_ns() - start
        jax.profiler.stop_trace()
        path = sorted(glob.glob(os.path.join(tmp, '**', '*.xplane.pb'), recursive=True))[-1]
        data = jax.profiler.ProfileData.from_file(path)
    ops, executions = [], []
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name.startswith('ThunkExecutor::Execute'):
                    executions.append((event.start_ns, event.end_ns))
                elif 'hlo_op' in dict(event.stats) and not event.name.startswith('end:'):
                    kind = _kind(event.name, _JAX_KINDS, 'elementwise loop fusions')
                    ops.append((event.start_ns, event.end_ns, kind))
    totals = wall_by_kind(ops, executions)
    totals[OUTSIDE] = max(0.0, wall - sum(totals.values()))
    return {k: v / 1e6 / steps for k, v in totals.items()}


NO_OP = 'no op running (executor, waits)'
OUTSIDE = 'outside the executable (Python, dispatch)'


def wall_by_kind(
    ops: Sequence[tuple[float, float, str]], executions: Sequence[tuple[float, float]]
) -> dict[str, float]:
    """Wall time per kind of `ops` ((start, end, kind)): each instant is shared evenly among
    the ops running then; instants inside `executions` ((start, end), nesting allowed)
    with no op running go to NO_OP."""
    points = [(start, 1, kind) for start, _, kind in ops] + [(end, -1, k) for _, end, k in ops]
    points += [(start, 1, None) for start, _ in executions]
    points += [(end, -1, None) for _, end in executions]
    points.sort(key=lambda p: p[0])
    running: collections.Counter = collections.Counter()
    totals: dict[str, float] = collections.defaultdict(float)
    previous = None
    for time_ns, change, kind in points:
        if previous is not None and time_ns > previous:
            span, busy = time_ns - previous, sum(n for k, n in running.items() if k)
            for k, n in running.items():
                if k and n:
                    totals[k] += span * n / busy
            if not busy and running[None] > 0:
                totals[NO_OP] += span
        running[kind] += change
        previous = time_ns
    return dict(totals)


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


def jax_conv_calls(
    shape: tuple[int, ...], batch: int, onednn: bool = False
) -> dict[str, Callable[[], Any]]:
    """Jitted forward, weight-gradient and input-gradient calls of one lax convolution (or,
    if `onednn`, of layers' oneDNN convolution)."""
    import jax
    from jax import lax

    from cnn_jax.models import onednn_conv

    _, size, cin, cout, k, s = shape
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, size, size, cin))
    w = jax.random.normal(key, (k, k, cin, cout)) * 0.1
    pad = ((k // 2, k // 2),) * 2

    def conv(x, w):
        if onednn:
            return onednn_conv.onednn_conv(x, w, (s, s), pad)
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
    """Markdown rows: per convolution of ResNet-20, CPU ms of each part, JAX (XLA's lax,
    and oneDNN's where the wheels are installed) and torch."""
    from cnn_jax.models import onednn_conv

    onednn = onednn_conv.available()
    columns = _LAYER_COLUMNS[:3] + (_ONEDNN_COLUMNS if onednn else ()) + _LAYER_COLUMNS[3:]
    titles = [c.replace('jax', 'XLA').replace('weight grad', 'dW') for c in columns]
    titles = [t.replace('input grad', 'dx').replace('forward', 'fwd') for t in titles]
    rows = ['| conv (count) | ' + ' | '.join(titles) + ' |', '|---' * (len(columns) + 1) + '|']
    sums = collections.Counter()
    for shape in RESNET20_CONVS:
        count, size, cin, cout, k, s = shape
        ms = {f'jax {k_}': _cpu_ms(f, reps) for k_, f in jax_conv_calls(shape, batch).items()}
        if onednn:
            calls = jax_conv_calls(shape, batch, onednn=True)
            ms |= {f'onednn {k_}': _cpu_ms(f, reps) for k_, f in calls.items()}
        if with_torch:
            calls = torch_conv_calls(shape, batch)
            ms |= {f'torch {k_}': _cpu_ms(f, reps) for k_, f in calls.items()}
        for name, value in ms.items():
            sums[name] += count * value
        cells = ' | '.join(f'{ms.get(c, float("nan")):.1f}' for c in columns)
        rows.append(f'| {cin}->{cout} {k}x{k}/{s} at {size}x{size} (x{count}) | {cells} |')
    cells = ' | '.join(f'{sums.get(c, float("nan")):.0f}' for c in columns)
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
_ONEDNN_COLUMNS = ('onednn forward', 'onednn weight grad', 'onednn input grad')


def step_cpu_ms(model: str, reps: int, rounds: int, with_torch: bool) -> dict[str, float]:
    """CPU ms per train step of cnn_jax's synthetic step and torch eager, interleaved; with
    the oneDNN wheels installed, cnn_jax's step with XLA's convolutions too."""
    from unittest import mock

    from benchmarks.cases import CASES
    from benchmarks.train_step import jax_runners, torch_runners
    from cnn_jax.models import layers, onednn_conv

    runners, _ = jax_runners(CASES[model])
    runs = {'cnn_jax': runners['jax_synthetic']}
    if onednn_conv.available():
        with mock.patch.object(layers, 'onednn_conv_wins', lambda *_: False):
            runs['cnn_jax, XLA convolutions'] = jax_runners(CASES[model])[0]['jax_synthetic']
    if with_torch:
        runs['torch eager'] = torch_runners(CASES[model], compile_model=False)[0]['torch_eager']
    totals = collections.Counter()
    for _ in range(rounds):
        for name, run in runs.items():
            totals[name] += _cpu_ms(lambda run=run: run(reps), 1) / reps
    return {name: value / rounds for name, value in totals.items()}


# First convolutions (few input channels), where layers.tap_conv_wins may pick the tap sum:
# (name, batch, map size, in, out, kernel, padding).
FIRST_CONVS: tuple[tuple[str, int, int, int, int, int, int], ...] = (
    ('SimpleNN (CIFAR)', 64, 32, 3, 8, 5, 0),
    ('SimpleNN (MNIST)', 64, 28, 1, 8, 5, 0),
    ('ResNet-20 stem', 128, 32, 3, 16, 3, 1),
    ('E10 three-block CNN', 64, 32, 3, 32, 5, 2),
    ('VGG stem', 64, 32, 3, 64, 3, 1),
)


def first_conv_ms(shape: tuple[int, ...], reps: int, rounds: int) -> dict[str, float]:
    """CPU ms of conv + ReLU + 2x2 max-pool, forward and weight gradient (a first layer
    needs no input gradient), lax against layers.tap_conv, interleaved; shape as FIRST_CONVS."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from cnn_jax.models import layers, pooling

    _, batch, size, cin, cout, k, p = shape
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, size, size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * 0.1, jnp.float32)
    pads = ((p, p), (p, p))
    relu, pool = layers.relu_for('cpu'), pooling.MaxPool()
    forms = {
        'lax': lambda x, w: lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_NHWC),
        'tap_conv': lambda x, w: layers.tap_conv(x, w, (1, 1), pads),
    }
    calls = {}
    for form, conv in forms.items():
        step = jax.jit(
            jax.value_and_grad(lambda w, conv=conv: pool.apply({}, relu(conv(x, w))).sum())
        )
        calls[form] = functools.partial(lambda step: jax.block_until_ready(step(w)), step)
    totals = collections.Counter()
    for _ in range(rounds):
        for form, call in calls.items():
            totals[form] += _cpu_ms(call, reps) / rounds
    return dict(totals)


def first_conv_rows(reps: int, rounds: int) -> list[str]:
    """Markdown rows of first_conv_ms for FIRST_CONVS, and whether tap_conv_wins picks it."""
    from cnn_jax.models import layers

    rows = [
        '| first conv | batch | lax | tap_conv | ratio | chosen on CPU |',
        '|---|---|---|---|---|---|',
    ]
    for shape in FIRST_CONVS:
        name, batch, size, cin, cout, k, _ = shape
        ms = first_conv_ms(shape, reps, rounds)
        chosen = 'yes' if layers.tap_conv_wins('cpu', (k, k, cin, cout)) else 'no'
        rows.append(
            f'| {name}: {cin}->{cout} {k}x{k} at {size}x{size} | {batch} | {ms["lax"]:.1f} | '
            f'{ms["tap_conv"]:.1f} | {ms["tap_conv"] / ms["lax"]:.2f} | {chosen} |'
        )
    return rows


def max_pool_ms(reps: int, rounds: int) -> dict[str, float]:
    """CPU ms of ResNet-18's stem pool at 64x64 input (bias + ReLU + 3x3/2 max-pool, pad 1,
    on 64x32x32x64), forward and input gradient, per formulation, interleaved: lax's
    reduce_window, `_strided_max` (other platforms) and `window_max` (CPU); torch's too."""
    import jax
    import jax.numpy as jnp

    from cnn_jax.models import layers, pooling

    try:  # torch is optional: without it the JAX forms run alone.
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    x, bias = rng.normal(size=(64, 32, 32, 64)), rng.normal(size=64) * 0.5
    g = rng.normal(size=(64, 16, 16, 64))
    window, strides, pads = (3, 3), (2, 2), ((1, 1), (1, 1))
    forms = {
        'reduce_window': lambda v: jax.lax.reduce_window(
            v, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1), ((0, 0), *pads, (0, 0))
        ),
        '_strided_max': lambda v: pooling._strided_max(v, window, strides, pads),
        'window_max': lambda v: pooling.window_max(v, window, strides, pads),
    }
    relu = layers.relu_for('cpu')
    xj, bj, gj = (jnp.asarray(a, jnp.float32) for a in (x, bias, g))
    calls = {}
    for form, pool in forms.items():
        step = jax.jit(jax.grad(lambda v, pool=pool: jnp.vdot(pool(relu(v + bj)), gj)))
        calls[form] = functools.partial(lambda step: jax.block_until_ready(step(xj)), step)
    if torch is not None:
        tx = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float32, requires_grad=True)
        tb, tg = (torch.tensor(a, dtype=torch.float32) for a in (bias[:, None, None], g))

        def torch_call() -> None:
            y = torch.nn.functional.max_pool2d(torch.relu(tx + tb), 3, 2, 1)
            y.backward(tg.permute(0, 3, 1, 2))
            tx.grad = None

        calls['torch'] = torch_call
    totals = collections.Counter()
    for _ in range(rounds):
        for form, call in calls.items():
            totals[form] += _cpu_ms(call, reps) / rounds
    return dict(totals)


def step_ab_cpu_ms(model: str, reps: int, rounds: int) -> dict[str, float]:
    """CPU ms per synthetic train step with the CPU convolutions (tap_conv where chosen)
    and with lax everywhere (layers.tap_conv_wins patched while tracing), interleaved."""
    from unittest import mock

    import jax
    import jax.numpy as jnp

    from benchmarks.cases import CASES
    from cnn_jax import steps as steps_lib
    from cnn_jax.models import create_model, layers

    case = CASES[model]
    config = case.config()
    net = create_model(case.model, case.num_classes, **config.model_options.to_dict())
    state = steps_lib.create_train_state(config, net, case.input_shape, jax.random.key(0), 100)
    rng = np.random.default_rng(0)
    batch = {
        'image': jnp.asarray(rng.normal(size=(case.batch_size, *case.input_shape)), jnp.float32),
        'label': jnp.asarray(rng.integers(0, case.num_classes, case.batch_size)),
    }

    def call(step: Callable[..., Any]) -> Any:
        return jax.block_until_ready(step(state, batch, jax.random.key(1)))

    steps = {}
    for form in ('lax', 'tap_conv'):
        chooser = layers.tap_conv_wins if form == 'tap_conv' else (lambda *_: False)
        with mock.patch.object(layers, 'tap_conv_wins', chooser):
            steps[form] = jax.jit(functools.partial(steps_lib.train_step))  # Its own trace.
            call(steps[form])
    totals = collections.Counter()
    for _ in range(rounds):
        for form, step in steps.items():
            totals[form] += _cpu_ms(functools.partial(call, step), reps) / rounds
    return dict(totals)


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
    parser.add_argument('--model', default='resnet20', help='comma-separated benchmark cases')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--no-torch', action='store_true')
    parser.add_argument(
        '--cpu-time',
        action='store_true',
        help='CPU time per ResNet-20 conv part and per whole step instead of the trace',
    )
    parser.add_argument(
        '--first-convs',
        action='store_true',
        help='CPU time of the first convolutions, lax against tap_conv, and of whole steps '
        'with and without tap_conv (--model, comma-separated)',
    )
    parser.add_argument(
        '--max-pool',
        action='store_true',
        help="CPU time of ResNet-18's stem max-pool per formulation (and torch's)",
    )
    args = parser.parse_args(argv)
    keep_freed_memory()  # JAX has not loaded yet (imported lazily below).
    use_recommended_flags()
    # torch's OpenMP workers spin while idle, which process time would count as work.
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    if args.max_pool:
        print('| stem max-pool, forward + input gradient | CPU ms |')
        print('|---|---|')
        for form, value in max_pool_ms(max(args.steps, 10), 3).items():
            print(f'| {form} | {value:.1f} |')
        return 0
    if args.first_convs:
        print('\n'.join(first_conv_rows(args.steps, 3)))
        print()
        print('| whole train step | CPU ms, lax | CPU ms, tap_conv | ratio |')
        print('|---|---|---|---|')
        for model in args.model.split(','):
            ms = step_ab_cpu_ms(model, args.steps, 3)
            ratio = ms['tap_conv'] / ms['lax']
            print(f'| {model} | {ms["lax"]:.1f} | {ms["tap_conv"]:.1f} | {ratio:.2f} |')
        return 0
    if args.cpu_time:
        print('\n'.join(layer_rows(128, args.steps, not args.no_torch)))
        steps = step_cpu_ms(args.model, args.steps, 3, not args.no_torch)
        print()
        print('| whole step | CPU ms / step |')
        print('|---|---|')
        for name, value in steps.items():
            print(f'| {name} | {value:.0f} |')
        return 0
    for model in args.model.split(','):
        print(table(f'cnn_jax, {model}', jax_profile(model, args.steps)))
        if not args.no_torch:
            print()
            print(table(f'torch eager, {model}', torch_profile(model, args.steps)))
        print()
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

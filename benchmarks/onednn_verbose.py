"""oneDNN's own time per primitive inside a train step, cnn_jax's against torch's.

    python -m benchmarks.onednn_verbose --model resnet18 --steps 5

Runs each side's synthetic train step (`train_step.jax_runners`, `torch_runners`) in a
child process under ONEDNN_VERBOSE=profile_exec, in which oneDNN prints the wall time of
every primitive it executes, and prints a Markdown table of ms per step by primitive and
problem shape (a convolution's row names its kernel, e.g. `jit:avx2`), and the wall time
during which at least one primitive ran (calls that overlap, as XLA's concurrent thunks
do, counted once). The children alternate, cnn_jax's then torch's, --rounds times, and a
row's figure is its median call times the calls a step makes: a machine whose speed
drifts between two children would otherwise put the drift into the comparison (one pair
of children put cnn_jax's ResNet-20 kernels 37% behind torch's; alternated, the medians
are 2-6% apart). Both sides run oneDNN's kernels (cnn_jax through
`cnn_jax.models.onednn_conv` where installed), so a row compares the same kernel at the
same shape in its two contexts; where the two pick different kernels for a shape, each
has a row of its own. Two calls that overlap each take longer. The "every call" row
adds the calls the medians leave out: those that ran longer than their row's median.
The "gemm" rows are XLA's own matrix products, whose Eigen kernels call oneDNN's sgemm.
"""

from __future__ import annotations

import argparse
import collections
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence

_BEGIN, _END = 'ONEDNN_VERBOSE_BEGIN', 'ONEDNN_VERBOSE_END'


def _child(model: str, side: str, steps: int) -> None:
    from benchmarks.train_step import synthetic_runner
    from cnn_jax.xla_cpu import keep_freed_memory, use_recommended_flags

    use_recommended_flags()
    keep_freed_memory()
    run = synthetic_runner(model, side)
    run(12)  # cnn_jax's first ~10 steps still fault their buffers in (memory grows).
    print(_BEGIN, flush=True)
    run(steps)
    print(_END, flush=True)


def per_step_ms(rounds: Sequence[Sequence[str]], steps: int) -> dict[tuple[str, str], list[float]]:
    """(primitive, shape) -> [ms per step, calls per step] from each round's lines between
    the markers: the median call over all rounds times the calls a step makes, so that a
    call the OS delayed, or a round the machine ran slower, moves the figure little."""
    calls: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    for lines in rounds:
        for fields in _measured(lines):
            i = fields.index('exec')
            kind = fields[i + 2]
            if kind == 'convolution':  # Keyed by its kernel too: a row compares one kernel.
                key = (f'convolution {fields[i + 4]} ({fields[i + 3]})', fields[-2])
            elif kind == 'gemm_api':
                key = ('gemm (XLA)', fields[-2])
            else:
                key = (kind, '')
            calls[key].append(float(fields[-1]))
    figures = {}
    for key, ms in calls.items():
        per_step = len(ms) / (steps * len(rounds))
        figures[key] = [statistics.median(ms) * per_step, per_step]
    return figures


def mean_ms(rounds: Sequence[Sequence[str]], steps: int) -> float:
    """Every primitive's time per step, averaged over the rounds: above the medians' sum
    by the calls that ran longer than their row's median (a tail the medians leave out)."""
    total = sum(float(fields[-1]) for lines in rounds for fields in _measured(lines))
    return total / (steps * len(rounds))


def _measured(lines: Sequence[str]) -> list[list[str]]:
    """The comma fields of each executed primitive's line between the markers."""
    inside, rows = False, []
    for line in lines:
        inside = (inside or line == _BEGIN) and line != _END
        fields = line.split(',')
        if inside and line.startswith('onednn_verbose') and 'exec' in fields:
            rows.append(fields)
    return rows


def busy_ms(lines: Sequence[str], steps: int) -> float:
    """Wall ms per step with at least one primitive running, from the lines' start
    timestamps (ONEDNN_VERBOSE_TIMESTAMP=1: the field before 'primitive' or 'exec')."""
    spans = []
    for fields in _measured(lines):
        start = float(fields[fields.index('exec') - (2 if 'primitive' in fields else 1)])
        spans.append((start, start + float(fields[-1])))
    covered, end = 0.0, float('-inf')
    for start, stop in sorted(spans):
        covered += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return covered / steps


def table(jax_ms: dict, torch_ms: dict, top: int) -> str:
    """Markdown rows, largest first, with each side's total."""
    keys = sorted(set(jax_ms) | set(torch_ms), key=lambda k: -jax_ms.get(k, [0])[0])
    rows = ['| primitive | shape | cnn_jax ms/step (calls) | torch ms/step (calls) |']
    rows.append('|---|---|---|---|')
    for key in keys[:top]:
        cells = [
            f'{d[key][0]:.1f} ({d[key][1]:.0f})' if key in d else '-' for d in (jax_ms, torch_ms)
        ]
        rows.append(f'| {key[0]} | {key[1]} | {cells[0]} | {cells[1]} |')
    sums = [sum(v[0] for v in d.values()) for d in (jax_ms, torch_ms)]
    rows.append(f'| all oneDNN, median calls | | {sums[0]:.1f} | {sums[1]:.1f} |')
    return '\n'.join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--model', default='resnet18')
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--top', type=int, default=25, help='rows shown')
    parser.add_argument('--rounds', type=int, default=3, help='child processes per side')
    parser.add_argument('--side', choices=('jax', 'torch'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        _child(args.model, args.side, args.steps)
        return 0
    outputs: dict[str, list[list[str]]] = {'jax': [], 'torch': []}
    env = {**os.environ, 'ONEDNN_VERBOSE': 'profile_exec', 'ONEDNN_VERBOSE_TIMESTAMP': '1'}
    for _ in range(args.rounds):  # Alternated: the machine's speed drifts between children.
        for side, rounds in outputs.items():
            cmd = [sys.executable, '-m', 'benchmarks.onednn_verbose', '--model', args.model]
            cmd += ['--steps', str(args.steps), '--side', side]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            rounds.append(run.stdout.splitlines())
    results = {side: per_step_ms(rounds, args.steps) for side, rounds in outputs.items()}
    busy = {
        side: statistics.median(busy_ms(lines, args.steps) for lines in rounds)
        for side, rounds in outputs.items()
    }
    print(f'# oneDNN primitives in one {args.model} train step (ms per step)\n')
    print(table(results['jax'], results['torch'], args.top))
    means = {side: mean_ms(rounds, args.steps) for side, rounds in outputs.items()}
    print(f'| all oneDNN, every call (mean) | | {means["jax"]:.1f} | {means["torch"]:.1f} |')
    print(f'| wall with oneDNN busy (overlaps once) | | {busy["jax"]:.1f} | {busy["torch"]:.1f} |')
    return 0


if __name__ == '__main__':
    sys.exit(main())

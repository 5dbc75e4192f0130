"""How busy the CPUs are while a train step runs, cnn_jax's against torch eager's (Linux).

    python -m benchmarks.cpu_idle --model resnet20 --steps 30

Each side's synthetic train step (`train_step.synthetic_runner`) runs in a child process,
the children alternating (--rounds each). After 12 warm-up steps a child times --steps
steps and reads, over exactly those, each CPU's idle share from /proc/stat and its own
CPU time. A CPU that idles while the step runs is capacity the step did not use: torch's
OpenMP threads spin between operators and keep every core busy; cnn_jax's step hands
work between XLA's thread pool and oneDNN's runtime threads, which sleep in between
(results/benchmark/torch_gap_cpu.md, session 14). The machine's other work counts as busy,
so pause it first.

To see where the idle time goes, record the scheduler during a child's timed steps, e.g.
`perf sched record -a -- sleep 3` once the child prints `timing`, then
`perf sched timehist -s` (idle per CPU; per task, the delay from wake-up to running).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence

_FIELDS = ('user', 'nice', 'system', 'idle', 'iowait', 'irq', 'softirq', 'steal')


def cpu_times() -> dict[str, list[int]]:
    """Each CPU's cumulative ticks from /proc/stat, by _FIELDS."""
    with open('/proc/stat') as f:
        rows = [line.split() for line in f if line.startswith('cpu') and line[3] != ' ']
    return {row[0]: [int(x) for x in row[1 : 1 + len(_FIELDS)]] for row in rows}


def idle_shares(before: dict[str, list[int]], after: dict[str, list[int]]) -> dict[str, float]:
    """Each CPU's idle (idle + iowait) share of the ticks between two `cpu_times`."""
    shares = {}
    for cpu, start in before.items():
        delta = [b - a for a, b in zip(start, after[cpu], strict=True)]
        total = sum(delta) or 1
        shares[cpu] = (delta[_FIELDS.index('idle')] + delta[_FIELDS.index('iowait')]) / total
    return shares


def _child(model: str, side: str, steps: int) -> dict:
    from benchmarks.train_step import synthetic_runner
    from cnn_jax.xla_cpu import keep_freed_memory, use_recommended_flags

    use_recommended_flags()
    keep_freed_memory()
    run = synthetic_runner(model, side)
    run(12)
    print('timing', file=sys.stderr, flush=True)
    before, cpu0, start = cpu_times(), time.process_time(), time.perf_counter()
    run(steps)
    wall = time.perf_counter() - start
    cpu, after = time.process_time() - cpu0, cpu_times()
    return {
        'ms_per_step': 1000 * wall / steps,
        'process_cpu': cpu / wall,  # In cores: 2.0 is two cores busy throughout.
        'idle': idle_shares(before, after),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--model', default='resnet20')
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--rounds', type=int, default=3, help='child processes per side')
    parser.add_argument('--side', choices=('jax', 'torch'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.side:
        print(json.dumps(_child(args.model, args.side, args.steps)))
        return 0
    if not os.path.exists('/proc/stat'):
        print('cpu_idle: needs Linux (/proc/stat)', file=sys.stderr)
        return 2
    print(f'# CPU use during {args.steps} {args.model} train steps, by child process\n')
    print('| round | side | ms/step | process CPU (cores) | idle per CPU |')
    print('|---|---|---|---|---|')
    for r in range(1, args.rounds + 1):  # Alternated: the machine's speed drifts.
        for side in ('jax', 'torch'):
            cmd = [sys.executable, '-m', 'benchmarks.cpu_idle', '--model', args.model]
            cmd += ['--steps', str(args.steps), '--side', side]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            idle = ', '.join(f'{v:.0%}' for v in result['idle'].values())
            label = 'cnn_jax' if side == 'jax' else 'torch eager'
            print(f'| {r} | {label} | {result["ms_per_step"]:.1f} | '
                  f'{result["process_cpu"]:.2f} | {idle} |', flush=True)  # fmt: skip
    return 0


if __name__ == '__main__':
    sys.exit(main())

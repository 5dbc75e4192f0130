"""`python -m benchmarks`: training throughput of cnn_jax's step against PyTorch and the peak.

    python -m benchmarks                              # the experiments' models
    python -m benchmarks --models resnet20 --steps 5 --windows 7
    python -m benchmarks --quick --json /tmp/b.json   # a tiny model, seconds (tests)
    python -m benchmarks --compare-xla-flags --models simplenn,resnet20
    python -m benchmarks --sweep                      # vectorised sweeps, K = 1, 2, 4, 8
    python -m benchmarks --split --models resnet20    # forward vs backward, JAX vs torch
    python -m benchmarks --torch eager-process        # torch in a process of its own

For each model at its experiment's input shape and batch size it measures:
- compile_s: tracing + lowering + XLA compilation of the real train step
  (`cnn_jax.steps.compile_steps(...).train`);
- jax img/s (synthetic): `cnn_jax.steps.train_step` on a device-resident float batch;
- jax img/s (pipeline): the real compiled step, which gathers the batch from a
  device-resident uint8 dataset, augments and normalises on the device (the experiment's
  augmentation, resize included), donating the state, called as the training loop calls it;
- torch img/s: the same architecture in torch.nn (NHWC via channels_last, SGD with the same
  hyperparameters, same batch), eager and under torch.compile where that works;
- GFLOP/step from XLA's cost analysis of the compiled step, achieved TFLOP/s, % of peak.

Throughput is the median over `--windows` timed windows of `--steps` steps each, after
warm-up, synchronised with `block_until_ready` (torch: `cuda.synchronize`). The windows of
all paths are interleaved round by round, and ratios are the median of per-round ratios,
so load from other processes on a shared machine hits both sides alike. Between paths the
process sleeps `--settle` seconds: XLA's and torch's CPU thread pools spin-wait after work,
and without a pause whichever runs second measured up to 5x slower on 2 cores.

Nothing here needs TensorFlow, TFDS or CLU: data is synthetic.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
from collections.abc import Sequence

import jax

from benchmarks import tables, train_step, vectorized, xla_flags
from benchmarks.cases import CASES, DEFAULT_MODELS_ACCELERATOR, DEFAULT_MODELS_CPU, device_info
from cnn_jax.xla_cpu import RECOMMENDED_CPU_XLA_FLAGS, apply_xla_flags

RESULTS_DIR = pathlib.Path('results') / 'benchmark'


def _parse_batch_sizes(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(','))):
        name, _, value = item.partition('=')
        out[name] = int(value)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog='python -m benchmarks',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        '--models',
        default='',
        help='comma-separated, from: '
        + ', '.join(CASES)
        + "; default: the experiments' models (resnet50 on accelerators only)",
    )
    p.add_argument(
        '--batch-size',
        default='',
        help='overrides, e.g. resnet20=256,vgg16=32 (or one number for all)',
    )
    p.add_argument('--steps', type=int, default=5, help='steps per timed window')
    p.add_argument('--windows', type=int, default=5, help='timed windows per path')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per path first')
    p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
    p.add_argument(
        '--torch',
        default='eager+compile',
        choices=('eager+compile', 'eager', 'eager-process', 'none'),
        help='eager-process: torch eager in a process of its own (benchmarks.torch_process)',
    )
    p.add_argument(
        '--settle',
        type=float,
        default=0.2,
        help='seconds of idle between paths (thread pools stop spinning)',
    )
    p.add_argument(
        '--json',
        default=None,
        help='JSON output path (default: results/benchmark/benchmark_<platform>.json; "" for none)',
    )
    p.add_argument(
        '--markdown',
        default=None,
        help='Markdown table path (default: the JSON path with .md; "" for none)',
    )
    p.add_argument(
        '--quick',
        action='store_true',
        help='a tiny model, 2 steps x 2 windows, eager torch only (smoke test)',
    )
    p.add_argument(
        '--xla-flags',
        default=None,
        help='XLA flags to add (default on CPU: RECOMMENDED_CPU_XLA_FLAGS; "" none)',
    )
    p.add_argument(
        '--compare-xla-flags',
        action='store_true',
        help='time each of xla_flags.FLAG_VARIANTS in its own process',
    )
    p.add_argument(
        '--split',
        action='store_true',
        help='forward vs forward + backward, JAX and torch (where a ratio comes from)',
    )
    p.add_argument(
        '--sweep',
        action='store_true',
        help='vectorised sweep: per-variant throughput for K variants vs K runs',
    )
    p.add_argument('--sweep-k', default='1,2,4,8')
    p.add_argument(
        '--sweep-groups',
        default='',
        help='also time K as vmapped groups of these sizes, e.g. 2,4 (see cnn_jax/sweep.py)',
    )
    p.add_argument(
        '--window-s',
        type=float,
        default=1.0,
        help='each window runs at least --steps steps and at least this many seconds',
    )
    return p.parse_args(argv)


def _models(args: argparse.Namespace, platform_name: str) -> tuple[list[str], dict[str, int]]:
    """The models to time and their batch-size overrides; --quick shrinks the run too."""
    if args.quick:
        models = args.models.split(',') if args.models else ['tiny']
        args.steps, args.windows, args.warmup, args.window_s = 2, 2, 1, 0.0
        if args.torch == 'eager+compile':
            args.torch = 'eager'
    elif args.models:
        models = args.models.split(',')
    else:
        models = list(DEFAULT_MODELS_CPU if platform_name == 'cpu' else DEFAULT_MODELS_ACCELERATOR)
    if args.batch_size.isdigit():
        return models, dict.fromkeys(models, int(args.batch_size))
    return models, _parse_batch_sizes(args.batch_size)


def _measure(
    args: argparse.Namespace, models: list[str], batch_sizes: dict[str, int]
) -> tuple[dict, str, str]:
    """(result, its table, the output file's stem) of the measurement the flags chose."""
    if args.compare_xla_flags:
        result = xla_flags.compare_xla_flags(
            models, xla_flags.FLAG_VARIANTS, steps=args.steps, windows=args.windows
        )
        return result, tables.format_flag_table(result), 'xla_flags'
    if args.split:
        rows = [
            train_step.forward_backward_split(
                m, args.steps, args.windows, args.warmup, args.settle, args.window_s
            )
            for m in models
        ]
        result = {'device': device_info(), 'results': rows}
        return result, tables.format_table(rows, [(k, k) for k in rows[0]]), 'split'
    if args.sweep:
        ks = [int(k) for k in args.sweep_k.split(',')]
        name = models[0] if args.models or args.quick else 'simplenn'
        case = CASES[name]
        if name in batch_sizes:
            case = dataclasses.replace(case, batch_size=batch_sizes[name])
        result = vectorized.benchmark_vectorized(
            case.config(args.dtype),
            case.input_shape,
            case.num_classes,
            ks,
            steps=args.steps,
            windows=args.windows,
            warmup=args.warmup,
            settle_s=args.settle,
            window_s=args.window_s,
            group_sizes=[None] + [int(g) for g in args.sweep_groups.split(',') if g],
        )
        result['device'] = device_info(args.dtype)
        return result, vectorized.format_benchmark(result), 'sweep'
    result = train_step.run_benchmark(
        models,
        steps=args.steps,
        windows=args.windows,
        warmup=args.warmup,
        dtype=args.dtype,
        torch_mode=args.torch,
        batch_sizes=batch_sizes,
        settle_s=args.settle,
        window_s=args.window_s,
    )
    return result, tables.describe(result), 'benchmark'


def _write(result: dict, table: str, path: str, md_path: str | None) -> None:
    """The JSON result at `path` and the table beside it (.md), each unless given as ''."""
    if path:
        out = pathlib.Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + '\n')
        print(f'wrote {out}')
    if md_path is None and path:
        md_path = str(pathlib.Path(path).with_suffix('.md'))
    if md_path:
        pathlib.Path(md_path).write_text(table)
        print(f'wrote {md_path}')


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    flags = RECOMMENDED_CPU_XLA_FLAGS if args.xla_flags is None else tuple(args.xla_flags.split())
    if not apply_xla_flags(flags):
        print('benchmark: JAX already started; XLA_FLAGS unchanged', file=sys.stderr)
    platform_name = jax.devices()[0].platform
    models, batch_sizes = _models(args, platform_name)
    result, table, stem = _measure(args, models, batch_sizes)
    print()
    print(table)
    path = args.json
    if path is None:
        path = str(RESULTS_DIR / f'{stem}_{platform_name}.json')
    _write(result, table, path, args.markdown)
    return 0

"""The benchmark's results as Markdown tables."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from benchmarks.timing import median

COLUMNS = (
    ('model', 'model'),
    ('input', 'input'),
    ('batch', 'batch'),
    ('compile_s', 'compile_s'),
    ('jax_synthetic_ips', 'jax img/s (synthetic)'),
    ('jax_pipeline_ips', 'jax img/s (pipeline)'),
    ('pipeline_overhead_pct', 'pipeline overhead %'),
    ('torch_eager_ips', 'torch eager img/s'),
    ('torch_compile_ips', 'torch.compile img/s'),
    ('ratio_vs_torch_eager', 'ratio jax/torch'),
    ('ratio_vs_torch_compile', 'ratio jax/torch.compile'),
    ('gflop_per_step', 'GFLOP/step'),
    ('achieved_tflops', 'achieved TFLOP/s'),
    ('pct_of_peak', '% of peak'),
)


def cell(v: Any) -> str:
    """One table cell: n/a for None, 4 significant digits, thousands separated."""
    if v is None:
        return 'n/a'
    if isinstance(v, float):
        return f'{v:.4g}' if abs(v) < 1000 else f'{v:,.0f}'
    return str(v)


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] = COLUMNS
) -> str:
    """The benchmark rows as a Markdown table: (key, header) `columns`."""
    lines = ['| ' + ' | '.join(h for _, h in columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(cell(r.get(k)) for k, _ in columns) + ' |' for r in rows]
    return '\n'.join(lines)


def describe(result: dict[str, Any]) -> str:
    """The table with a header naming the device and the settings, as Markdown."""
    d, s = result['device'], result['settings']
    lines = [
        f'# cnn_jax training throughput on {d["device_kind"]} ({d["platform"]}, '
        f'{d["num_devices"]} device(s), {d["cpu_count"]} CPU cores)',
        '',
        f'jax {d["jax"]}, torch {d["torch"]} ({d["torch_threads"]} threads); dtype '
        f'{s["dtype"]}; median of {s["windows"]} interleaved windows of {s["steps"]} steps '
        f'after {s["warmup"]} warm-up steps; XLA_FLAGS={d["xla_flags"]!r}; load average at '
        f'start {d["load_average"]}.',
        '',
        'ratio = jax img/s through the real input pipeline (gather + augment + normalise on '
        'the device) / torch img/s on a pre-made batch, median of per-window ratios.'
        + (
            ' torch ran in a process of its own (--torch eager-process).'
            if s.get('torch') == 'eager-process'
            else ''
        ),
        '',
        format_table(result['results']),
    ]
    errors = [
        f'- {r["model"]}: torch.compile failed: {r["torch_compile_error"]}'
        for r in result['results']
        if r.get('torch_compile_error')
    ]
    if errors:
        lines += ['', *errors]
    return '\n'.join(lines) + '\n'


def format_flag_table(result: dict[str, Any]) -> str:
    """The runs of benchmarks.xla_flags.compare_xla_flags, one row per variant and model."""
    lines = [
        '| XLA_FLAGS | model | jax img/s (pipeline) | torch eager img/s | '
        'ratio jax/torch (median over repeats) | compile_s |',
        '|---|---|---|---|---|---|',
    ]
    for flags in result['variants']:
        models = dict.fromkeys(r['model'] for r in result['runs'] if r['flags'] == flags)
        for m in models:
            rs = [r for r in result['runs'] if r['flags'] == flags and r['model'] == m]
            cells = [
                f'`{flags}`' if flags else '(none)',
                m,
                ' / '.join(cell(r['jax_pipeline_ips']) for r in rs),
                ' / '.join(cell(r['torch_eager_ips']) for r in rs),
                cell(median([r['ratio_vs_torch_eager'] or math.nan for r in rs])),
                ' / '.join(cell(r['compile_s']) for r in rs),
            ]
            lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'

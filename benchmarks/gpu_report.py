"""benchmarks.gpu_check's results (gpu_check.json) as Markdown, naming the device."""

from __future__ import annotations

from typing import Any

from benchmarks import vectorized
from benchmarks.tables import cell, format_table

PEAK_NOTE = (
    'Peak = dense tensor-core TFLOP/s from benchmarks.cases.PEAK_TFLOPS by device kind '
    '(NVIDIA datasheets, SXM, no sparsity): H100 SXM bf16 989.4, fp32 (TF32, which XLA uses '
    "for float32 matmuls and convolutions by default) 494.7; H200 has the H100 SXM's "
    'compute. CPU: unknown (no percent of peak).'
)

BRINGUP_COLUMNS = (
    ('check', 'check'),
    ('model', 'model'),
    ('input', 'input'),
    ('dtype', 'dtype'),
    ('compile_and_first_step_s', 'compile + first step s'),
    ('step_s', 'step s'),
    ('mean_loss', 'mean loss'),
    ('outcome', 'outcome'),
)
SPEED_COLUMNS = (
    ('model', 'model'),
    ('dtype', 'dtype'),
    ('input', 'input'),
    ('batch', 'batch'),
    ('compile_s', 'jax compile_s'),
    ('jax_pipeline_ips', 'jax img/s'),
    ('torch_eager_ips', 'torch eager img/s'),
    ('torch_compile_ips', 'torch.compile img/s'),
    ('ratio_vs_torch_eager', 'jax/eager'),
    ('ratio_vs_torch_compile', 'jax/compile'),
    ('torch_compile_s', 'torch.compile s'),
    ('achieved_tflops', 'TFLOP/s'),
    ('pct_of_peak', '% of peak'),
    ('outcome', 'outcome'),
)
SCAN_COLUMNS = (
    ('scan_of', 'model'),
    ('dtype', 'dtype'),
    ('batch', 'batch'),
    ('chunk', 'steps per call'),
    ('per_step_ips', 'img/s, 1 step per call'),
    ('scan_ips', 'img/s, scanned'),
    ('scan_speedup', 'speedup'),
    ('scan_compile_s', 'scan compile_s'),
    ('outcome', 'outcome'),
)


def outcome(row: dict[str, Any]) -> str:
    """'ok', the skip reason, or the error of one row."""
    if row.get('same_network_as'):
        return f'alias: the network of {row["same_network_as"]}'
    if row.get('skipped') or row.get('tiny_skipped'):
        return f'skipped: {row.get("skipped") or row["tiny_skipped"]}'
    if row.get('error'):
        return f'**error**: {row["error"].splitlines()[0][:200]}'
    return 'ok'


def _table(rows: list[dict[str, Any]], columns) -> str:
    rows = [{**r, 'outcome': outcome(r)} for r in rows]
    for r in rows:
        for k, v in r.items():
            if isinstance(v, list):
                r[k] = ' '.join(cell(x) for x in v)
    return format_table(rows, columns)


def _heading(data: dict[str, Any]) -> list[str]:
    d = data.get('device') or {}
    kind = d.get('device_kind', '?')
    tiny = (
        '; **--tiny**: small shapes, a few steps, no figure is a speed' if data.get('tiny') else ''
    )
    lines = [
        f'# cnn_jax GPU check on {kind} ({d.get("platform", "?")}, '
        f'{d.get("num_devices", "?")} device(s))',
        '',
        f'jax {d.get("jax")}, jaxlib {d.get("jaxlib")}, {d.get("platform_version")}; '
        f'memory {d.get("memory_gib")} GiB; updated {data.get("updated")}{tiny}',
        '',
        f'`{data.get("command")}`',
    ]
    if d.get('error'):
        lines += ['', f'Device error: {d["error"]}']
    return lines


def _step_line(name: str, step: dict[str, Any]) -> str:
    line = f'Status: {step.get("status")}, {step.get("elapsed_s", "?")} s.'
    if step.get('current'):
        line += f' Running (or killed in): {step["current"]}.'
    if step.get('error'):
        line += f' Error: {step["error"]}'
    return line


def markdown(data: dict[str, Any]) -> str:
    """The whole report: device, then each step that has run or is running."""
    steps = data.get('steps', {})
    lines = _heading(data)
    titles = {
        'bringup': '1. Bring-up',
        'speed': '2. Speed against PyTorch',
        'sweep': '3. Vectorised sweep',
        'e8': '4. E8: ResNet-20 on CIFAR-10, full schedule',
    }
    for name, title in titles.items():
        if name not in steps:
            continue
        step = steps[name]
        lines += ['', f'## {title}', '', _step_line(name, step), '']
        rows = step.get('rows', [])
        if name == 'bringup':
            lines.append(_table(rows, BRINGUP_COLUMNS))
        elif name == 'speed':
            lines += _speed(step, rows, data)
        elif name == 'sweep':
            lines += _sweep(step, rows)
        elif name == 'e8':
            lines += _e8(step, rows)
    return '\n'.join(lines) + '\n'


def _speed(step: dict[str, Any], rows: list[dict[str, Any]], data: dict[str, Any]) -> list[str]:
    timed = [r for r in rows if 'scan_of' not in r]
    scanned = [r for r in rows if 'scan_of' in r]
    lines = [
        'jax img/s: the real compiled step (gather, augment, normalise on the device); torch: '
        'the same network in torch.nn, channels_last, autocast to bfloat16 on bfloat16 rows '
        f'(AMP). {data.get("peak_note", "")} Settings: {step.get("settings")}.',
        '',
        _table(timed, SPEED_COLUMNS),
    ]
    notes = [
        f'- {r["model"]} {r["dtype"]}: torch.compile '
        + (f'failed: {r["torch_compile_error"]}' if r.get('torch_compile_error') else '')
        + (f'skipped: {r["torch_compile_skipped"]}' if r.get('torch_compile_skipped') else '')
        for r in timed
        if r.get('torch_compile_error') or r.get('torch_compile_skipped')
    ]
    if notes:
        lines += ['', *notes]
    if scanned:
        lines += [
            '',
            'Many steps per compiled call: a jax.lax.scan over a chunk of train steps, '
            'metric sums on the device, against one call per step (the training loop).',
            '',
            _table(scanned, SCAN_COLUMNS),
        ]
    return lines


def _sweep(step: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    if 'result' in step:
        body = vectorized.format_benchmark({**step['result'], 'device': {}})
        return body.split('\n', 2)[2].rstrip().splitlines()  # Without its own heading.
    return [outcome(r) for r in rows]


def _e8(step: dict[str, Any], rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in rows:
        if 'status' not in r:
            lines.append(outcome(r))
            continue
        lines.append(
            f'- This invocation: {r["status"]}; {r["wall_s"]} s; resumed from step '
            f'{r["resumed_from_step"]}; last step {r["last_step"]} of {r["total_steps"]}.'
        )
        s = r.get('summary') or {}
        if s:
            lines.append(
                f'- Test accuracy {cell(s.get("test_accuracy"))}, val accuracy '
                f'{cell(s.get("val_accuracy"))}, {cell(s.get("train_steps_per_s"))} steps/s, '
                f'{s.get("epochs_run")} epochs.'
            )
        lines.append(f'- `{r["command"]}`')
    invocations = step.get('invocations', [])
    lines.append(
        f'- Invocations so far: {len(invocations)}, {step.get("total_wall_s")} s of wall time '
        'in all (compilation and data loading included).'
    )
    return lines

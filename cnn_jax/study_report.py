"""A study's rows and outputs, rebuilt from what its runs left on disk.

`run_row` reads one run's summary.json and metrics.jsonl (cnn_jax.study.collect_study
gathers the rows); summary.md (one row per variant; mean +- sample std over seeds), comparison.png
(per-epoch accuracy and loss of every variant), sweep.png (the result against the swept
number, for a sweep) and summary.json. Everything here reads only that dict and the
runs' metrics.jsonl: the outputs are rebuilt from what is on disk.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from cnn_jax import records, report

# Per-run numbers of a study row, with their table headers.
ROW_METRICS = (
    ('best_val_accuracy', 'Best val acc'),
    ('best_epoch', 'Best epoch'),
    ('test_accuracy', 'Test acc'),
    ('test_loss', 'Test loss'),
    ('precision', 'Precision'),
    ('recall', 'Recall'),
    ('f1', 'F1'),
    ('wall_time_s', 'Wall time (s)'),
)


def finite(x: Any) -> float | None:
    """`x` as a float if it is a finite number, else None (NaN, missing, text)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def status_text(summary: dict) -> str:
    """'completed', 'completed (stopped early)', 'diverged at step N', ... of a summary."""
    status = summary.get('status', 'completed')
    if status == 'diverged':
        step = summary.get('diverged_at_step')
        return f'diverged at step {step}' if step is not None else 'diverged'
    if status == 'completed' and summary.get('stopped_early'):
        return 'completed (stopped early)'
    return str(status)


def run_row(path: Path, seed: int, failure: dict | None) -> dict:
    """One run's row numbers from its summary.json and metrics.jsonl."""
    summary = records.read_summary(path)
    epochs = records.read_metrics(path)
    record: dict[str, Any] = {'seed': seed, 'workdir': str(path)}
    if summary is not None:
        record['status'] = summary['status']
        record['status_text'] = status_text(summary)
        record['diverged_at_step'] = summary.get('diverged_at_step')
        record['stopped_early'] = bool(summary.get('stopped_early', False))
    elif failure is not None:
        record['status'] = 'failed'
        record['status_text'] = f'failed: {failure["error"]}'
        record['error'] = failure['error']
    else:
        record['status'] = record['status_text'] = 'incomplete' if epochs else 'not run'
    summary = summary or {}
    # Best validation accuracy and its epoch from the curves; the summary as a fallback.
    val = [(e['epoch'], finite(e.get('val_accuracy'))) for e in epochs]
    val = [(ep, a) for ep, a in val if a is not None]
    if val:
        best_epoch, best = max(val, key=lambda t: (t[1], -t[0]))
    else:
        best, best_epoch = finite(summary.get('val_accuracy')), summary.get('best_epoch')
    record.update(best_val_accuracy=best, best_epoch=best_epoch)
    for key in ('test_accuracy', 'test_loss', 'precision', 'recall', 'f1'):
        record[key] = finite(summary.get(key))
    wall = finite(summary.get('wall_time_s'))
    if wall is not None and summary.get('vectorized'):
        wall /= summary['vectorized']['k']  # A vectorised group's time, shared equally.
    if wall is None and epochs:
        wall = finite(epochs[-1].get('elapsed_s'))
    record['wall_time_s'] = wall
    record['epochs_run'] = summary.get('epochs_run', len(epochs) or None)
    return record


def aggregate(values: Iterable[float | None]) -> dict:
    """{'mean', 'std' (sample), 'n'} of the values that are not None."""
    xs = [v for v in values if v is not None]
    if not xs:
        return {'mean': None, 'std': None, 'n': 0}
    std = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
    return {'mean': float(np.mean(xs)), 'std': std, 'n': len(xs)}


def row_status(runs: list[dict]) -> str:
    """The runs' common status text, or '2x completed, 1x diverged at step N'."""
    counts = Counter(r['status_text'] for r in runs)  # In first-seen order.
    if len(counts) == 1:
        return runs[0]['status_text']
    return ', '.join(f'{n}x {t}' for t, n in counts.items())


def output_files(sweep_key: str | None) -> list[str]:
    """The files `write_study_outputs` writes."""
    return ['summary.json', 'summary.md', 'comparison.png'] + (['sweep.png'] if sweep_key else [])


def write_study_outputs(study: dict, workdir: Path) -> None:
    """Writes summary.json, summary.md, comparison.png (and sweep.png) into workdir."""
    plot_comparison(study, workdir / 'comparison.png')
    if study['sweep_key']:
        plot_sweep(study, workdir / 'sweep.png')
    (workdir / 'summary.md').write_text(summary_markdown(study))
    records.write_json(workdir / 'summary.json', study)


def _ranking_key(study: dict) -> str:
    return 'test_accuracy' if study['plot_metric'] == 'test_accuracy' else 'best_val_accuracy'


def _fmt(agg: dict, key: str) -> str:
    if agg['n'] == 0:
        return '-'
    digits = {'best_epoch': 1, 'wall_time_s': 1}.get(key, 3)
    if key == 'best_epoch' and agg['std'] == 0:
        digits = 0
    text = f'{agg["mean"]:.{digits}f}'
    if agg['n'] > 1:
        text += f' ± {agg["std"]:.{digits}f}'
    return text


def summary_markdown(study: dict) -> str:
    """The study's table as Markdown."""
    seeds = study['seeds']
    lines = [f'# Study {study["study"]}', '']
    if study['description']:
        lines += [study['description'], '']
    seeds_text = (
        f'mean ± sample std over seeds {", ".join(map(str, seeds))}'
        if len(seeds) > 1
        else f'seed {seeds[0]}'
    )
    lines += [f'One row per variant; {seeds_text}.', '']
    headers = ['Variant', 'Status'] + [h for _, h in ROW_METRICS]
    if study['sweep_key']:
        headers.insert(1, study['sweep_key'])
    cells = []
    for row in study['variants']:
        cells.append([row['variant'], row['status']])
        cells[-1] += [_fmt(row['metrics'][k], k) for k, _ in ROW_METRICS]
        if study['sweep_key']:
            cells[-1].insert(1, f'{row["sweep_value"]:g}')
    lines.append(report.markdown_table(headers, [[c.replace('|', '/') for c in r] for r in cells]))
    key = _ranking_key(study)
    # Best among variants whose runs all completed (a diverged run's early peak does not count).
    ranked = [
        r
        for r in study['variants']
        if r['metrics'][key]['n'] and r['status'].startswith('completed')
    ]
    if ranked:
        best = max(ranked, key=lambda r: r['metrics'][key]['mean'])
        label = 'final test accuracy' if key == 'test_accuracy' else 'best validation accuracy'
        lines += [
            '',
            f'Best by {label}: **{best["variant"]}** ({_fmt(best["metrics"][key], key)}).',
        ]
    lines += ['', '![comparison](comparison.png)']
    if study['sweep_key']:
        lines += ['', '![sweep](sweep.png)']
    lines += ['', '## Variants', '']
    for row in study['variants']:
        over = ', '.join(f'`{k}={v!r}`' for k, v in row['overrides'].items()) or 'base config'
        lines.append(f'- **{row["variant"]}**: {over}')
    if study['failures']:
        lines += ['', '## Failures', '']
        lines += [f'- {f["variant"]} seed {f["seed"]}: {f["error"]}' for f in study['failures']]
    return '\n'.join(lines) + '\n'


def _curves(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-epoch mean and std of `key` over the runs (epochs any run has)."""
    per_epoch: dict[float, list[float]] = {}
    for run in runs:
        for record in records.read_metrics(run['workdir']):
            value = finite(record.get(key))
            if value is not None:
                per_epoch.setdefault(record['epoch'], []).append(value)
    epochs = sorted(per_epoch)
    aggs = [aggregate(per_epoch[e]) for e in epochs]
    return np.array(epochs), np.array([a['mean'] for a in aggs]), np.array([a['std'] for a in aggs])


def plot_comparison(study: dict, path: str | Path) -> None:
    """Per-epoch accuracy and loss (validation or test) of every variant on one axes pair."""
    split = 'test' if study['plot_metric'] == 'test_accuracy' else 'val'
    rows = study['variants']
    if split == 'test' and not any(len(_curves(r['runs'], 'test_accuracy')[0]) for r in rows):
        split = 'val'  # No per-epoch test numbers (eval_test_each_epoch was off).
    fig = report.new_figure(12.0, 4.5)
    ax_acc, ax_loss = fig.subplots(1, 2)
    losses = []
    for row in rows:
        label = row['variant'] + (
            '' if row['status'].startswith('completed') else f' ({row["status"]})'
        )
        for ax, key in ((ax_acc, f'{split}_accuracy'), (ax_loss, f'{split}_loss')):
            epochs, mean, std = _curves(row['runs'], key)
            if not len(epochs):
                continue
            (line,) = ax.plot(epochs, mean, marker='o', markersize=3, label=label)
            if len(row['runs']) > 1:
                ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            if ax is ax_loss:
                losses.extend(mean.tolist())
    name = 'validation' if split == 'val' else 'test'
    ax_acc.set(ylabel=f'{name} accuracy', title=f'{study["study"]}: {name} accuracy')
    ax_loss.set(ylabel=f'{name} loss', title=f'{study["study"]}: {name} loss')
    positive = [x for x in losses if x > 0]
    if positive and max(positive) / min(positive) > 20:
        ax_loss.set_yscale('log')  # a diverging or differently-scaled loss squashes the rest
    for ax in (ax_acc, ax_loss):
        report.epoch_axis(ax)
        if ax.lines:
            ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_sweep(study: dict, path: str | Path) -> None:
    """The result against the swept number on a log axis; 0 sits one decade below the rest."""
    rows = study['variants']
    values = [float(r['sweep_value']) for r in rows]
    nonzero = [abs(v) for v in values if v != 0]
    zero_at = min(nonzero) / 10 if nonzero else 1.0
    xs = np.array([v if v != 0 else zero_at for v in values])
    order = np.argsort(xs)
    fig = report.new_figure(7.0, 4.5)
    ax = fig.subplots()
    keys = [('best_val_accuracy', 'best validation accuracy'), ('test_accuracy', 'test accuracy')]
    for key, label in keys:
        aggs = [r['metrics'][key] for r in rows]
        if not any(a['n'] for a in aggs):
            continue
        mean = np.array([a['mean'] if a['n'] else np.nan for a in aggs])
        std = np.array([a['std'] if a['n'] else np.nan for a in aggs])
        ax.errorbar(xs[order], mean[order], yerr=std[order], marker='o', capsize=3, label=label)
    for x, row in zip(xs, rows, strict=True):
        if 'diverged' in row['status'] or 'failed' in row['status']:
            agg = row['metrics']['best_val_accuracy']
            y = agg['mean'] if agg['n'] else 0.0
            ax.plot([x], [y], 'rx', markersize=10)
            ax.annotate(
                row['status'].split(':')[0],
                (x, y),
                textcoords='offset points',
                xytext=(0, 6),
                ha='center',
                fontsize='small',
                color='red',
            )
    ax.set_xscale('log')
    ax.margins(x=0.15)
    ticks = sorted(set(xs.tolist()))
    ax.set_xticks(ticks, ['0' if (t == zero_at and 0 in values) else f'{t:g}' for t in ticks])
    ax.minorticks_off()
    ax.set(
        xlabel=study['sweep_key'] + ' (log scale)',
        ylabel='accuracy',
        title=f'{study["study"]}: accuracy against {study["sweep_key"]}',
    )
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # None when no run finished.
        ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path, dpi=100)

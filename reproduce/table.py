"""The reproduction table (results/REPRODUCTION.md and .json): one row per experiment and
per study variant, read from the workdirs; a row not yet run gives its estimate."""

from __future__ import annotations

import json
import pathlib
import re
import shlex
from collections.abc import Sequence
from typing import Any

from cnn_jax import run_record
from cnn_jax.records import format_duration, read_json
from cnn_jax.study_report import aggregate, run_row
from reproduce.estimates import estimate_seconds, measured_throughput, probe_key
from reproduce.reported import EXPERIMENTS, Experiment, schedule
from reproduce.workdirs import ROOT, TESTS_FILE, TIME_FILE, launch_command, workdir_of


def describe_data(exp: Experiment, data: dict[str, str]) -> str:
    """What a row trained on, in words."""
    value = data.get(exp.dataset, exp.dataset)
    if exp.dataset == 'mnist' and 'fashion' in value:
        return 'Fashion-MNIST standing in for MNIST'
    if exp.dataset == 'cifar10' and value.startswith('folder:') and 'cifar10-jpeg' in value:
        return 'CIFAR-10 JPEG copy'
    if value == exp.dataset:
        return f'TFDS {value}'
    return f'{value} standing in for {exp.dataset}'


# A data path is where the data lie on the machine that ran the row; a reader has their own.
_DATA_PATH = re.compile(r'(=(?:folder|idx):)[^\s\'"]+')
DATA_DIR_NOTE = (
    'DIR: where the data lie on your machine. `folder:DIR`: an image folder '
    '`DIR/{train,test}/<class>/*.jpg|png`, or a `.tar.gz` of one (here CIFAR-10 as JPEG files); '
    '`idx:DIR`: a folder of the four MNIST-format IDX files.'
)


def recorded_command(command: Sequence[str], workdir: pathlib.Path) -> list[str]:
    """A run's recorded argv with its --workdir the row's: a run trained elsewhere (a clone
    outside the repository) and copied here reruns into the files the row shows."""
    shown = workdir.relative_to(ROOT) if workdir.is_relative_to(ROOT) else workdir
    return [f'--workdir={shown}' if a.startswith('--workdir=') else a for a in command]


def portable_command(command: str) -> str:
    """`command` with its `folder:`/`idx:` data path written as DIR (see DATA_DIR_NOTE)."""
    return _DATA_PATH.sub(r'\1DIR', command)


def _seconds_spent(workdir: pathlib.Path) -> float | None:
    """The ledger's seconds, or the runs' own wall times where those add up to more: a
    launch killed before the ledger recorded as it ran left no entry. A copied run's time
    belongs to the workdir it came from."""
    spent = read_json(workdir / TIME_FILE)
    ledger = sum(s['seconds'] for s in spent) if spent else 0.0
    runs = 0.0
    for path in workdir.rglob('summary.json'):
        own = read_json(path) or {}
        if 'wall_time_s' in own and not (path.parent / 'copied_from.txt').exists():
            runs += own['wall_time_s']
    return round(max(ledger, runs), 1) if spent or runs else None


def _device(summary: dict, record: dict | None) -> str:
    if not summary.get('platform'):
        return ''
    kind = summary.get('device_kind', summary['platform'])
    text = f'{summary["num_devices"]}x {kind}'
    if summary['platform'] == 'cpu' and record:
        text += f' ({record["host"]})'
    return text


def _metric_of(summary: dict, metric: str) -> float | None:
    value = summary.get(metric)
    return float(value) if isinstance(value, int | float) else None


def collect_rows(exp: Experiment, root: pathlib.Path, data: dict[str, str]) -> list[dict[str, Any]]:
    """The table rows of `exp`: one per single-run config, one per study variant."""
    if exp.tests:
        return [_tests_row(exp, root)]
    rows = []
    measured = measured_throughput(root)
    for config in exp.configs:
        workdir = workdir_of(root, exp, config)
        record = run_record.read_record(workdir)
        summary = read_json(workdir / 'summary.json') or {}
        used, command = data, launch_command(exp, config, workdir, data)
        if record:  # What the run was launched with, whatever this call's --data says.
            used = {**data, exp.dataset: record['config']['dataset']}
            command = recorded_command(record['command'], workdir)
        base = {
            'experiment': exp.id,
            'title': exp.title,
            'config': config,
            'data': describe_data(exp, used),
            'commit': (record or {}).get('commit'),
            'command': portable_command(shlex.join(command)),
            'wall_time_s': _seconds_spent(workdir),
        }
        if 'variants' in summary:  # A study: one row per variant.
            for variant in summary['variants']:
                rows.append(_variant_row(exp, config, base, variant, workdir))
            _mark_winner(exp, config, rows)
        elif summary.get('status'):
            target = exp.target(config, None)
            value = _metric_of(summary, target.metric)
            rows.append(
                {
                    **base,
                    'variant': '',
                    'metric': target.metric,
                    'reported': target.value,
                    'reported_text': target.text,
                    'ours': aggregate([] if value is None else [value]),
                    'epochs': summary.get('epochs_run'),
                    'status': summary['status']
                    + (' (stopped early)' if summary.get('stopped_early') else ''),
                    'device': _device(summary, record),
                    'extra': {k: summary.get(k) for k in ('train_accuracy', 'val_accuracy', 'f1')},
                    'best_val': _best_val(workdir, target.metric),
                }
            )
        else:
            plan = measured.get(probe_key(exp, config))
            if plan is not None:
                plan = {**plan, 'seconds': estimate_seconds(config, plan)}
            rows.extend(_planned_rows(exp, config, base, plan, workdir, record))
    return rows


def _variant_row(
    exp: Experiment, config: str, base: dict, variant: dict, workdir: pathlib.Path
) -> dict[str, Any]:
    target = exp.target(config, variant['variant'])
    runs = [r for r in variant['runs'] if r.get('status') in ('completed', 'diverged')]
    values = [r[target.metric] for r in runs if r.get(target.metric) is not None]
    first = read_json(pathlib.Path(variant['runs'][0]['workdir']) / 'summary.json') or {}
    record = run_record.read_record(variant['runs'][0]['workdir'])
    return {
        **base,
        'variant': variant['variant'],
        'metric': target.metric,
        'reported': target.value,
        'reported_text': target.text,
        'ours': aggregate(values),
        'epochs': max((r.get('epochs_run') or 0 for r in runs), default=None),
        'status': variant['status'],
        'device': _device(first, record),
        'commit': (record or {}).get('commit') or base['commit'],
    }


def _mark_winner(exp: Experiment, config: str, rows: list[dict]) -> None:
    """Adds 'winner' to the study's rows: does the reported winner win here?"""
    reported = exp.winners.get(config)
    mine = [r for r in rows if r['config'] == config]
    scored = [r for r in mine if r['ours']['mean'] is not None]
    if not scored or len(scored) < len(mine):
        return
    best = max(scored, key=lambda r: r['ours']['mean'])
    for r in mine:
        r['winner_here'] = r is best
        r['winner_reported'] = r['variant'] == reported if reported else None


def _planned_rows(
    exp: Experiment,
    config: str,
    base: dict,
    plan: dict | None,
    workdir: pathlib.Path,
    record: dict | None,
) -> list[dict]:
    """Rows of a config without a finished summary; a study interrupted part-way shows the
    variants it has finished (seed 0's run, where the study has seeds)."""
    variants = schedule(config)['variants']
    rows = []
    for variant in variants:
        target = exp.target(config, variant or None)
        why = exp.blocked or exp.planned_reason or 'not run yet'
        run = read_json(workdir / variant / 'summary.json') if variant else None
        run = run or (read_json(workdir / variant / 'seed_0' / 'summary.json') if variant else None)
        if run and run.get('status') == 'completed':
            value = _metric_of(run, target.metric)
            rows.append(
                {
                    **base,
                    'variant': variant,
                    'metric': target.metric,
                    'reported': target.value,
                    'reported_text': target.text,
                    'ours': aggregate([value] if value is not None else []),
                    'epochs': run.get('epochs_run'),
                    'status': 'completed; the study is not finished yet (rerun its command)',
                    'device': _device(run, record),
                }
            )
            continue
        if plan:
            if plan.get('seconds') is not None:
                why += (
                    f'; about {format_duration(plan["seconds"])} of training on '
                    f'{plan["device"]} for the whole config'
                )
            elif plan.get('error'):
                why += f'; no estimate ({plan["error"]})'
        rows.append(
            {
                **base,
                'variant': variant,
                'metric': target.metric,
                'reported': target.value,
                'reported_text': target.text,
                'ours': aggregate([]),
                'epochs': None,
                'status': why,
                'device': '',
            }
        )
    return rows


def _tests_row(exp: Experiment, root: pathlib.Path) -> dict[str, Any]:
    """E9's row: the test file's result from its last run."""
    result = read_json(root / exp.id / TESTS_FILE) or {}
    last = result.get('result', '')
    return {
        'experiment': exp.id,
        'title': exp.title,
        'config': ', '.join(exp.tests),
        'variant': '',
        'metric': 'tests',
        'reported': None,
        'reported_text': 'helpers agree with the formulas and scipy',
        'ours': aggregate([]),
        'ours_text': last.strip('= ') or 'not run yet',
        'epochs': None,
        'status': 'passed'
        if last and ' failed' not in last
        else ('failed' if last else 'not run yet'),
        'device': '',
        'data': '',
        'commit': result.get('commit'),
        'command': shlex.join(['python', '-m', 'pytest', '-q', *exp.tests]),
        'wall_time_s': _seconds_spent(root / exp.id),
    }


def _fmt_value(x: float | None) -> str:
    return '—' if x is None else f'{x:.3f}'


def _best_val(workdir: pathlib.Path, metric: str) -> dict | None:
    """A test-accuracy row's best validation accuracy and its epoch, from its curves."""
    if metric != 'test_accuracy':
        return None
    run = run_row(workdir, 0, None)
    if run['best_val_accuracy'] is None:
        return None
    return {'accuracy': run['best_val_accuracy'], 'epoch': run['best_epoch']}


def _fmt_ours(row: dict) -> str:
    if row.get('ours_text'):
        return row['ours_text']
    agg = row['ours']
    if agg['mean'] is None:
        return '—'
    if agg['n'] > 1:
        return f'{agg["mean"]:.3f} ± {agg["std"]:.3f} (n={agg["n"]})'
    best = row.get('best_val')
    if best:
        return f'{agg["mean"]:.3f} (best val {best["accuracy"]:.3f}, epoch {best["epoch"]})'
    return f'{agg["mean"]:.3f}'


def _fmt_winner(row: dict) -> str:
    if 'winner_here' not in row:
        return ''
    mark = 'best here' if row['winner_here'] else ''
    if row.get('winner_reported'):
        mark = 'reported winner: ' + ('wins here' if row['winner_here'] else 'does not win')
    return mark


def render_markdown(rows: list[dict]) -> str:
    """The results table, then each config's command and commit."""
    header = (
        '| Exp | Config | Variant | Metric | Reported | Ours | Winner | Epochs | Wall time '
        '| Device | Data | Status |'
    )
    lines = [
        '# Reproduction of EXPERIMENTS.md',
        '',
        'Written by `python -m reproduce` from the workdirs under results/reproduction/ '
        '(rerun one row with its command below). Reported: the published figure (a target '
        'on the same data). Ours: mean ± sample std over seeds where several ran. Metric: '
        '`test_accuracy` after the last epoch (the best epoch where early stopping restores '
        "it), `best_val_accuracy` the best epoch's. Wall time: every launch of that config "
        'added up (a study: all its variants).',
        '',
        header,
        '|' + '---|' * (header.count('|') - 1),
    ]
    for r in rows:
        reported = _fmt_value(r['reported'])
        if r.get('reported_text'):
            reported = (
                r['reported_text'] if r['reported'] is None else f'{reported}: {r["reported_text"]}'
            )
        wall = format_duration(r['wall_time_s']) if r.get('wall_time_s') else ''
        cells = [
            r['experiment'], r['config'], r['variant'], r['metric'], reported, _fmt_ours(r),
            _fmt_winner(r), r['epochs'] or '', wall, r['device'], r['data'], r['status'],
        ]  # fmt: skip
        lines.append('| ' + ' | '.join(str(c).replace('|', '/') for c in cells) + ' |')
    findings = [e for e in EXPERIMENTS if e.finding]
    if findings:
        lines += ['', '## Findings', '']
        lines += [f'- {e.id}: {e.finding}' for e in findings]
    lines += ['', '## Commands and commits', '', DATA_DIR_NOTE, '']
    seen = set()
    for r in rows:
        if r['command'] in seen:
            continue
        seen.add(r['command'])
        lines.append(f'- {r["experiment"]} `{r["command"]}` (commit {r["commit"] or "—"})')
    return '\n'.join(lines) + '\n'


def write_table(rows: list[dict], path_md: pathlib.Path) -> None:
    path_md.parent.mkdir(parents=True, exist_ok=True)
    path_md.write_text(render_markdown(rows))
    path_md.with_suffix('.json').write_text(json.dumps(rows, indent=2, default=str) + '\n')

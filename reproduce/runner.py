"""Reproduces the experiment list (figures in reproduce/reported.py): full-schedule runs, the table.

    python -m reproduce --plan                    # what would run, and for how long
    python -m reproduce --only E10,E2             # run them (finished ones reused)
    python -m reproduce --table                   # rewrite the table from the workdirs

Every experiment runs from its own config(s) through `launch.py`, one workdir per config
under `--root` (default results/reproduction/<id>/<config>), so an interrupted one resumes
and a finished one is reused when its config still matches. `--data NAME=VALUE` swaps a
config's dataset for another source, e.g. `--data cifar10=folder:DIR` for CIFAR-10 as an
image folder; the table says which data each row used.

The table (results/REPRODUCTION.md and .json with the default root) has one row per
experiment and per study variant: the reported figure and its metric, ours (mean +- std
over seeds), epochs, wall time, device, data, commit and the exact command. A row not yet
run says why and how long it would take on this device, from a short measured probe.
Tooling beside the library: nothing in cnn_jax/ imports it.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

from cnn_jax import run_record
from cnn_jax.records import format_duration, read_json
from cnn_jax.study_report import aggregate
from reproduce.reported import EXPERIMENTS, Experiment, load_config, schedule

ROOT = run_record.REPO_ROOT
DEFAULT_ROOT = pathlib.Path('results') / 'reproduction'
TIME_FILE = 'reproduce_time.json'  # Seconds spent by every launch in this workdir.
TESTS_FILE = 'tests.json'  # E9: the last run's pytest result line, exit code and commit.
PROBE_STEPS = 10  # The first is excluded (compilation): 9 timed steps.


def config_stem(config: str) -> str:
    path, _, arg = config.partition(':')
    stem = pathlib.Path(path).stem
    return f'{stem}_{arg}' if arg else stem


def workdir_of(root: pathlib.Path, exp: Experiment, config: str) -> pathlib.Path:
    return root / exp.id / config_stem(config)


def data_overrides(exp: Experiment, data: dict[str, str]) -> list[str]:
    """--config flags for `exp`: its dataset swapped, plus any '--config.X=V' given as
    data['--'] (quick checks and tests; a full reproduction passes none)."""
    flags = [f'--config.dataset={data[exp.dataset]}'] if exp.dataset in data else []
    return flags + [f'--config.{kv}' for kv in data.get('--', '').split() if kv]


def launch_command(
    exp: Experiment, config: str, workdir: pathlib.Path, data: dict[str, str]
) -> list[str]:
    if workdir.is_relative_to(ROOT):  # As a user types it from the repository root.
        workdir = workdir.relative_to(ROOT)
    return [
        'python',
        'launch.py',
        f'--config=configs/{config}',
        f'--workdir={workdir}',
        *data_overrides(exp, data),
    ]


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


def portable_command(command: str) -> str:
    """`command` with its `folder:`/`idx:` data path written as DIR (see DATA_DIR_NOTE)."""
    return _DATA_PATH.sub(r'\1DIR', command)


def _run_logged(cmd: list[str], workdir: pathlib.Path) -> int:
    """Runs `cmd` from the repository root, its output to the terminal and launch.log.

    Its seconds go to the workdir's ledger as it runs (every minute), so a launch killed
    with the runner (a session's end) still counts up to its last minute.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ledger = workdir / TIME_FILE
    spent = json.loads(ledger.read_text()) if ledger.exists() else []
    start = written = time.time()

    def record(rc: int | None) -> None:
        entry = {'seconds': round(time.time() - start, 1), 'exit_code': rc}
        ledger.write_text(json.dumps([*spent, entry]) + '\n')

    record(None)
    with open(workdir / 'launch.log', 'a') as log:
        log.write(f'\n$ {shlex.join(cmd)}\n')
        log.flush()
        proc = subprocess.Popen(
            [sys.executable, *cmd[1:]],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)
            if time.time() - written > 60:
                record(None)
                written = time.time()
        rc = proc.wait()
    record(rc)
    return rc


def reuse_identical_runs(
    exp: Experiment, config: str, workdir: pathlib.Path, root: pathlib.Path, data: dict[str, str]
) -> None:
    """Copies into `workdir` each study run that another finished workdir under `root`
    already computed with the same result-changing config (E4's and E6-E7's studies share
    their baseline run). The copy keeps a note of where it came from."""
    from cnn_jax import study

    c = load_config(config)
    if 'study' not in c:
        return
    if exp.dataset in data:
        c.dataset = data[exp.dataset]
    finished = {}
    for record_file in root.rglob(run_record.CONFIG_FILE):
        summary = read_json(record_file.parent / 'summary.json') or {}
        record = read_json(record_file)
        if summary.get('status') == 'completed' and record and 'study.name' not in record['config']:
            finished[record_file.parent] = record['config']
    seeds = study.study_seeds(c)
    for variant in study.variant_names(c):
        for seed in seeds:
            target = study.run_dir(workdir, variant, seed, seeds)
            if (target / 'summary.json').exists():
                continue
            wanted = run_record.flat_config(study.variant_config(c, variant, seed))
            source = next(
                (d for d, rec in finished.items() if not run_record.result_changes(rec, wanted)),
                None,
            )
            if source is not None and source != target:
                print(
                    f'{exp.id}: {variant} (seed {seed}) is the run in {source}: copied', flush=True
                )
                shutil.copytree(source, target, dirs_exist_ok=True)
                (target / 'copied_from.txt').write_text(f'{source}\n')


def run_experiments(
    experiments: Sequence[Experiment], root: pathlib.Path, data: dict[str, str]
) -> int:
    """Runs (or resumes) every config of `experiments`; returns the worst exit code."""
    worst = 0
    for exp in experiments:
        if exp.blocked:
            print(f'{exp.id}: not run: {exp.blocked}', flush=True)
            continue
        if exp.tests:
            rc = _run_logged(['python', '-m', 'pytest', '-q', *exp.tests], root / exp.id)
            worst = max(worst, rc)
            log = (root / exp.id / 'launch.log').read_text().strip().splitlines()
            last = next((ln for ln in reversed(log) if ' passed' in ln or ' failed' in ln), '')
            result = {
                'result': last.strip('= '),
                'exit_code': rc,
                'commit': run_record.git_commit(),
            }
            (root / exp.id / TESTS_FILE).write_text(json.dumps(result) + '\n')
            continue
        for config in exp.configs:
            workdir = workdir_of(root, exp, config)
            print(f'{exp.id}: {config} in {workdir}', flush=True)
            reuse_identical_runs(exp, config, workdir, root, data)
            rc = _run_logged(launch_command(exp, config, workdir, data), workdir)
            if rc == 130:
                return rc  # Stopped: resume with the same command.
            worst = max(worst, rc)
    return worst


# --- Estimates ------------------------------------------------------------------------


def _probe_key(exp: Experiment, config: str) -> str:
    return f'{exp.id}:{config}:{run_record.host_description()}'


def measured_throughput(root: pathlib.Path) -> dict[str, dict]:
    return read_json(root / 'throughput.json') or {}


def probe(exp: Experiment, config: str, root: pathlib.Path, data: dict[str, str]) -> dict:
    """Measured training throughput of `config` on this device, from a few steps.

    Cached in root/throughput.json per (experiment config, host); the probe's own
    workdir is thrown away.
    """
    cache_file = root / 'throughput.json'
    cache = measured_throughput(root)
    key = _probe_key(exp, config)
    if key in cache:
        return cache[key]
    probe_dir = root / '_probe' / exp.id / config_stem(config)
    run_record.start_over(probe_dir)
    measured_config, variant = exp.probe_as.get(config, (config, schedule(config)['variants'][0]))
    only = [f'--config.only={variant}'] if variant else []
    cmd = [
        *launch_command(exp, measured_config, probe_dir, data),
        *only,
        '--config.num_epochs=1',
        f'--config.steps_per_epoch={PROBE_STEPS}',
        '--config.max_eval_examples=512',
        '--config.early_stopping.patience=0',
    ]
    print(f'{exp.id}: measuring {config} ({PROBE_STEPS} steps) ...', flush=True)
    proc = subprocess.run(
        [sys.executable, *cmd[1:]], cwd=ROOT, capture_output=True, text=True, check=False
    )
    summaries = sorted(probe_dir.rglob('summary.json'))
    run_summaries = [json.loads(p.read_text()) for p in summaries]
    run_summaries = [s for s in run_summaries if 'train_steps_per_s' in s]
    if proc.returncode != 0 or not run_summaries:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ['no output']
        return {'error': tail[0][:300]}
    s = run_summaries[0]
    result = {
        'train_images_per_s': s['train_images_per_s'],
        'num_train_examples': s['num_train_examples'],
        'device': f'{s["platform"]} ({s["device_kind"]}) x{s["num_devices"]}',
    }
    cache[key] = result
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    cache_file.write_text(json.dumps(cache, indent=2) + '\n')
    run_record.start_over(probe_dir)
    return result


def estimate_seconds(config: str, measured: dict) -> float | None:
    """Training time at full schedule (every variant and seed; evaluation not counted).

    The SVM task trains no network: one forward pass over the training images, taken as
    a third of a training step's cost.
    """
    if not measured.get('train_images_per_s'):
        return None
    plan = schedule(config)
    if plan['task'] == 'svm':
        return measured['num_train_examples'] / (3 * measured['train_images_per_s'])
    images = measured['num_train_examples'] * plan['epochs'] * plan['runs']
    return images / measured['train_images_per_s']


# --- Collecting -------------------------------------------------------------------------


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
            command = record['command']
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
                }
            )
        else:
            plan = measured.get(_probe_key(exp, config))
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


def _fmt_ours(row: dict) -> str:
    if row.get('ours_text'):
        return row['ours_text']
    agg = row['ours']
    if agg['mean'] is None:
        return '—'
    if agg['n'] > 1:
        return f'{agg["mean"]:.3f} ± {agg["std"]:.3f} (n={agg["n"]})'
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


# --- Command line -----------------------------------------------------------------------


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m reproduce', description=__doc__.split('\n')[0])
    p.add_argument('--only', default='', help='comma-separated ids, e.g. E2,E10 (default all)')
    p.add_argument('--root', default=str(DEFAULT_ROOT), help='where the workdirs live')
    p.add_argument(
        '--data',
        action='append',
        default=[],
        metavar='NAME=VALUE',
        help='use VALUE wherever a config reads dataset NAME, e.g. cifar10=folder:DIR',
    )
    p.add_argument(
        '--override',
        action='append',
        default=[],
        metavar='KEY=VALUE',
        help='extra --config.KEY=VALUE for every launch (quick checks; not a reproduction)',
    )
    p.add_argument('--plan', action='store_true', help='measure and print the plan; no training')
    p.add_argument('--table', action='store_true', help='only rewrite the table')
    return p.parse_args(argv)


def select(only: str) -> list[Experiment]:
    if not only:
        return list(EXPERIMENTS)
    wanted = [s.strip() for s in only.split(',') if s.strip()]
    known = {e.id: e for e in EXPERIMENTS}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise SystemExit(f'error: unknown experiment(s) {unknown}; known: {", ".join(known)}')
    return [known[w] for w in wanted]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    data = {}
    for item in args.data:
        name, sep, value = item.partition('=')
        if not sep:
            raise SystemExit(f'error: --data takes NAME=VALUE, got {item!r}')
        data[name] = value
    if args.override:
        data['--'] = ' '.join(args.override)
    chosen = select(args.only)
    root = pathlib.Path(args.root)
    if not root.is_absolute():
        root = ROOT / root
    rc = 0
    if args.plan:
        for exp in chosen:
            if exp.tests:
                continue
            for config in exp.configs:
                if (workdir_of(root, exp, config) / 'summary.json').exists():
                    continue
                measured = probe(exp, config, root, data)
                seconds = estimate_seconds(config, measured)
                shown = format_duration(seconds) if seconds is not None else measured.get('error')
                print(f'{exp.id} {config}: {shown} on {measured.get("device", "?")}', flush=True)
    elif not args.table:
        rc = run_experiments(chosen, root, data)
    rows = [row for exp in EXPERIMENTS for row in collect_rows(exp, root, data)]
    default = root == ROOT / DEFAULT_ROOT
    table = ROOT / 'results' / 'REPRODUCTION.md' if default else root / 'REPRODUCTION.md'
    write_table(rows, table)
    print(f'Table: {table}', flush=True)
    return rc

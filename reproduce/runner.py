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
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence

from cnn_jax import run_record
from cnn_jax.records import format_duration, read_json
from reproduce.estimates import estimate_seconds, probe
from reproduce.reported import EXPERIMENTS, Experiment, load_config
from reproduce.table import collect_rows, write_table
from reproduce.workdirs import (
    DEFAULT_ROOT,
    ROOT,
    TESTS_FILE,
    TIME_FILE,
    launch_command,
    workdir_of,
)


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

"""Where `python -m reproduce` keeps each experiment's runs, and the command that trains one.

One workdir per config under a root (default results/reproduction/<id>/<config>); the
command is `launch.py` as a user types it from the repository root.
"""

from __future__ import annotations

import pathlib

from cnn_jax import run_record
from reproduce.reported import Experiment

ROOT = run_record.REPO_ROOT
DEFAULT_ROOT = pathlib.Path('results') / 'reproduction'
TIME_FILE = 'reproduce_time.json'  # Seconds spent by every launch in this workdir.
TESTS_FILE = 'tests.json'  # E9: the last run's pytest result line, exit code and commit.


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

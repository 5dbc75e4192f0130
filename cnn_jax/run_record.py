"""What produced a workdir, the guard that keeps another config out of it, and its lock.

The first run in a workdir writes `config.json`: the resolved config, the git commit of
the code, the command line, the host and the time. Once a run there has saved a checkpoint
or a summary, a later run resumes only if the keys that change results are equal;
otherwise it stops with a ConfigError (exit 2) that names the keys and the ways out. Keys
that cannot change results (logging, evaluation batch size, checkpoint cadence, where
caches live) do not count. A run that stopped before saving anything leaves nothing to
protect: the next run's config replaces its record.

`workdir_lock` keeps a second launch out of a workdir in use (`.lock`, an flock that the
kernel drops when its holder dies; the holder empties the file when it ends).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import ml_collections

from cnn_jax.errors import ConfigError
from cnn_jax.records import Reporter, read_json, write_json
from configs import default

CONFIG_FILE = 'config.json'
LOCK_FILE = '.lock'

# Dotted keys whose value cannot change what a run computes.
NON_RESULT_KEYS = frozenset(
    {
        'name',
        'log_every_steps',
        'eval_batch_size',
        'checkpoint_every_epochs',
        'keep_checkpoints',
        'cache_dir',
        'data_dir',
        'manual_dir',
        'vectorize',
        'only',
        'sanity_loss_tolerance',
        'profile_steps',
    }
)
ABSENT = '(absent)'  # A key one of the two configs does not have.
REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def flat_config(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
    """{dotted key: JSON value} of a config (tuples become lists, as JSON stores them)."""
    tree = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else config
    return json.loads(json.dumps(flatten(tree), default=repr))


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
    """{dotted key: value} of a nested dict, values as they are (tuples stay tuples)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f'{prefix}{key}.'))
        else:
            out[f'{prefix}{key}'] = value
    return out


def result_changes(
    recorded: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any] | None = None
) -> dict[str, tuple]:
    """{key: (recorded value, current value)} for the result-changing keys that differ. Only
    keys the current config has count. One the record lacks counts only if it is off its
    default (`defaults`): a key added to configs/default.py after the run, at its default,
    leaves that run as it was."""
    defaults = defaults or {}
    changes = {}
    # A study's own keys do not count: each of its runs is checked in its own workdir, so a
    # study can gain variants or seeds and keep the runs it has.
    keys = {k for k in current.keys() - NON_RESULT_KEYS if not k.startswith('study.')}
    for key in sorted(keys):
        old = recorded.get(key, ABSENT)
        if old == ABSENT and key in defaults and current[key] == defaults[key]:
            continue
        if old != current[key]:
            changes[key] = (old, current[key])
    return changes


def git_commit() -> str | None:
    """HEAD of the checkout cnn_jax runs from ('+dirty' when files differ), or None."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            ['git', *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )

    try:
        head = git('rev-parse', 'HEAD')
        if head.returncode != 0:
            return None
        dirty = git('status', '--porcelain', '--untracked-files=no').stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return head.stdout.strip() + ('+dirty' if dirty else '')


def host_description() -> str:
    """'<cpu model>, N cores' from /proc/cpuinfo where it exists."""
    model = platform.processor() or platform.machine()
    cpuinfo = pathlib.Path('/proc/cpuinfo')
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith('model name'):
                model = line.split(':', 1)[1].strip()
                break
    return f'{model}, {os.cpu_count()} cores'


def read_record(workdir: str | pathlib.Path) -> dict[str, Any] | None:
    """The workdir's config.json (None when absent or half-written: the next write replaces
    it)."""
    return read_json(pathlib.Path(workdir) / CONFIG_FILE)


def trained(workdir: str | pathlib.Path) -> bool:
    """Whether a run in `workdir` (or, for a study, below it) saved a checkpoint or its
    summary (a study's own summary.json, which has no status, does not count)."""
    root = pathlib.Path(workdir)
    if any(root.glob('**/checkpoints/*/[0-9]*')):
        return True
    return any('status' in (read_json(p) or {}) for p in root.glob('**/summary.json'))


RESTART_ADVICE = 'use another --workdir, or add --restart to delete that run and start over'


def check_config(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    may_change: frozenset[str] = frozenset(),
    advice: str = RESTART_ADVICE,
) -> None:
    """Raises ConfigError if `workdir` holds results of a config that differs in results,
    in keys other than `may_change` (an evaluation-only run's data keys); `advice` ends it."""
    record = read_record(workdir)
    if record is None or not trained(workdir):
        return
    defaults = flat_config(default.get_config())
    changes = result_changes(record['config'], flat_config(config), defaults)
    changes = {k: v for k, v in changes.items() if k not in may_change}
    if changes:
        shown = '; '.join(f'{k}: {a!r} there, {b!r} now' for k, (a, b) in list(changes.items())[:6])
        more = f' (and {len(changes) - 6} more)' if len(changes) > 6 else ''
        raise ConfigError(f'{workdir} holds a run of another config ({shown}{more}); {advice}')


def record_config(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> None:
    """Checks `workdir` against `config`, then writes config.json unless a run there has
    results already (a run that produced nothing leaves its record to be replaced)."""
    check_config(config, workdir)
    path = pathlib.Path(workdir) / CONFIG_FILE
    if read_record(workdir) is not None and trained(workdir):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        'config': flat_config(config),
        'commit': git_commit(),
        'command': [pathlib.Path(sys.executable).name, *sys.argv],
        'host': host_description(),
        'started': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    }
    write_json(path, record)


def start_over(workdir: str | pathlib.Path) -> None:
    """Deletes what a previous run left in `workdir` (the --restart flag), except its lock."""
    workdir = pathlib.Path(workdir)
    for path in workdir.iterdir() if workdir.is_dir() else ():
        if path.name == LOCK_FILE:
            continue
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


@contextlib.contextmanager
def workdir_lock(workdir: str | pathlib.Path) -> Iterator[None]:
    """Holds `workdir` for this process; ConfigError (exit 2) names the holder if another has
    it. A `.lock` still naming a process (one that died: its flock went with it) is taken
    over with a warning. SIGTERM exits through the release."""
    path = pathlib.Path(workdir) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # Kept: an empty one is free.
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(os.read(fd, 4096))
        os.close(fd)
        raise ConfigError(
            f'{workdir} is in use by {holder or "another launch (starting)"}; wait for it '
            'to finish or use another --workdir'
        ) from None
    old = _holder(os.read(fd, 4096))
    if old:
        Reporter().warn(f'{workdir}: taking over the lock of {old}, which died')
    since = datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')
    me = json.dumps({'host': socket.gethostname(), 'pid': os.getpid(), 'since': since})
    os.ftruncate(fd, 0)
    os.pwrite(fd, me.encode(), 0)
    main_thread = threading.current_thread() is threading.main_thread()
    on_term = signal.getsignal(signal.SIGTERM)
    if main_thread:  # Training installs its own handler (save, then stop) while it runs.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, on_term)
        os.ftruncate(fd, 0)
        os.close(fd)


def _holder(text: bytes) -> str | None:
    """'pid P on HOST since TIME' from a lock file's contents (None if empty or partial)."""
    try:
        h = json.loads(text)
        return f'pid {h["pid"]} on {h["host"]} since {h["since"]}'
    except (ValueError, KeyError, TypeError):
        return None

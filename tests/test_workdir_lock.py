"""A workdir in use is refused, not fought over; one where nothing trained claims nothing.

The lock (cnn_jax.run_record.workdir_lock) is tested in-process against a holder in
another process, then through launch.py as a user meets it: two launches at once, a
killed holder, and a corrected command after one that failed before training.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from cnn_jax import run_record
from cnn_jax.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 600  # Two CPU cores shared with other work.
# tests/conftest.py tiny_config, as command-line overrides of the quickstart.
TINY = [
    '--config=configs/quickstart.py',
    '--config.model_options.features=(8,)',
    '--config.model_options.dense=16',
    '--config.num_epochs=2',
    '--config.steps_per_epoch=5',
]
HOLD = """
import sys, time
from cnn_jax import run_record
with run_record.workdir_lock(sys.argv[1]):
    print('held', flush=True)
    time.sleep(600)
"""


def launch(workdir: pathlib.Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
    return subprocess.Popen(
        [sys.executable, 'launch.py', *TINY, f'--workdir={workdir}', *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def wait_for_lock(path: pathlib.Path, proc: subprocess.Popen) -> None:
    deadline = time.time() + TIMEOUT_S
    while not (path.exists() and path.read_text()):
        assert proc.poll() is None and time.time() < deadline, 'the holder never took the lock'
        time.sleep(0.1)


def test_a_held_workdir_is_refused_and_a_dead_holders_lock_taken_over(tmp_path, capsys):
    holder = subprocess.Popen(
        [sys.executable, '-c', HOLD, str(tmp_path)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == 'held\n'
        mark = f'is in use by pid {holder.pid} on {socket.gethostname()} since '
        with pytest.raises(ConfigError, match=mark), run_record.workdir_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_record.workdir_lock(tmp_path):
        held = json.loads((tmp_path / run_record.LOCK_FILE).read_text())
        assert held['pid'] == os.getpid()
    assert f'taking over the lock of pid {holder.pid} on ' in capsys.readouterr().out
    assert (tmp_path / run_record.LOCK_FILE).read_text() == ''  # Released on exit.


@pytest.mark.slow
def test_two_launches_at_once_one_trains_the_other_exits_2_naming_it(tmp_path):
    procs = [launch(tmp_path / 'w'), launch(tmp_path / 'w')]
    (rc_a, _, err_a), (rc_b, _, err_b) = [wait(p) for p in procs]
    assert sorted([rc_a, rc_b]) == [0, 2], (err_a[-2000:], err_b[-2000:])
    winner, loser_err = (procs[0], err_b) if rc_a == 0 else (procs[1], err_a)
    lines = loser_err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: '), loser_err
    assert f'in use by pid {winner.pid} on {socket.gethostname()} since ' in lines[0]
    summary = json.loads((tmp_path / 'w' / 'summary.json').read_text())
    assert summary['status'] == 'completed'
    assert (tmp_path / 'w' / run_record.LOCK_FILE).read_text() == ''  # Released.


@pytest.mark.slow
def test_a_killed_launchs_lock_is_taken_over(tmp_path):
    first = launch(tmp_path)
    wait_for_lock(tmp_path / run_record.LOCK_FILE, first)
    first.send_signal(signal.SIGKILL)
    wait(first)
    rc, out, err = wait(launch(tmp_path))
    assert rc == 0, err[-3000:]
    assert f'taking over the lock of pid {first.pid} on {socket.gethostname()}' in out
    assert json.loads((tmp_path / 'summary.json').read_text())['status'] == 'completed'


@pytest.mark.slow
def test_a_corrected_command_proceeds_where_the_first_failed_before_training(tmp_path):
    # 8x8 grey digits cannot take ImageNet's 3-channel statistics: exit 2 once loaded.
    rc, _, err = wait(launch(tmp_path, '--config.normalize=imagenet'))
    assert rc == 2 and 'normalize=imagenet' in err, err[-3000:]
    assert run_record.read_record(tmp_path)['config']['normalize'] == 'imagenet'
    rc, _, err = wait(launch(tmp_path))  # No --restart needed: nothing trained there.
    assert rc == 0, err[-3000:]
    assert run_record.read_record(tmp_path)['config']['normalize'] == 'dataset'
    # Once a run has checkpoints, the guard holds.
    rc, _, err = wait(launch(tmp_path, '--config.learning_rate=0.5'))
    assert rc == 2 and 'holds a run of another config (learning_rate: ' in err, err[-3000:]

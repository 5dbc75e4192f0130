"""Two gaps a run could fall into end like the clean run: a corrupt best checkpoint, and two
processes starting on a cold dataset cache (both write it)."""

import json
import os
import pathlib
import subprocess
import sys
import tarfile

import pytest

from tests.test_multiprocess import (
    CONFIG,
    TOL,
    finish,
    free_port,
    max_difference,
    results,
    write_digits,
)
from tests.test_multiprocess import (
    start as multiprocess_start,
)
from tests.test_workdir_lock import TINY

REPO = pathlib.Path(__file__).resolve().parent.parent
TIMEOUT_S = 600


def launch(workdir: pathlib.Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, 'launch.py', *TINY, f'--workdir={workdir}', *args],
        cwd=REPO,
        env=dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8'),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_a_corrupt_best_checkpoint_falls_back_to_the_latest(tmp_path):
    # Without early stopping the run ends on its latest state: the numbers to fall back to.
    launch(tmp_path / 'latest')
    patience = '--config.early_stopping.patience=5'  # Restores the best at the end.
    launch(tmp_path / 'best', patience)
    # As if killed after its last checkpoint: the re-run does only the final evaluation,
    # which restores the best checkpoint; its arrays are now cut short.
    (tmp_path / 'best' / 'summary.json').unlink()
    cut = 0
    for path in (tmp_path / 'best' / 'checkpoints' / 'best').glob('*/state/**/d/*'):
        os.truncate(path, path.stat().st_size // 2)
        cut += 1
    assert cut
    out = launch(tmp_path / 'best', patience).stdout
    assert 'WARNING: the best checkpoint (step ' in out and 'keeping the latest state' in out
    want = json.loads((tmp_path / 'latest' / 'summary.json').read_text())
    got = json.loads((tmp_path / 'best' / 'summary.json').read_text())
    assert got['status'] == 'completed' and got['resumed_from_step'] == 10
    assert abs(got['test_loss'] - want['test_loss']) <= 1e-5
    assert got['test_accuracy'] == want['test_accuracy']
    assert got['confusion_matrix'] == want['confusion_matrix']


def start(root: pathlib.Path, name: str, archive: pathlib.Path, devices: int, job=None):
    """tests/test_multiprocess.py's start(), on the archive, into root/<name>."""
    cwd = f'{name}_{job[2]}' if job else f'{name}_run'
    return multiprocess_start(root, root / name, cwd, devices, job, data=archive)


@pytest.mark.slow
def test_two_processes_on_a_cold_cache_end_like_one(tmp_path):
    (tmp_path / 'tiny.py').write_text(CONFIG)
    write_digits(tmp_path / 'digits')
    archive = tmp_path / 'digits.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        tar.add(tmp_path / 'digits', arcname='digits')
    port = free_port()  # Both processes extract, decode and cache the archive.
    outs = finish([start(tmp_path, 'two', archive, 1, (port, 2, i)) for i in range(2)])
    assert [rc for rc, _ in outs] == [0, 0], outs
    ((rc, out),) = finish([start(tmp_path, 'one', archive, 2)])
    assert rc == 0, out
    assert max_difference(results(tmp_path / 'two'), results(tmp_path / 'one')) <= TOL
    cache = tmp_path / 'cache'
    assert len(list(cache.glob('folder-*.npz'))) == 1, sorted(cache.iterdir())
    assert not list(cache.glob('*.tmp*')), sorted(cache.iterdir())

"""Evaluation-only runs (launch.py --eval_only, cnn_jax.evaluate_only), as a user runs
them: a finished run's best checkpoint reproduces its summary.json's test metrics exactly,
on its own data and on the same images read as another dataset, and nothing of the run
changes; mistakes end as one error line."""

import hashlib
import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from cnn_jax.data import sources
from tests.test_data import write_idx

ROOT = pathlib.Path(__file__).resolve().parents[1]
# A run of two short epochs with early stopping on: it tests its best checkpoint's state.
RUN = [
    '--config=configs/quickstart.py',
    '--config.num_epochs=2',
    '--config.steps_per_epoch=5',
    '--config.early_stopping.patience=5',
    '--config.model_options.features=(8,)',
    '--config.model_options.dense=16',
]


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, 'launch.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def assert_one_error_line(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1, r.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def digests(workdir: pathlib.Path) -> dict[str, str]:
    """sha256 of every file of the run's checkpoints and config.json."""
    paths = [*sorted((workdir / 'checkpoints').rglob('*')), workdir / 'config.json']
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('run')
    r = launch(*RUN, f'--workdir={workdir}')
    assert r.returncode == 0, r.stderr[-3000:]
    return workdir


def assert_reproduces_summary(workdir: pathlib.Path, name: str) -> dict:
    summary = json.loads((workdir / 'summary.json').read_text())
    evaluated = json.loads((workdir / f'{name}.json').read_text())
    for key in ('test_loss', 'test_accuracy', 'confusion_matrix', 'per_class_accuracy', 'f1'):
        assert evaluated[key] == summary[key], key
    return evaluated


@pytest.mark.slow
def test_eval_only_reproduces_the_summary_and_touches_no_checkpoint(trained):
    before = digests(trained)
    r = launch(*RUN, f'--workdir={trained}', '--eval_only')
    assert r.returncode == 0, r.stderr[-3000:]
    evaluated = assert_reproduces_summary(trained, 'eval_best')
    assert evaluated['checkpoint'] == 'best' and evaluated['dataset'] == 'digits'
    assert digests(trained) == before
    text = (trained / 'eval_best.md').read_text()
    assert f'| test | {evaluated["test_accuracy"]:.4f} |' in text and 'Per-class' in text
    assert (trained / 'eval_best_confusion_matrix.png').stat().st_size > 0


@pytest.mark.slow
def test_eval_only_on_other_data_of_the_same_classes(trained, tmp_path):
    """digits' own arrays written as IDX files: another dataset string, the same numbers."""
    raw = sources.read_digits()
    for name, array in (
        ('train-images-idx3-ubyte', raw.train_images[..., 0]),
        ('train-labels-idx1-ubyte', raw.train_labels),
        ('t10k-images-idx3-ubyte', raw.test_images[..., 0]),
        ('t10k-labels-idx1-ubyte', raw.test_labels),
    ):
        write_idx(tmp_path / name, np.asarray(array), gz=False)
    before = digests(trained)
    r = launch(*RUN, f'--workdir={trained}', '--eval_only', f'--config.dataset=idx:{tmp_path}')
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((trained / 'eval_best.json').read_text())['dataset'] != 'digits'
    assert_reproduces_summary(trained, 'eval_best')
    assert digests(trained) == before


@pytest.mark.slow
@pytest.mark.parametrize(
    'args, fragments',
    [
        (['--config.model_options.dense=32'], ['model_options.dense', 'only the data keys']),
        (['--config.classes=(0, 1, 2)'], ['holds a model of 10 classes', 'has 3']),
        (['--restart'], ['never deletes a run']),
    ],
)
def test_eval_only_keeps_the_config_guard(trained, args, fragments):
    before = digests(trained)
    assert_one_error_line(launch(*RUN, f'--workdir={trained}', '--eval_only', *args), *fragments)
    assert digests(trained) == before


def test_eval_only_needs_a_workdir_with_checkpoints(tmp_path):
    missing = tmp_path / 'none'
    assert_one_error_line(launch(*RUN, f'--workdir={missing}', '--eval_only'), 'no workdir')
    assert not missing.exists()
    r = launch(*RUN, f'--workdir={tmp_path}', '--eval_only', '--checkpoint=latest')
    assert_one_error_line(r, 'no latest checkpoint in')
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_eval_only_latest_evaluates_the_moving_average(tmp_path):
    """Without early stopping the run tests its last state: --checkpoint=latest reproduces
    it, with the EMA weights the run evaluated (not the raw ones)."""
    run = [*RUN[:3], '--config.ema_decay=0.5', f'--workdir={tmp_path}']
    assert launch(*run).returncode == 0
    r = launch(*run, '--eval_only', '--checkpoint=latest')
    assert r.returncode == 0, r.stderr[-3000:]
    evaluated = assert_reproduces_summary(tmp_path, 'eval_latest')
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert evaluated['ema_weights'] and summary['test_raw_loss'] != evaluated['test_loss']
    assert 'moving average' in (tmp_path / 'eval_latest.md').read_text()

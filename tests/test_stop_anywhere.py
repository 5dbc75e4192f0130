"""Stop anywhere: a stopped, killed or corrupted run, re-run, ends as the uninterrupted one.

Three epochs of four steps (tests/conftest.py `tiny_config`, `cnn_jax.experiment.run`).
A stop at any step, a kill between any two checkpoint saves, and an unreadable newest
checkpoint must all end, after re-running the same command, with the uninterrupted
run's metrics.jsonl rows and summary metrics.
"""

import functools
import json
import pathlib
import shutil

import jax.numpy as jnp
import pytest

from cnn_jax import experiment, training_loop
from cnn_jax.checkpoints import Checkpoints
from cnn_jax.errors import CheckpointError, Interrupted
from tests import conftest
from tests.conftest import tiny_config

EPOCHS, STEPS = 3, 4
# Time, and where the run resumed from, differ between runs by design.
VOLATILE = conftest.VOLATILE


def config():
    c = tiny_config(num_epochs=EPOCHS, steps_per_epoch=STEPS)
    c.model_options.dropout_rate = 0.2  # Resuming must replay the dropout masks too.
    c.augment.flip = True
    # val_loss falls every epoch here, so every epoch saves a best checkpoint (the kill
    # points below rely on it: a point that never comes fails its pytest.raises).
    c.best_metric = 'val_loss'
    return c


def epoch_rows(workdir: pathlib.Path) -> list[dict]:
    lines = (workdir / 'metrics.jsonl').read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != 'elapsed_s'} for line in lines]


@pytest.fixture(scope='module')
def straight(tmp_path_factory, suite_cache):
    """The uninterrupted run: (summary, metrics.jsonl epoch rows)."""
    workdir = tmp_path_factory.mktemp('straight')
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv('CNN_JAX_CACHE', str(suite_cache))
        out = experiment.run(config(), workdir)
    assert [r['epoch'] for r in epoch_rows(workdir)] == [1, 2, 3]
    return out, epoch_rows(workdir)


def assert_close(got, want, where=''):
    """Equal structures; numbers within 1e-6 (the runs are deterministic; float decides)."""
    conftest.assert_close(got, want, rel_tol=1e-6, abs_tol=1e-6, where=where)


def assert_same_as_straight(out: dict, workdir: pathlib.Path, straight) -> None:
    want_out, want_rows = straight
    assert out['status'] == 'completed' and out['epochs_run'] == EPOCHS
    assert_close(epoch_rows(workdir), want_rows, 'metrics.jsonl')
    summary = json.loads((workdir / 'summary.json').read_text())
    for got in (out, summary):
        assert_close(
            {k: v for k, v in got.items() if k not in VOLATILE},
            {k: v for k, v in want_out.items() if k not in VOLATILE},
            'summary',
        )


def run_with_hook(workdir: pathlib.Path, monkeypatch, hook) -> None:
    with monkeypatch.context() as m:
        m.setattr(
            experiment,
            'train_and_evaluate',
            functools.partial(training_loop.train_and_evaluate, hooks=[hook]),
        )
        experiment.run(config(), workdir)


# --- A stop at any step -----------------------------------------------------------------

STOPS = {
    'first_step': 1,
    'last_step_of_epoch_1': STEPS,  # Found: StepAlreadyExistsError on every re-run.
    'first_step_of_epoch_2': STEPS + 1,
    'middle_of_epoch_2': STEPS + 2,
    'last_step_of_epoch_2': 2 * STEPS,
    'last_step_of_last_epoch': EPOCHS * STEPS,
}


@pytest.mark.slow
@pytest.mark.parametrize('stop_at', STOPS.values(), ids=STOPS.keys())
def test_stop_at_any_step_then_rerun_equals_uninterrupted(stop_at, straight, tmp_path, monkeypatch):
    with pytest.raises(Interrupted, match=f'interrupted at step {stop_at};'):
        run_with_hook(tmp_path, monkeypatch, lambda step: step == stop_at)
    out = experiment.run(config(), tmp_path)
    assert out['resumed_from_step'] == stop_at
    assert_same_as_straight(out, tmp_path, straight)
    # And a re-run of the finished run changes nothing.
    assert_same_as_straight(experiment.run(config(), tmp_path), tmp_path, straight)


# --- A kill between any two saves ---------------------------------------------------------


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the loop catches it or saves on its way out."""


# (method, step): the kill comes just before that call, after every earlier save landed.
# 'close' comes after the last save: training finished, the run died before its summary.
KILLS = {
    'before_best_1': ('save_best', STEPS, None),
    'between_best_and_latest_1': ('save_latest', STEPS, None),
    'between_latest_1_and_best_2': ('save_best', 2 * STEPS, STEPS),
    'between_best_and_latest_2': ('save_latest', 2 * STEPS, STEPS),
    'between_best_and_latest_3': ('save_latest', 3 * STEPS, 2 * STEPS),
    'after_the_last_save': ('close', None, 3 * STEPS),
}


@pytest.mark.slow
@pytest.mark.parametrize('method, step, resume_at', KILLS.values(), ids=KILLS.keys())
def test_kill_between_saves_then_rerun_equals_uninterrupted(
    method, step, resume_at, straight, tmp_path, monkeypatch
):
    original = getattr(Checkpoints, method)

    def killed(self, *args, **kwargs):
        if step is None or args[0] == step:
            self.wait()  # The earlier saves landed; this one never starts.
            raise Killed
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Checkpoints, method, killed)
        with pytest.raises(Killed):
            experiment.run(config(), tmp_path)
    out = experiment.run(config(), tmp_path)
    assert out['resumed_from_step'] == resume_at
    assert_same_as_straight(out, tmp_path, straight)


# --- An unreadable newest checkpoint --------------------------------------------------------


def _array_chunks(step_dir: pathlib.Path) -> list[pathlib.Path]:
    """The train state's array data files (under OCDBT's d/ folders; Orbax reads the
    merged top-level copy, other versions the per-process one: damage both)."""
    chunks = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
    assert chunks, list(step_dir.rglob('*'))
    return chunks


def _truncate(step_dir: pathlib.Path) -> None:
    for path in _array_chunks(step_dir):
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _delete_files(step_dir: pathlib.Path) -> None:
    for path in _array_chunks(step_dir):
        path.unlink()


def _remove_commit_markers(step_dir: pathlib.Path) -> None:
    for marker in step_dir.rglob('commit_success.txt'):
        marker.unlink()


def _half_written(step_dir: pathlib.Path) -> None:
    """Uncommitted, and the loop record never written."""
    _remove_commit_markers(step_dir)
    shutil.rmtree(step_dir / 'loop')


# name -> (damage to the newest latest checkpoint (step 10), the step the re-run resumes at).
CORRUPTIONS = {
    'truncated_files': (_truncate, 2 * STEPS),
    'deleted_files': (_delete_files, 2 * STEPS),
    'half_written': (_half_written, 2 * STEPS),
    # On a POSIX file system Orbax commits by renaming the finished temporary directory;
    # a step directory whose data all reads back is complete, marker or not.
    'no_commit_marker_data_intact': (_remove_commit_markers, 2 * STEPS + 2),
}


@pytest.mark.slow
@pytest.mark.parametrize('damage, resume_at', CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_unreadable_newest_checkpoint_falls_back_to_the_previous(
    damage, resume_at, straight, tmp_path, monkeypatch, capsys
):
    newest = 2 * STEPS + 2
    with pytest.raises(Interrupted):
        run_with_hook(tmp_path, monkeypatch, lambda step: step == newest)
    latest = tmp_path / 'checkpoints' / 'latest'
    assert sorted(int(p.name) for p in latest.iterdir()) == [2 * STEPS, newest]
    damage(latest / str(newest))
    capsys.readouterr()
    out = experiment.run(config(), tmp_path)
    printed = capsys.readouterr().out
    assert out['resumed_from_step'] == resume_at
    if resume_at != newest:
        assert f'WARNING: checkpoint step {newest} in {latest} could not be restored' in printed
    else:
        assert 'WARNING' not in printed
    assert_same_as_straight(out, tmp_path, straight)


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    """Every step unreadable (a changed model, say): nothing is deleted, the error says so."""
    ckpt = Checkpoints(tmp_path)
    for step in (1, 2):
        ckpt.save_latest(step, {'w': jnp.zeros(3)}, {'epoch': 0})
    ckpt.wait()
    with pytest.raises(CheckpointError, match=r'steps \[2, 1\] in .* could be restored'):
        ckpt.restore_latest({'w': jnp.zeros(4)})
    assert ckpt.latest.all_steps() == [1, 2]
    ckpt.close()

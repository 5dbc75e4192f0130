"""config.evals_per_epoch: validation (a row of metrics, a best checkpoint, an early-stopping
check) N times an epoch, as the E10 report did twice per epoch; 1 is the per-epoch loop."""

import json

import pytest

from cnn_jax import experiment
from cnn_jax.errors import ConfigError, Interrupted
from cnn_jax.training_loop import eval_points, train_and_evaluate
from tests.conftest import tiny_config
from tests.test_experiment import _strip, launch


def rows(workdir):
    return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def test_eval_points_are_evenly_spaced_and_end_the_epoch():
    assert eval_points(702, 2) == [351, 702]  # E10's report: 45k examples, batch 64.
    assert eval_points(10, 3) == [3, 7, 10]
    assert eval_points(4, 1) == [4]
    assert eval_points(4, 4) == [1, 2, 3, 4]


def test_two_evaluations_per_epoch_from_the_command_line(tmp_path):
    """Rows at half epochs, each with the train metrics of its own half and a validation."""
    result = launch(
        '--config=configs/quickstart.py',
        f'--workdir={tmp_path}',
        '--config.num_epochs=2',
        '--config.steps_per_epoch=6',
        '--config.evals_per_epoch=2',
        cwd='.',
    )
    assert result.returncode == 0, result.stderr[-2000:]
    got = rows(tmp_path)
    assert [(r['epoch'], r['step']) for r in got] == [(0.5, 3), (1.0, 6), (1.5, 9), (2.0, 12)]
    assert all({'train_loss', 'val_loss', 'val_accuracy'} <= set(r) for r in got)
    assert len({r['train_loss'] for r in got}) == 4  # Each half's own running loss.
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['epochs_run'] == 2 and summary['status'] == 'completed'
    assert (tmp_path / 'curves.png').stat().st_size > 0


def test_early_stopping_counts_evaluations_and_can_stop_mid_epoch(tmp_path, capsys):
    config = tiny_config(num_epochs=8, learning_rate=0.3, optimizer='sgd', evals_per_epoch=2)
    config.early_stopping.patience = 1
    out = experiment.run(config, tmp_path)
    got = rows(tmp_path)
    best = min(range(len(got)), key=lambda i: got[i]['val_loss'])
    assert out['best_epoch'] == got[best]['epoch']
    assert out['val_loss'] == pytest.approx(got[best]['val_loss'], rel=1e-5)
    assert out['stopped_early']  # lr 0.3 on 8x8 digits: the loss turns within 8 epochs.
    assert len(got) == best + 2  # One evaluation without improvement, then the stop.
    assert [(r['epoch'], r['step']) for r in got][-3:] == [(0.5, 2), (1.0, 5), (1.5, 7)]
    line = f'Early stopping after epoch {got[-1]["epoch"]}: val_loss has not improved for 1 '
    assert line + 'evaluations' in capsys.readouterr().out


def test_resume_between_two_evaluations_equals_an_uninterrupted_run(tmp_path):
    """Interrupted right after the mid-epoch evaluation of epoch 2 (step 6 of 4-step epochs):
    the resumed run keeps that row, its reset running sums, and ends where the other ends."""
    config = tiny_config(num_epochs=3, steps_per_epoch=4, evals_per_epoch=2)
    ds = experiment.load_dataset(config, allow_streams=True)
    model = experiment.build_model(config, ds.num_classes)
    straight = train_and_evaluate(config, tmp_path / 'a', ds, model)
    with pytest.raises(Interrupted, match='interrupted at step 6'):
        train_and_evaluate(config, tmp_path / 'b', ds, model, hooks=[lambda step: step == 6])
    assert [r['epoch'] for r in rows(tmp_path / 'b')] == [0.5, 1.0, 1.5]
    resumed = train_and_evaluate(config, tmp_path / 'b', ds, model)
    assert resumed.resumed_from_step == 6
    assert [r['epoch'] for r in straight.history] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    assert _strip(resumed.history) == _strip(straight.history)


def test_more_evaluations_than_steps_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match='evals_per_epoch=5 is more than the 4 steps of an epoch'):
        experiment.run(tiny_config(steps_per_epoch=4, evals_per_epoch=5), tmp_path)

"""End to end: the quickstart writes every report; resume equals an uninterrupted run."""

import json
import math
import subprocess
import sys

import pytest

from cnn_jax import experiment
from cnn_jax.errors import Interrupted
from cnn_jax.training_loop import train_and_evaluate
from tests.conftest import tiny_config

REPORT_FILES = ('report.md', 'summary.json', 'curves.png', 'confusion_matrix.png', 'metrics.jsonl')
SUMMARY_KEYS = (
    'train_accuracy',
    'val_accuracy',
    'test_accuracy',
    'test_loss',
    'precision',
    'recall',
    'f1',
    'total_params',
    'epochs_run',
    'wall_time_s',
    'train_steps_per_s',
    'num_devices',
)


def tensorboard_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
    """(step, value) per tag, as TensorBoard reads workdir/tensorboard."""
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(workdir / 'tensorboard'))
    events.Reload()
    tags = events.Tags()['scalars']
    return {t: [(e.step, pytest.approx(e.value)) for e in events.Scalars(t)] for t in tags}


def test_quickstart_runs_end_to_end_and_writes_every_file(tmp_path):
    from configs import quickstart

    config = quickstart.get_config()
    config.num_epochs = 2
    config.steps_per_epoch = 6
    out = experiment.run(config, tmp_path)
    for name in REPORT_FILES:
        assert (tmp_path / name).stat().st_size > 0, name
    assert list((tmp_path / 'checkpoints' / 'latest').iterdir())
    summary = json.loads((tmp_path / 'summary.json').read_text())
    for key in SUMMARY_KEYS:
        assert summary[key] is not None, key
    assert summary == json.loads(json.dumps(out))
    assert summary['epochs_run'] == 2 and summary['status'] == 'completed'
    assert summary['test_accuracy'] > 0.3  # 12 steps already learn something.
    rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in rows] == [1, 2]
    assert {'train_loss', 'train_accuracy', 'val_loss', 'val_accuracy'} <= set(rows[0])
    assert tensorboard_scalars(tmp_path)['val_loss'] == [(r['step'], r['val_loss']) for r in rows]
    report = (tmp_path / 'report.md').read_text()
    assert 'Confusion matrix' in report and 'Total params:' in report


def test_the_train_step_compiles_once_per_run(tmp_path, caplog):
    """The initial state and running sums sit on the mesh as the step's outputs do: a
    second compile at step 2 would cost a large model a minute of every launch."""
    import jax

    config = tiny_config(num_epochs=2, steps_per_epoch=4)
    ds = experiment.load_dataset(config, allow_streams=True)
    model = experiment.build_model(config, ds.num_classes)
    with jax.log_compiles(), caplog.at_level('WARNING'):
        train_and_evaluate(config, tmp_path, ds, model)
    compiles = [r for r in caplog.records if 'Compiling jit(train)' in r.getMessage()]
    assert len(compiles) == 1, [r.getMessage()[:200] for r in compiles]


def _strip(rows):
    return [{k: v for k, v in r.items() if k != 'elapsed_s'} for r in rows]


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    config = tiny_config(num_epochs=3, steps_per_epoch=4)
    config.model_options.dropout_rate = 0.2
    config.augment.flip = True
    ds = experiment.load_dataset(config, allow_streams=True)
    model = experiment.build_model(config, ds.num_classes)
    straight = train_and_evaluate(config, tmp_path / 'a', ds, model)
    with pytest.raises(Interrupted, match='interrupted at step 6'):
        train_and_evaluate(config, tmp_path / 'b', ds, model, hooks=[lambda step: step == 6])
    resumed = train_and_evaluate(config, tmp_path / 'b', ds, model)
    assert resumed.resumed_from_step == 6
    assert _strip(resumed.history) == _strip(straight.history)
    import jax
    import numpy as np

    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(straight.state.params),
        jax.device_get(resumed.state.params),
    )


def test_divergence_is_a_status_not_a_crash(tmp_path):
    config = tiny_config(optimizer='sgd', learning_rate=1e6, num_epochs=2)
    out = experiment.run(config, tmp_path)
    assert out['status'] == 'diverged'
    assert out['diverged_at_step'] is not None and out['diverged_at_step'] <= 10
    assert 'Diverged at step' in (tmp_path / 'report.md').read_text()


def test_early_stopping_restores_best_weights(tmp_path):
    config = tiny_config(num_epochs=8, learning_rate=0.3, optimizer='sgd')
    config.early_stopping.patience = 1
    config.early_stopping.monitor = 'val_loss'
    out = experiment.run(config, tmp_path)
    rows = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    best = min(rows, key=lambda r: r['val_loss'])
    assert out['best_epoch'] == best['epoch']
    if out['stopped_early']:
        assert len(rows) == best['epoch'] + 1
    assert out['val_loss'] == pytest.approx(best['val_loss'], rel=1e-5)


def launch(*args, cwd):
    return subprocess.run(
        [sys.executable, 'launch.py', *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    'override, message',
    [
        ('--config.model=resnet9000', "unknown model 'resnet9000'; known models: "),
        ('--config.dataset=folder:/no/such/dir', 'image folder /no/such/dir does not exist'),
        ('--config.optimizer=lbfgs', "unknown optimizer 'lbfgs'"),
    ],
)
def test_launch_reports_bad_config_without_traceback(tmp_path, override, message):
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    r = launch('--config=configs/quickstart.py', override, f'--workdir={tmp_path}', cwd=root)
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr
    assert 'Traceback' not in r.stderr


def test_launch_summary_prints_totals(tmp_path):
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    r = launch('--config=configs/quickstart.py', '--summary', cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-3].startswith('Total params: ')
    assert lines[-2].startswith('Trainable params: ')
    assert lines[-1].startswith('Non-trainable params: ')


@pytest.mark.slow
def test_sanity_checks_report_shape_and_first_loss(capsys):
    """A deep BN net at initialisation: one example gives C logits, the first loss ~ ln(C)."""
    from cnn_jax.data import load_dataset

    config = tiny_config(model='resnet20', batch_size=64)
    del config.model_options['features'], config.model_options['dense']
    dataset = load_dataset(config)
    checks = experiment.sanity_checks(config, experiment.build_model(config, 10), dataset)
    assert checks['output_shape_one_example'] == [10]
    assert checks['expected_first_loss_ln_classes'] == pytest.approx(math.log(10), abs=1e-4)
    assert checks['first_loss_ok'], checks['first_batch_loss']
    assert 'WARNING' not in capsys.readouterr().out


def test_reporter_writes_files_only_on_the_main_process(tmp_path, monkeypatch, capsys):
    """Console lines, metrics.jsonl and TensorBoard all go through records.Reporter: only
    the main process writes files (every process prints to its own log), and a resume
    reads the main one's rows."""
    from cnn_jax import parallel, records

    row = {'epoch': 1, 'step': 4, 'train_loss': 0.5, 'train_accuracy': 0.75}
    line = 'epoch 1 [a]: train_loss 0.5000  train_accuracy 0.7500\n'
    (tmp_path / 'main').mkdir()
    main = records.Reporter(tmp_path / 'main', tag=' [a]')
    main.epoch(row)
    main.close()
    assert capsys.readouterr().out == line
    assert records.read_metrics(tmp_path / 'main') == [row]
    assert main.resume(0) == [] and records.read_metrics(tmp_path / 'main') == []
    monkeypatch.setattr(parallel, 'is_main_process', lambda: False)
    (tmp_path / 'other').mkdir()
    other = records.Reporter(tmp_path / 'other', tag=' [a]')
    other.epoch(row)
    other.close()
    assert capsys.readouterr().out == line
    assert list((tmp_path / 'other').iterdir()) == []


def test_train_result_holds_the_final_evaluation_the_summary_reports(tmp_path):
    """The final evaluation is the loop's last phase: TrainResult carries its numbers and
    the test predictions, and the summary reports exactly those."""
    from cnn_jax.data import load_dataset
    from cnn_jax.models import build_model

    config = tiny_config(num_epochs=1)
    dataset = load_dataset(config)
    result = train_and_evaluate(config, tmp_path, dataset, build_model(config, 10))
    assert set(result.evals) == {'train', 'val', 'test'}
    assert result.test_predictions.shape == dataset.test.labels.shape
    accuracy = float((result.test_predictions == dataset.test.labels).mean())
    assert math.isclose(result.evals['test']['accuracy'], accuracy, rel_tol=1e-6)
    out = experiment.finish(config, tmp_path, result, dataset, {}, '', 0.0)
    assert out['test_accuracy'] == result.evals['test']['accuracy']
    assert out['accuracy'] == accuracy  # report.classification_metrics of the predictions.

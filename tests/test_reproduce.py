"""The reproduction runner: one workdir per config, reuse, the table, shared baseline runs."""

import json

import numpy as np
import pytest

from cnn_jax import run_record, study
from cnn_jax.data.sources import IDX_FILES, idx_file, read_idx_file
from reproduce import jpeg_cost, table, torch_recipe
from reproduce import runner as reproduce
from reproduce.reported import EXPERIMENTS, load_config

QUICK = [
    '--data',
    'cifar10=digits',
    '--override',
    'num_epochs=1',
    '--override',
    'steps_per_epoch=2',
]


@pytest.mark.slow
def test_runs_an_experiment_then_reuses_it_and_tables_every_experiment(tmp_path, capsys):
    args = ['--only', 'E10', '--root', str(tmp_path), *QUICK]
    assert reproduce.main(args) == 0
    workdir = tmp_path / 'E10' / 'cifar_cnn3'
    summary = json.loads((workdir / 'summary.json').read_text())
    assert summary['status'] == 'completed' and summary['epochs_run'] == 1
    record = run_record.read_record(workdir)
    assert record['config']['dataset'] == 'digits' and record['config']['num_epochs'] == 1

    assert reproduce.main(args) == 0  # Finished: reused, not trained again.
    assert 'already holds this run' in capsys.readouterr().out
    assert len(json.loads((workdir / reproduce.TIME_FILE).read_text())) == 2

    rows = json.loads((tmp_path / 'REPRODUCTION.json').read_text())
    assert {r['experiment'] for r in rows} == {e.id for e in EXPERIMENTS}
    (e10,) = [r for r in rows if r['experiment'] == 'E10']
    assert e10['ours']['mean'] == summary['test_accuracy'] and e10['reported'] == 0.756
    assert e10['data'] == 'digits standing in for cifar10' and e10['epochs'] == 1
    assert e10['command'].startswith('python launch.py --config=configs/cifar_cnn3.py')
    assert '--config.dataset=digits --config.num_epochs=1' in e10['command']
    e8 = [r for r in rows if r['experiment'] == 'E8']
    assert e8[0]['ours']['mean'] is None and 'accelerator' in e8[0]['status']
    text = (tmp_path / 'REPRODUCTION.md').read_text()
    assert '| E10 | cifar_cnn3.py |' in text
    # No row says it trained on Fashion-MNIST: no --data gave it (findings may name it).
    assert not any('Fashion' in r['data'] for r in rows)

    # Re-tabled without --data, a row still says what its run was launched with.
    assert reproduce.main(['--table', '--root', str(tmp_path)]) == 0
    rows = json.loads((tmp_path / 'REPRODUCTION.json').read_text())
    (again,) = [r for r in rows if r['experiment'] == 'E10']
    assert again['data'] == e10['data'] and again['command'] == e10['command']


def test_a_study_run_identical_to_a_finished_one_is_copied_not_retrained(tmp_path):
    exp = next(e for e in EXPERIMENTS if e.id == 'E4')
    data = {'cifar10': 'digits'}
    optimizers = load_config('ablations/cifar_cnn6_optimizers.py')
    optimizers.dataset = 'digits'
    done = tmp_path / 'E4' / 'cifar_cnn6_optimizers' / 'adam'
    # The optimiser study's Adam run is the best combination at seed 0.
    run_record.record_config(study.variant_config(optimizers, 'adam'), done)
    (done / 'summary.json').write_text('{"status": "completed"}')
    target = tmp_path / 'E4' / 'cifar_cnn6_best'
    reproduce.reuse_identical_runs(exp, 'ablations/cifar_cnn6_best.py', target, tmp_path, data)
    assert (target / 'adam_bn_relu_ce' / 'seed_0' / 'summary.json').exists()
    assert (target / 'adam_bn_relu_ce' / 'seed_0' / 'copied_from.txt').read_text().strip() == str(
        done
    )
    assert not (target / 'adam_bn_relu_ce' / 'seed_1').exists()  # Another seed: no match.


def test_a_study_stopped_part_way_shows_the_variants_it_finished(tmp_path):
    exp = next(e for e in EXPERIMENTS if e.id == 'E4')
    done = tmp_path / 'E4' / 'cifar_cnn6_optimizers' / 'sgd'
    done.mkdir(parents=True)
    run = {'status': 'completed', 'test_accuracy': 0.634, 'epochs_run': 20}
    (done / 'summary.json').write_text(json.dumps(run))
    rows = table.collect_rows(exp, tmp_path, {})
    config = 'ablations/cifar_cnn6_optimizers.py'
    by_variant = {r['variant']: r for r in rows if r['config'] == config}
    assert by_variant['sgd']['ours']['mean'] == 0.634 and by_variant['sgd']['epochs'] == 20
    assert 'study is not finished' in by_variant['sgd']['status']
    assert by_variant['adam']['ours']['mean'] is None
    assert by_variant['adam']['status'].startswith('not run yet')


def test_table_commands_name_dir_not_the_data_path_of_the_machine_that_ran_them():
    command = 'python launch.py --config=configs/x.py --config.dataset=folder:/srv/c10.tar.gz'
    assert table.portable_command(command).endswith('--config.dataset=folder:DIR')
    idx = table.portable_command('--config.dataset=idx:../data/fmnist --config.seed=1')
    assert idx == '--config.dataset=idx:DIR --config.seed=1'
    assert table.portable_command('--config.dataset=digits') == '--config.dataset=digits'
    assert 'DIR: where the data lie' in table.render_markdown([])


def test_a_row_trained_outside_the_repository_shows_its_rows_workdir(tmp_path):
    """E8 ran from a clone under /root; its files were copied to the row's workdir."""
    exp = next(e for e in EXPERIMENTS if e.id == 'E8')
    workdir = tmp_path / 'E8' / 'resnet20'
    config = load_config('resnet20.py')
    config.dataset = 'folder:/srv/data/cifar10-jpeg.tar.gz'
    run_record.record_config(config, workdir)
    record = run_record.read_record(workdir)
    record['command'] = [
        'python',
        'launch.py',
        '--config=configs/resnet20.py',
        '--workdir=/root/e8/runs/E8/resnet20',
        f'--config.dataset={config.dataset}',
    ]
    (workdir / run_record.CONFIG_FILE).write_text(json.dumps(record))
    (workdir / 'summary.json').write_text('{"status": "completed", "test_accuracy": 0.9}')
    (row,) = table.collect_rows(exp, tmp_path, {})
    assert row['command'] == (
        f'python launch.py --config=configs/resnet20.py --workdir={workdir} '
        '--config.dataset=folder:DIR'
    )
    inside = reproduce.ROOT / 'results' / 'reproduction' / 'E8' / 'resnet20'
    assert table.recorded_command(record['command'], inside)[3] == (
        '--workdir=results/reproduction/E8/resnet20'
    )


def test_a_test_accuracy_row_shows_its_best_validation_epoch(tmp_path):
    exp = next(e for e in EXPERIMENTS if e.id == 'E8')
    workdir = tmp_path / 'E8' / 'resnet20'
    workdir.mkdir(parents=True)
    curve = [0.5, 0.8, 0.85, 0.8]  # Epoch 3 is the best; the last epoch's test is shown.
    rows = [{'epoch': i, 'val_accuracy': a} for i, a in enumerate(curve, 1)]
    (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    summary = {'status': 'completed', 'test_accuracy': 0.79, 'epochs_run': 4}
    (workdir / 'summary.json').write_text(json.dumps(summary))
    (row,) = table.collect_rows(exp, tmp_path, {})
    assert row['best_val'] == {'accuracy': 0.85, 'epoch': 3}
    assert '| 0.790 (best val 0.850, epoch 3) |' in table.render_markdown([row])


def test_jpeg_copy_keeps_labels_and_shape_and_moves_pixels_as_jpeg_does(tmp_path):
    rng = np.random.default_rng(0)
    lossless = tmp_path / 'lossless'
    lossless.mkdir()
    arrays = {
        'train_images': rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        'train_labels': np.arange(12, dtype=np.uint8) % 10,
        'test_images': np.zeros((4, 28, 28), np.uint8),
        'test_labels': np.arange(4, dtype=np.uint8),
    }
    for key, stem in IDX_FILES.items():
        jpeg_cost.write_idx(lossless / f'{stem}.gz', arrays[key])
    for key in IDX_FILES:  # The writer is the reader's inverse.
        np.testing.assert_array_equal(read_idx_file(idx_file(lossless, key)), arrays[key])
    error = jpeg_cost.make_jpeg_copy(lossless, tmp_path / 'jpeg', quality=75)
    copy = {key: read_idx_file(idx_file(tmp_path / 'jpeg', key)) for key in IDX_FILES}
    np.testing.assert_array_equal(copy['train_labels'], arrays['train_labels'])
    np.testing.assert_array_equal(copy['test_images'], arrays['test_images'])  # Flat: exact.
    assert copy['train_images'].shape == (12, 28, 28)
    moved = np.abs(copy['train_images'].astype(int) - arrays['train_images']).sum()
    assert moved > 0 and error == moved / (16 * 28 * 28)  # Mean |error| over all 16 images.


@pytest.mark.slow
def test_torch_recipe_trains_a_study_variant_and_tests_each_epoch(tmp_path):
    pytest.importorskip('torch')
    out = tmp_path / 'sgd.json'
    args = ['--config=ablations/cifar_cnn6_optimizers.py', '--variant=momentum']
    assert torch_recipe.main([*args, '--data', 'cifar10=digits', '--out', str(out)]) == 0
    result = json.loads(out.read_text())
    assert result['variant'] == 'momentum' and result['epochs_run'] == 20
    assert all({'test_loss', 'test_accuracy'} <= row.keys() for row in result['history'])
    assert result['history'][-1]['test_accuracy'] == result['test_accuracy']  # No early stop.
    assert result['test_accuracy'] > 0.8  # Digits learnt by the E4 CNN's torch twin.
    with pytest.raises(SystemExit, match='is a study'):
        torch_recipe.main(['--config=ablations/cifar_cnn6_optimizers.py', '--out', str(out)])


@pytest.mark.slow
def test_torch_recipe_steps_its_learning_rate_and_resumes_as_if_never_stopped(tmp_path):
    """E8's twin: a step schedule, and a run stopped after epoch 2 that resumes from its
    checkpoint to epoch 4 matches one run of 4 epochs exactly."""
    pytest.importorskip('torch')
    config = load_config('resnet20.py')
    config.dataset, config.num_epochs, config.step_epochs = 'digits', 4, (2, 3)
    whole = torch_recipe.train_recipe(config, log=lambda _: None)
    lrs = [row['learning_rate'] for row in whole['history']]
    np.testing.assert_allclose(lrs, [0.1, 0.1, 0.01, 0.001], rtol=1e-6)
    checkpoint, seen = tmp_path / 'twin.pt', []
    config.num_epochs = 2
    torch_recipe.train_recipe(config, log=lambda _: None, checkpoint=checkpoint)
    config.num_epochs = 4
    resumed = torch_recipe.train_recipe(
        config,
        log=lambda _: None,
        checkpoint=checkpoint,
        on_epoch=lambda rows: seen.append(len(rows)),
    )
    assert seen == [3, 4]  # Epochs 3 and 4 only, after the two.
    drop = ('seconds',)
    strip = [{k: v for k, v in row.items() if k not in drop} for row in resumed['history']]
    assert strip == [{k: v for k, v in row.items() if k not in drop} for row in whole['history']]
    assert resumed['test_accuracy'] == whole['test_accuracy']


def test_twin_curves_plots_both_runs_epoch_by_epoch(tmp_path, capsys):
    from matplotlib import image

    from reproduce import twin_curves

    workdir, twin, out = tmp_path / 'run', tmp_path / 'twin.json', tmp_path / 'curves.png'
    workdir.mkdir()
    rows = [{'epoch': e, 'val_accuracy': 0.5 + e / 10, 'learning_rate': 0.1} for e in (1, 2, 3)]
    (workdir / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
    history = [{'epoch': 1, 'val_accuracy': 0.4, 'learning_rate': 0.1}, {'epoch': 2}]
    twin.write_text(json.dumps({'status': 'running', 'history': history}))
    assert twin_curves.read_curves(rows)['val_accuracy'] == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert twin_curves.read_curves(history) == {
        'val_accuracy': [(1, 0.4)],
        'learning_rate': [(1, 0.1)],
    }
    args = ['--workdir', str(workdir), '--torch', str(twin), '--out', str(out)]
    assert twin_curves.main(args) == 0
    assert image.imread(out).shape[:2] == (400, 1100)  # Two panels, 11 x 4 in at 100 dpi.
    args[3] = str(tmp_path / 'missing.json')
    assert twin_curves.main(args) == 2
    assert 'missing.json: no such file' in capsys.readouterr().err

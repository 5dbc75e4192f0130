"""The reproduction runner: one workdir per config, reuse, the table, shared baseline runs."""

import json

import pytest

from cnn_jax import run_record, study
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
    assert '| E10 | cifar_cnn3.py |' in text and 'Fashion' not in text

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
    rows = reproduce.collect_rows(exp, tmp_path, {})
    config = 'ablations/cifar_cnn6_optimizers.py'
    by_variant = {r['variant']: r for r in rows if r['config'] == config}
    assert by_variant['sgd']['ours']['mean'] == 0.634 and by_variant['sgd']['epochs'] == 20
    assert 'study is not finished' in by_variant['sgd']['status']
    assert by_variant['adam']['ours']['mean'] is None
    assert by_variant['adam']['status'].startswith('not run yet')

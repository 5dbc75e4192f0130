"""Studies: variants x seeds in sub-workdirs, skip and resume, outputs, divergence, configs."""

import importlib
import json
import math
from pathlib import Path

import pytest

from cnn_jax import records, study
from cnn_jax.errors import ConfigError, Interrupted
from configs.ablations import make_study, sweep
from tests import conftest

ABLATIONS = sorted(
    p.stem
    for p in (Path(__file__).parent.parent / 'configs' / 'ablations').glob('*.py')
    if p.stem != '__init__'
)


def tiny_config():
    """digits + a tiny small_cnn (the suite's shared one): each real run takes seconds."""
    return conftest.tiny_config(optimizer='sgd', learning_rate=0.05, steps_per_epoch=4)


def fake_run(calls=None, fail=(), diverge=()):
    """A stand-in for experiment.run that writes metrics.jsonl and summary.json."""

    def run(config, workdir):
        name = Path(workdir).name
        if calls is not None:
            calls.append((str(workdir), config))
        lr, seed = config.learning_rate, config.seed
        if any(f in str(workdir) for f in fail):
            raise RuntimeError(f'boom in {name}')
        with open(Path(workdir) / 'metrics.jsonl', 'a') as f:
            for e in range(1, config.num_epochs + 1):
                acc = 0.5 + 0.1 * e + 0.01 * seed - 0.01 * abs(math.log10(lr + 1e-9))
                record = {
                    'epoch': e,
                    'step': 10 * e,
                    'val_accuracy': acc,
                    'val_loss': 1 / e,
                    'test_accuracy': acc - 0.05,
                    'test_loss': 1.1 / e,
                    'elapsed_s': e,
                }
                f.write(json.dumps(record) + '\n')
        if any(f in str(workdir) for f in diverge):
            summary = {'status': 'diverged', 'diverged_at_step': 13}
        else:
            summary = {
                'status': 'completed',
                'test_accuracy': 0.6 + 0.01 * seed,
                'test_loss': 0.9,
                'precision': 0.6,
                'recall': 0.6,
                'f1': 0.6,
                'wall_time_s': 2.0,
                'best_epoch': config.num_epochs,
            }
        (Path(workdir) / 'summary.json').write_text(json.dumps(summary))
        return summary

    return run


def two_variants(**kwargs):
    return make_study(
        tiny_config(),
        'two',
        [('sgd', {'optimizer': 'sgd'}), ('adam', {'optimizer': 'adam', 'learning_rate': 0.01})],
        **kwargs,
    )


OUTPUTS = ('summary.json', 'summary.md', 'comparison.png')


# --- Config handling (fake runs) -----------------------------------------------------


def test_unknown_override_key_names_key_and_variant():
    c = make_study(tiny_config(), 's', [('ok', {}), ('bad', {'augment.flipp': True})])
    with pytest.raises(ConfigError, match=r"'augment\.flipp'.*'bad'"):
        study.validate_study(c)
    c = make_study(tiny_config(), 's', [('bad', {'nosuch.key': 1})])
    with pytest.raises(ConfigError, match=r"'nosuch\.key'.*'bad'"):
        study.validate_study(c)


def test_bad_override_type_is_config_error():
    c = make_study(tiny_config(), 's', [('bad', {'num_epochs': 'many'})])
    with pytest.raises(ConfigError, match='num_epochs'):
        study.validate_study(c)


def test_model_options_accepts_model_fields_only():
    c = make_study(tiny_config(), 's', [('drop', {'model_options.dropout_rate': 0.3})])
    assert study.variant_config(c, 'drop').model_options.dropout_rate == 0.3
    c = make_study(tiny_config(), 's', [('bad', {'model_options.dropout': 0.3})])
    with pytest.raises(ConfigError, match=r"'model_options\.dropout'.*'bad'.*dropout_rate"):
        study.validate_study(c)


def test_only_unknown_variant_lists_variants(tmp_path):
    c = two_variants()
    c.only = 'rmsprop'
    with pytest.raises(ConfigError, match="'rmsprop'.*sgd, adam"):
        study.run_study(c, tmp_path, fake_run())


def test_only_runs_one_variant_and_table_shows_the_rest(tmp_path):
    calls = []
    c = two_variants()
    c.only = 'adam'
    result = study.run_study(c, tmp_path, fake_run(calls))
    assert [Path(w).name for w, _ in calls] == ['adam']
    assert [r['status'] for r in result['variants']] == ['not run', 'completed']


def test_command_line_overrides_reach_every_variant_and_variant_wins(tmp_path):
    calls = []
    c = two_variants()
    c.num_epochs = 1  # as --config.num_epochs=1 would
    c.learning_rate = 0.3  # adam sets its own
    study.run_study(c, tmp_path, fake_run(calls))
    configs = {Path(w).name: cfg for w, cfg in calls}
    assert configs['sgd'].num_epochs == configs['adam'].num_epochs == 1
    assert (configs['sgd'].learning_rate, configs['adam'].learning_rate) == (0.3, 0.01)
    assert configs['adam'].optimizer == 'adam'
    assert 'study' not in configs['sgd'] and 'only' not in configs['sgd']


def test_failure_is_recorded_and_study_continues(tmp_path):
    c = two_variants()
    result = study.run_study(c, tmp_path, fake_run(fail=('sgd',)))
    error = 'RuntimeError: boom in sgd'
    assert result['failures'] == [{'variant': 'sgd', 'seed': 0, 'error': error, 'bad_input': False}]
    assert (result['failed'], result['config_errors']) == (1, 0)
    # The traceback is in the run's own log, not the study's output.
    assert 'Traceback' in (tmp_path / 'sgd' / 'error.log').read_text()
    rows = {r['variant']: r for r in result['variants']}
    assert rows['sgd']['status'].startswith('failed: RuntimeError')
    assert rows['adam']['status'] == 'completed'
    assert 'boom in sgd' in (tmp_path / 'summary.md').read_text()
    # A failed run is tried again next time; the finished one is skipped.
    calls = []
    result = study.run_study(c, tmp_path, fake_run(calls))
    assert [Path(w).name for w, _ in calls] == ['sgd'] and not result['failures']


def test_interrupt_stops_the_study_without_outputs(tmp_path):
    def interrupted(config, workdir):
        raise Interrupted(3, workdir)

    with pytest.raises(Interrupted):
        study.run_study(two_variants(), tmp_path, interrupted)
    assert not (tmp_path / 'summary.json').exists()


def test_seeds_sub_workdirs_and_mean_std(tmp_path):
    c = two_variants(seeds=(0, 1, 2))
    result = study.run_study(c, tmp_path, fake_run(diverge=('adam/seed_2',)))
    for v in ('sgd', 'adam'):
        for s in (0, 1, 2):
            assert (tmp_path / v / f'seed_{s}' / 'summary.json').exists()
    sgd, adam = result['variants']
    agg = sgd['metrics']['test_accuracy']
    assert agg['n'] == 3 and agg['mean'] == pytest.approx(0.61)
    assert agg['std'] == pytest.approx(0.01)
    assert adam['status'] == '2x completed, 1x diverged at step 13'
    assert adam['metrics']['test_accuracy']['n'] == 2
    assert '0.610 ± 0.010' in (tmp_path / 'summary.md').read_text()


def test_sweep_writes_log_axis_plot_with_zero(tmp_path):
    c = make_study(
        tiny_config(),
        'l2',
        sweep('weight_decay', [1e-2, 1e-4, 0.0]),
        sweep_key='weight_decay',
        plot_metric='test_accuracy',
    )
    assert c.eval_test_each_epoch
    result = study.run_study(c, tmp_path, fake_run())
    assert [r['sweep_value'] for r in result['variants']] == [1e-2, 1e-4, 0.0]
    assert [r['variant'] for r in result['variants']] == [
        'weight_decay_0.01',
        'weight_decay_0.0001',
        'weight_decay_0',
    ]
    for name in (*OUTPUTS, 'sweep.png'):
        assert (tmp_path / name).stat().st_size > 0
    on_disk = json.loads((tmp_path / 'summary.json').read_text())
    assert on_disk['variants'][2]['metrics']['best_val_accuracy']['n'] == 1


@pytest.mark.parametrize('name', ABLATIONS)
def test_study_config_is_valid(name):
    module = importlib.import_module(f'configs.ablations.{name}')
    doc = module.__doc__ or ''
    assert f'launch.py --config=configs/ablations/{name}.py' in doc
    assert '--config.dataset=' in doc  # the offline command
    config = module.get_config()
    study.validate_study(config)
    assert config.study.name == name and config.study.variants


# --- Real runs (cnn_jax.experiment.run on digits) -----------------------------------


def _metrics(path):
    return [{k: v for k, v in r.items() if k != 'elapsed_s'} for r in records.read_metrics(path)]


@pytest.mark.slow
def test_two_variant_study_end_to_end_and_resume(tmp_path):
    from cnn_jax import experiment

    # Two learning rates: one compiled program serves both runs.
    c = make_study(tiny_config(), 'two', [('lr_0.05', {}), ('lr_0.2', {'learning_rate': 0.2})])
    calls = []

    def interrupted(config, workdir):
        calls.append(Path(workdir).name)
        if Path(workdir).name == 'lr_0.2':
            raise KeyboardInterrupt
        return experiment.run(config, workdir)

    with pytest.raises(KeyboardInterrupt):
        study.run_study(c, tmp_path, interrupted)
    assert calls == ['lr_0.05', 'lr_0.2']
    assert records.read_summary(tmp_path / 'lr_0.05')['status'] == 'completed'
    assert records.read_summary(tmp_path / 'lr_0.2') is None

    calls.clear()

    def counted(config, workdir):
        calls.append(Path(workdir).name)
        return experiment.run(config, workdir)

    result = study.run_study(c, tmp_path, counted)
    assert calls == ['lr_0.2']
    assert not result['failures']
    for name in OUTPUTS:
        assert (tmp_path / name).stat().st_size > 0
    assert not (tmp_path / 'sweep.png').exists()
    rows = {r['variant']: r for r in result['variants']}
    for v in ('lr_0.05', 'lr_0.2'):
        assert rows[v]['status'].startswith('completed')
        m = rows[v]['metrics']
        assert 0 <= m['best_val_accuracy']['mean'] <= 1
        assert 1 <= m['best_epoch']['mean'] <= c.num_epochs
        for key in ('test_accuracy', 'test_loss', 'precision', 'recall', 'f1', 'wall_time_s'):
            assert m[key]['n'] == 1, key
        assert len(records.read_metrics(tmp_path / v)) == c.num_epochs
    table = (tmp_path / 'summary.md').read_text()
    assert '| lr_0.05 | completed' in table and '| lr_0.2 | completed' in table
    assert json.loads((tmp_path / 'summary.json').read_text())['study'] == 'two'


@pytest.mark.slow
def test_seeds_differ_and_same_seed_repeats(tmp_path):
    c = make_study(tiny_config(), 'seeds', [('v', {})], seeds=(0, 1))
    study.run_study(c, tmp_path / 'a')
    c = make_study(tiny_config(), 'seeds', [('v', {})], seeds=(0,))
    study.run_study(c, tmp_path / 'b')
    seed0, seed1 = _metrics(tmp_path / 'a/v/seed_0'), _metrics(tmp_path / 'a/v/seed_1')
    again = _metrics(tmp_path / 'b/v')
    assert len(seed0) == len(seed1) == len(again) == 2
    assert seed0 == again
    assert seed0 != seed1


@pytest.mark.slow
def test_absurd_learning_rate_is_diverged_and_study_finishes(tmp_path):
    c = make_study(
        tiny_config(),
        'diverge',
        [('absurd', {'optimizer': 'sgd', 'learning_rate': 1e12}), ('ok', {})],
    )
    result = study.run_study(c, tmp_path)
    absurd, ok = result['variants']
    assert absurd['status'].startswith('diverged at step ')
    assert absurd['runs'][0]['diverged_at_step'] is not None
    assert ok['status'].startswith('completed')
    assert not result['failures']
    assert '| absurd | diverged at step' in (tmp_path / 'summary.md').read_text()
    assert (tmp_path / 'comparison.png').exists()


# --- Vectorised groups ---------------------------------------------------------------


def test_vectorized_groups_join_only_sweepable_differences():
    c = make_study(
        tiny_config(),
        'groups',
        [
            ('a', {}),
            ('b', {'learning_rate': 0.2}),
            ('drop', {'model_options.dropout_rate': 0.3}),
            ('c', {'weight_decay': 1e-3, 'learning_rate': 0.1}),
        ],
        seeds=(0, 1),
    )
    jobs = [(v, s) for v in study.variant_names(c) for s in (0, 1)]
    with c.unlocked():
        c.vectorize = 'true'
    groups = study.vectorized_groups(c, jobs)
    same = [job for job in jobs if job[0] != 'drop']
    assert set(groups) == set(same) | {('drop', 0), ('drop', 1)}
    assert groups[('a', 0)] == same
    assert groups[('drop', 0)] == [('drop', 0), ('drop', 1)]  # Seeds differ: one group.
    assert study.vectorized_groups(c, [('a', 0)]) == {}  # A group of one runs plainly.
    c.vectorize = 'false'
    assert study.vectorized_groups(c, jobs) == {}
    c.vectorize = 'auto'  # Accelerators only: never on CPU.
    assert study.vectorized_groups(c, jobs) == {}
    c.vectorize = 'sometimes'
    with pytest.raises(ConfigError, match='vectorize must be auto, true or false'):
        study.validate_study(c)


@pytest.mark.slow
def test_vectorized_study_gives_the_sequential_study(tmp_path):
    variants = [
        ('lr_0.05', {}),
        ('lr_0.2', {'learning_rate': 0.2}),
        ('adam', {'optimizer': 'adam'}),
    ]
    results = {}
    for mode in ('true', 'false'):
        c = make_study(tiny_config(), 'vec', variants)
        c.vectorize = mode
        results[mode] = study.run_study(c, tmp_path / mode)
        for name in OUTPUTS:
            assert (tmp_path / mode / name).stat().st_size > 0
    summaries = {
        mode: {v: records.read_summary(tmp_path / mode / v) for v, _ in variants}
        for mode in results
    }
    assert summaries['true']['lr_0.05']['vectorized'] == {'k': 2, 'index': 0}
    assert summaries['true']['lr_0.2']['vectorized'] == {'k': 2, 'index': 1}
    assert 'vectorized' not in summaries['true']['adam']  # Another optimiser: its own run.
    assert (tmp_path / 'true/lr_0.2/checkpoints/latest/8').is_dir()  # Its own, as a run's.
    for v, _ in variants:
        vec, seq = summaries['true'][v], summaries['false'][v]
        assert vec['name'] == seq['name'] == f'vec:{v}'
        assert vec['confusion_matrix'] == seq['confusion_matrix']
        for key in ('test_accuracy', 'test_loss', 'val_loss', 'f1'):
            assert vec[key] == pytest.approx(seq[key], rel=1e-4), (v, key)
        vec_rows, seq_rows = _metrics(tmp_path / 'true' / v), _metrics(tmp_path / 'false' / v)
        assert [r['epoch'] for r in vec_rows] == [r['epoch'] for r in seq_rows] == [1, 2]
        for got, want in zip(vec_rows, seq_rows, strict=True):
            assert got == pytest.approx(want, rel=1e-4), v


def test_a_failed_vectorised_group_runs_separately(tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError('vmap broke')

    calls = []
    monkeypatch.setattr(study.sweep, 'run_vectorized', broken)
    monkeypatch.setattr(study.tasks, 'run', fake_run(calls))
    c = make_study(tiny_config(), 'vec', [('lr_0.05', {}), ('lr_0.2', {'learning_rate': 0.2})])
    c.vectorize = 'true'
    result = study.run_study(c, tmp_path)
    out = capsys.readouterr().out
    assert 'vectorised group failed (RuntimeError: vmap broke); running it separately' in out
    assert 'Traceback' not in out
    assert [Path(w).name for w, _ in calls] == ['lr_0.05', 'lr_0.2']
    assert not result['failures']
    assert [r['status'] for r in result['variants']] == ['completed', 'completed']
    assert 'RuntimeError: vmap broke' in (tmp_path / 'lr_0.2' / 'error.log').read_text()

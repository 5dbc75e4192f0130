"""Vectorised sweeps: each variant of one vmapped program equals its sequential run."""

import json

import jax
import numpy as np
import pytest

from cnn_jax import experiment, parallel, steps, sweep
from cnn_jax.data import load_dataset
from cnn_jax.data.metadata import model_input_shape
from cnn_jax.errors import ConfigError
from cnn_jax.training_loop import input_spec
from tests.conftest import tiny_config

STEPS = 5


def _sgd_config(**overrides):
    """Momentum SGD with L2, dropout and augmentation: every per-variant number is used."""
    config = tiny_config(
        optimizer='momentum',
        learning_rate=0.05,
        weight_decay=1e-3,
        **{'model_options.dropout_rate': 0.2, 'augment.flip': True, 'augment.crop_padding': 1},
    )
    for key, value in overrides.items():
        config[key] = value
    return config


def _sequential_params(config, dataset, num_steps):
    """Parameters after `num_steps` steps of the training loop's own compiled step."""
    mesh = parallel.make_mesh()
    model = experiment.build_model(config, dataset.num_classes)
    init_rng, train_rng, data_rng = jax.random.split(jax.random.key(config.seed), 3)
    spe = len(dataset.train) // config.batch_size
    state = steps.create_train_state(
        config, model, model_input_shape(config, dataset), init_rng, spe
    )
    state = jax.device_put(state, parallel.replicated(mesh))
    compiled = steps.compile_steps(
        config, mesh, input_spec(config, dataset), len(dataset.train), spe
    )
    images = parallel.put_replicated(dataset.train.images, mesh)
    labels = parallel.put_replicated(dataset.train.labels, mesh)
    perm = compiled.permutation(data_rng, 0)
    acc = steps.zero_metrics()
    for s in range(num_steps):
        state, acc = compiled.train(state, acc, images, labels, perm, np.int32(s), train_rng)
    return jax.device_get(state.params), jax.device_get(acc)


def _vectorized_params(config, variants, dataset, num_steps, group_size=None):
    mesh = parallel.make_mesh()
    configs = sweep.variant_configs(config, variants)
    model = experiment.build_model(config, dataset.num_classes)
    spe = len(dataset.train) // config.batch_size
    rngs = sweep.VariantRngs.from_seeds([c.seed for c in configs])
    state = sweep.create_stacked_state(
        configs, model, model_input_shape(config, dataset), rngs, spe
    )
    state = jax.device_put(state, parallel.replicated(mesh))
    vtrain = sweep.make_vectorized_train(
        configs, mesh, input_spec(config, dataset), state, rngs, group_size=group_size
    )
    images = parallel.put_replicated(dataset.train.images, mesh)
    labels = parallel.put_replicated(dataset.train.labels, mesh)
    perm = sweep.permutations(rngs, 0, len(dataset.train), spe, config.batch_size, mesh)
    rng = rngs.train[0] if rngs.shared else rngs.train
    acc = steps.zero_metrics(len(configs))
    for s in range(num_steps):
        state, acc = vtrain(state, acc, images, labels, perm, np.int32(s), rng)
    return state, jax.device_get(acc)


def _assert_variants_match(config, variants, tol=1e-5, group_size=None):
    dataset = load_dataset(config)
    state, acc = _vectorized_params(config, variants, dataset, STEPS, group_size)
    assert int(state.step) == STEPS
    for k, vc in enumerate(sweep.variant_configs(config, variants)):
        expected, expected_acc = _sequential_params(vc, dataset, STEPS)
        got = jax.device_get(sweep.unstack_state(state, k).params)
        flat_e, flat_g = jax.tree.leaves(expected), jax.tree.leaves(got)
        assert jax.tree.structure(expected) == jax.tree.structure(got)
        for e, g in zip(flat_e, flat_g, strict=True):
            np.testing.assert_allclose(g, e, atol=tol, rtol=tol, err_msg=f'variant {k}')
        np.testing.assert_allclose(acc['loss'][k], expected_acc['loss'], rtol=1e-5)
        assert acc['count'][k] == expected_acc['count']
    return state


def test_three_learning_rates_equal_three_sequential_runs():
    variants = [{'learning_rate': lr} for lr in (0.1, 0.03, 0.01)]
    state = _assert_variants_match(_sgd_config(), variants)
    lrs = state.opt_state.hyperparams['learning_rate']  # One per variant.
    np.testing.assert_allclose(lrs, [0.1, 0.03, 0.01], rtol=1e-6)
    # The variants really differ (a shared learning rate would pass the check above).
    p0, p2 = (jax.tree.leaves(sweep.unstack_state(state, k).params)[0] for k in (0, 2))
    assert not np.allclose(p0, p2)


@pytest.mark.slow
def test_seeds_smoothing_decay_and_momentum_per_variant():
    variants = [
        {'seed': 1, 'label_smoothing': 0.0, 'momentum': 0.9},
        {'seed': 2, 'label_smoothing': 0.1, 'weight_decay': 0.0},
        {'seed': 1, 'label_smoothing': 0.2, 'momentum': 0.5, 'learning_rate': 0.02},
    ]
    _assert_variants_match(_sgd_config(), variants, group_size=2)  # Groups of 2, then 1.


def test_vectorizable_groups():
    variants = [
        {'learning_rate': 0.1},
        {'model_options.norm': 'batchnorm', 'learning_rate': 0.1},
        {'learning_rate': 0.01, 'seed': 3},
        {'seed': 2, 'model_options.norm': 'batchnorm'},
        {'optimizer': 'adam'},
    ]
    assert sweep.vectorizable_groups(variants) == [[0, 2], [1, 3], [4]]
    assert sweep.split_overrides(variants[1]) == (
        {'model_options.norm': 'batchnorm'},
        {'learning_rate': 0.1},
    )


@pytest.mark.parametrize(
    'overrides', [{'model_options.dropout_rate': 0.5}, {'batch_size': 64}, {'optimizer': 'adam'}]
)
def test_shape_or_program_changing_keys_are_refused(overrides):
    config = _sgd_config()
    assert not sweep.can_vectorize(config, [overrides])
    with pytest.raises(ConfigError, match='cannot be vectorised'):
        sweep.check_variants(config, [{'learning_rate': 0.1}, overrides])
    with pytest.raises(ConfigError):
        sweep.check_variants(config, [])


def _rows(path):
    rows = [json.loads(line) for line in (path / 'metrics.jsonl').read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != 'elapsed_s'} for r in rows]


@pytest.mark.slow
def test_run_vectorized_writes_what_sequential_runs_write(tmp_path):
    """Same files and numbers per variant; one variant diverges, one stops early."""
    config = _sgd_config(num_epochs=3, steps_per_epoch=4)
    config.model_options.dropout_rate = 0.0
    config.early_stopping.patience = 1
    config.early_stopping.monitor = 'val_loss'
    variants = [{'learning_rate': 0.05}, {'learning_rate': 1e4, 'seed': 3}, {'momentum': 0.0}]
    dirs = [tmp_path / f'vec_{k}' for k in range(len(variants))]
    outs = sweep.run_vectorized(config, variants, dirs)
    for k, vc in enumerate(sweep.variant_configs(config, variants)):
        seq_dir = tmp_path / f'seq_{k}'
        expected = experiment.run(vc, seq_dir)
        got = outs[k]
        for name in ('report.md', 'summary.json', 'curves.png', 'confusion_matrix.png'):
            assert (dirs[k] / name).stat().st_size > 0, name
        assert json.loads((dirs[k] / 'summary.json').read_text()) == json.loads(json.dumps(got))
        assert got['vectorized'] == {'k': 3, 'index': k}
        assert set(got) - {'vectorized'} == set(expected)
        for key in ('status', 'diverged_at_step', 'stopped_early', 'best_epoch', 'epochs_run'):
            assert got[key] == expected[key], (k, key)
        for key in ('test_accuracy', 'test_loss', 'val_accuracy', 'train_loss', 'f1'):
            if expected[key] is None:
                assert got[key] is None
            else:
                np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, err_msg=key)
        assert got['confusion_matrix'] == expected['confusion_matrix']
        exp_rows, got_rows = _rows(seq_dir), _rows(dirs[k])
        assert [r['epoch'] for r in got_rows] == [r['epoch'] for r in exp_rows]
        for e, g in zip(exp_rows, got_rows, strict=True):
            for key in e:
                np.testing.assert_allclose(g[key], e[key], rtol=1e-4, err_msg=f'{k} {key}')
    assert [o['status'] for o in outs] == ['completed', 'diverged', 'completed']
    assert any(o['stopped_early'] for o in outs)  # Early stopping ran per variant too.

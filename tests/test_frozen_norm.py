"""Frozen layers are frozen: their BatchNorm statistics too (config.freeze, E12's variants).

A small torchvision-layout ResNet (one block per stage, width 4, 32x32 input) with random
"pretrained" variables, trained a few steps by the real train step: a frozen group's
parameters and BatchNorm statistics stay bit-identical and its training-mode output is its
evaluation-mode output; the head and the unfrozen groups train, BatchNorm statistics and all.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cnn_jax import steps
from cnn_jax.models import create_model
from configs import default

SIZE = 32
TOP = ('conv1', 'bn1', 'layer1_0', 'layer2_0', 'layer3_0', 'layer4_0', 'fc')


def make_model():
    return create_model('resnet', 10, stage_sizes=(1, 1, 1, 1), width=4)


def random_variables(model, seed=0):
    """Every variable drawn at random (variances positive): stand-in pretrained weights.

    Running means and variances far from a batch's own make training and evaluation
    mode differ clearly wherever BatchNorm uses batch statistics.
    """
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), train=False)
    )
    rng = np.random.default_rng(seed)

    def draw(path, s):
        if path[-1].key == 'var':
            return rng.uniform(0.5, 1.5, s.shape).astype(np.float32)
        return rng.normal(0, 0.1 if path[-1].key != 'mean' else 0.5, s.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def make_state(model, freeze, monkeypatch):
    variables = random_variables(model)
    # The random variables stand in for the init (and its compile: tens of CPU seconds).
    monkeypatch.setattr(steps, 'init_variables', lambda m, shape, rng, init: variables)
    config = default.get_config()
    config.model = 'resnet'
    config.optimizer = 'sgd'
    config.learning_rate = 0.1
    config.freeze = freeze
    return steps.create_train_state(config, model, (SIZE, SIZE, 3), jax.random.key(0), 10)


def by_top(tree):
    """{(top-level module, rest of the path): leaf} as NumPy arrays."""
    flat = traverse_util.flatten_dict(jax.device_get(tree))
    return {k: np.asarray(v) for k, v in flat.items()}


def batch(seed=1, n=8):
    rng = np.random.default_rng(seed)
    return {
        'image': jnp.asarray(rng.normal(size=(n, SIZE, SIZE, 3)), jnp.float32),
        'label': jnp.asarray(rng.integers(0, 10, n), jnp.int32),
    }


def outputs(state, x, train_mode):
    """Every top-level module's output, in training or evaluation mode."""
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    _, captured = state.apply_fn(
        variables,
        x,
        train=train_mode,
        mutable=['batch_stats', 'intermediates'],
        capture_intermediates=lambda module, method: len(module.path) == 1,
    )
    return {k: np.asarray(v['__call__'][0]) for k, v in captured['intermediates'].items()}


FREEZES = {
    'linear': (('backbone',), set(TOP) - {'fc'}),
    'partial': (('conv1', 'bn1', 'layer1', 'layer2'), {'conv1', 'bn1', 'layer1_0', 'layer2_0'}),
}


@pytest.mark.parametrize(
    'freeze, frozen',
    [
        pytest.param(*FREEZES['linear'], id='linear', marks=pytest.mark.slow),
        pytest.param(*FREEZES['partial'], id='partial'),
    ],
)
def test_frozen_batch_norm_keeps_its_statistics_and_normalises_with_them(
    freeze, frozen, monkeypatch
):
    model = make_model()
    state = make_state(model, freeze, monkeypatch)
    before_params, before_stats = by_top(state.params), by_top(state.batch_stats)
    step = jax.jit(steps.train_step)
    for i in range(3):
        state, metrics = step(state, batch(seed=i), jax.random.key(i))
    assert np.isfinite(float(metrics['loss']))
    params, stats = by_top(state.params), by_top(state.batch_stats)
    assert {k[0] for k in stats} == set(TOP) - {'conv1', 'fc'}  # The groups with BN.
    for k in before_params:
        if k[0] in frozen:
            np.testing.assert_array_equal(params[k], before_params[k], err_msg=str(k))
        else:
            assert not np.array_equal(params[k], before_params[k]), k
    for k in before_stats:
        if k[0] in frozen:
            np.testing.assert_array_equal(stats[k], before_stats[k], err_msg=str(k))
        else:  # Unfrozen BatchNorm still tracks its batches.
            assert not np.array_equal(stats[k], before_stats[k]), k

    # In training mode the frozen groups compute exactly what they do in evaluation mode;
    # the unfrozen ones normalise with their batches' statistics, as before.
    x = batch(seed=7)['image']
    in_train, in_eval = outputs(state, x, True), outputs(state, x, False)
    for name in TOP:
        if name in frozen or (name == 'fc' and freeze == ('backbone',)):  # fc: frozen input.
            np.testing.assert_array_equal(in_train[name], in_eval[name], err_msg=name)
        else:
            assert not np.allclose(in_train[name], in_eval[name], atol=1e-3), name


def test_without_freeze_every_batch_norm_trains(monkeypatch):
    """The control: no freeze, the plain model.apply (batch statistics everywhere)."""
    model = make_model()
    state = make_state(model, (), monkeypatch)
    assert state.apply_fn == model.apply
    x = batch(seed=7)['image']
    in_train, in_eval = outputs(state, x, True), outputs(state, x, False)
    for name in TOP:
        if name != 'conv1':  # conv1 comes before any BatchNorm.
            assert not np.allclose(in_train[name], in_eval[name], atol=1e-3), name

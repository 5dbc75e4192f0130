"""cnn_jax's CPU BatchNorm against nn.BatchNorm: values, gradients, statistics, variables."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.models import batch_norm as bn_lib

# (input shape, mean, spread): batch 1, odd maps and row counts, 3 to 512 channels, 2-D.
SHAPES = [
    ((1, 1, 1, 3), 0.0, 1.0),
    ((1, 5, 7, 3), 2.0, 0.5),
    ((2, 9, 11, 16), -1.0, 3.0),
    ((8, 16, 16, 64), 0.5, 1.0),
    ((3, 4, 4, 512), 0.0, 2.0),
    ((16, 100), 1.0, 1.0),
    ((5, 3, 3, 24), 0.0, 1.0),
]


def _layer(cls, train=True):
    return cls(use_running_average=not train, momentum=0.9, epsilon=1e-5)


def _run(cls, x, g, variables, train=True):
    """y, the gradients with respect to x and the parameters, and the new statistics."""
    layer = _layer(cls, train)

    def loss(params, x):
        y, updates = layer.apply(
            {**variables, 'params': params}, x, mutable=['batch_stats'] if train else []
        )
        return jnp.sum(y * g), (y, updates)

    grads, (y, updates) = jax.grad(loss, (0, 1), has_aux=True)(variables['params'], x)
    return jax.device_get((y, grads, updates))


def _inputs(shape, mean, spread, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=shape) * spread + mean).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    c = shape[-1]
    variables = {
        'params': {
            'scale': rng.uniform(0.5, 1.5, c).astype(np.float32),
            'bias': rng.normal(size=c).astype(np.float32),
        },
        'batch_stats': {
            'mean': rng.normal(size=c).astype(np.float32),
            'var': rng.uniform(0.5, 2.0, c).astype(np.float32),
        },
    }
    return x, g, variables


def _assert_close(ours, ref):
    """Within 1e-5 of each array's largest value: the channel sums (the scale and bias
    gradients) add thousands of terms, and where they nearly cancel, float32's
    summation order moves a small sum's own digits."""

    def close(a, b):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(float(np.abs(b).max()), 1.0))

    jax.tree.map(close, ours, ref)


@pytest.mark.parametrize('shape,mean,spread', SHAPES)
def test_training_values_gradients_and_statistics_equal_flax(shape, mean, spread):
    x, g, variables = _inputs(shape, mean, spread)
    _assert_close(_run(bn_lib.BatchNorm, x, g, variables), _run(nn.BatchNorm, x, g, variables))


@pytest.mark.parametrize('shape,mean,spread', SHAPES[1::2])
def test_evaluation_equals_flax(shape, mean, spread):
    x, g, variables = _inputs(shape, mean, spread)
    ours = _run(bn_lib.BatchNorm, x, g, variables, train=False)
    _assert_close(ours, _run(nn.BatchNorm, x, g, variables, train=False))


def test_channel_sum_is_the_sum_over_every_other_axis():
    rng = np.random.default_rng(1)
    for shape in [(1, 3), (7, 5), (4, 6, 6, 16), (2, 3, 5, 129), (128, 8, 8, 64)]:
        x = rng.normal(size=shape).astype(np.float32)
        want = x.astype(np.float64).sum(tuple(range(len(shape) - 1)))
        np.testing.assert_allclose(bn_lib.channel_sum(jnp.asarray(x)), want, rtol=1e-5, atol=1e-4)


class _Net(nn.Module):
    """Two unnamed BatchNorm layers, as the models' norm option makes them."""

    train: bool = True

    @nn.compact
    def __call__(self, x):
        x = bn_lib.batch_norm(self.train, jnp.float32)(x)
        return bn_lib.batch_norm(self.train, jnp.float32)(nn.relu(x))


def test_variables_and_names_are_flaxs(monkeypatch):
    """Checkpoints, torch import and export see the same tree: names, shapes, dtypes."""
    x = jnp.ones((2, 4, 4, 8))
    trees = {}
    for fast in (True, False):
        monkeypatch.setattr(bn_lib, 'cpu_batch_norm_wins', lambda _, d, fast=fast: fast)
        variables = _Net().init(jax.random.key(0), x)
        _, updates = _Net().apply(variables, x, mutable=['batch_stats'])
        assert jax.tree.structure(updates) == jax.tree.structure(
            {'batch_stats': variables['batch_stats']}
        )
        trees[fast] = jax.tree.map(lambda a: (a.shape, a.dtype, float(a.sum())), variables)
    assert trees[True] == trees[False]
    assert sorted(trees[True]['params']) == ['BatchNorm_0', 'BatchNorm_1']


def test_chosen_for_float32_on_cpu_only():
    assert bn_lib.cpu_batch_norm_wins('cpu', jnp.float32)
    assert bn_lib.cpu_batch_norm_wins('cpu', None)  # flax's default dtype: float32 here.
    assert not bn_lib.cpu_batch_norm_wins('cpu', jnp.bfloat16)
    assert not bn_lib.cpu_batch_norm_wins('cpu', jnp.dtype('bfloat16'))
    assert not bn_lib.cpu_batch_norm_wins('gpu', jnp.float32)
    assert not bn_lib.cpu_batch_norm_wins('tpu', jnp.float32)
    chosen = type(bn_lib.batch_norm(True, jnp.float32))
    assert chosen is (bn_lib.BatchNorm if jax.default_backend() == 'cpu' else nn.BatchNorm)
    assert isinstance(bn_lib.batch_norm(True, jnp.float32), nn.BatchNorm)  # frozen_norm_apply


def test_vmapped_variants_equal_each_variants_own():
    """A sweep's K variants (vmap over parameters and inputs) normalise each on its own."""
    x, g, variables = _inputs((4, 6, 6, 16), 0.5, 2.0)
    xs = np.stack([x, 2 * x + 1, -x])
    layer = _layer(bn_lib.BatchNorm)

    def grads(params, x):
        def loss(params, x):
            y, _ = layer.apply({**variables, 'params': params}, x, mutable=['batch_stats'])
            return jnp.sum(y * g)

        return jax.grad(loss, (0, 1))(params, x)

    params = jax.tree.map(lambda a: np.stack([a, a * 2, a + 1]), variables['params'])
    batched = jax.vmap(grads)(params, xs)
    for k in range(3):
        alone = grads(jax.tree.map(lambda a, k=k: a[k], params), xs[k])
        _assert_close(jax.tree.map(lambda a, k=k: a[k], batched), alone)

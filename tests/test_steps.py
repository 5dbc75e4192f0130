"""The train step learns, and N devices compute what one device computes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import parallel, steps
from cnn_jax.models import create_model
from tests.conftest import tiny_config


def tiny_state(config, num_classes=4, shape=(8, 8, 1), mesh=None):
    model = create_model('small_cnn', num_classes, **config.model_options.to_dict())
    state = steps.create_train_state(config, model, shape, jax.random.key(0), 10)
    if mesh is not None:
        state = jax.device_put(state, parallel.replicated(mesh))
    return state


def test_tiny_model_overfits_tiny_batch():
    config = tiny_config(optimizer='adam', learning_rate=1e-2)
    state = tiny_state(config)
    rng = np.random.default_rng(0)
    batch = {
        'image': jnp.asarray(rng.normal(size=(16, 8, 8, 1)), jnp.float32),
        'label': jnp.asarray(rng.integers(0, 4, 16)),
    }
    step = jax.jit(steps.train_step)
    losses = []
    for _ in range(60):
        state, m = step(state, batch, jax.random.key(1))
        losses.append(float(m['loss'] / m['count']))
    assert losses[-1] < losses[0] / 20, losses[::10]
    metrics, _ = steps.eval_step(state, batch)
    assert float(metrics['correct']) == 16.0


def test_eval_step_ignores_masked_examples():
    config = tiny_config()
    state = tiny_state(config)
    x = jnp.ones((4, 8, 8, 1))
    full, _ = steps.eval_step(state, {'image': x, 'label': jnp.asarray([0, 1, 2, 3])})
    masked, _ = steps.eval_step(
        state,
        {'image': x, 'label': jnp.asarray([0, 1, 2, 3]), 'mask': jnp.asarray([1.0, 1.0, 0.0, 0.0])},
    )
    assert float(masked['count']) == 2.0
    two, _ = steps.eval_step(state, {'image': x[:2], 'label': jnp.asarray([0, 1])})
    np.testing.assert_allclose(float(masked['loss']), float(two['loss']), rtol=1e-6)
    np.testing.assert_allclose(float(masked['correct']), float(two['correct']))
    assert float(full['count']) == 4.0


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 (virtual) devices')
def test_eight_devices_match_one_device():
    """3 steps with BN, dropout and augmentation: same loss and parameters (1e-5)."""
    config = tiny_config(optimizer='momentum', learning_rate=0.05, batch_size=16)
    config.model_options.dropout_rate = 0.3
    config.augment.flip = True
    config.augment.crop_padding = 1
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (64, 8, 8, 1), dtype=np.uint8)
    labels = rng.integers(0, 4, 64).astype(np.int32)
    spec = steps.InputSpec(
        mean=(0.5,), std=(0.25,), augment=steps.augment_lib.AugmentConfig(flip=True, crop_padding=1)
    )
    results = []
    for devices in (jax.devices()[:1], jax.devices()[:8]):
        mesh = parallel.make_mesh(devices)
        compiled = steps.compile_steps(config, mesh, spec, num_train=64, steps_per_epoch=4)
        state = tiny_state(config, mesh=mesh)
        acc = jax.device_put(steps.zero_metrics(), parallel.replicated(mesh))
        x = parallel.put_replicated(images, mesh)
        y = parallel.put_replicated(labels, mesh)
        perm = compiled.permutation(jax.random.key(2), 0)
        losses = []
        for s in range(3):
            state, acc = compiled.train(state, acc, x, y, perm, np.int32(s), jax.random.key(3))
            losses.append(float(acc['loss']))
        assert state.params['Dense_0']['kernel'].sharding.num_devices == len(devices)
        results.append((losses, jax.device_get(state.params), jax.device_get(state.batch_stats)))
    (l1, p1, b1), (l8, p8, b8) = results
    np.testing.assert_allclose(l1, l8, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), p1, p8)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), b1, b8)


def test_batch_size_must_divide_over_devices():
    from cnn_jax.errors import ConfigError

    mesh = parallel.make_mesh(jax.devices()[:8]) if jax.device_count() >= 8 else None
    if mesh is None:
        pytest.skip('needs 8 devices')
    with pytest.raises(ConfigError, match='batch_size=12 does not divide over 8 devices'):
        parallel.check_batch_size(12, mesh)


@pytest.mark.parametrize(
    'name',
    ['small_cnn', pytest.param('simplenn', marks=pytest.mark.slow)]
    + [pytest.param('resnet20', marks=pytest.mark.slow)],
)
def test_init_compiled_quickly_gives_the_default_compiles_bits(name):
    """init_variables compiles at INIT_CPU_COMPILER_OPTIONS on the CPU (minutes less over a
    test suite); the variables must be the bits the default compile gives."""
    model = create_model(name, num_classes=10)
    rng, x = jax.random.key(7), jnp.zeros((1, 32, 32, 3), jnp.float32)
    got = steps.init_variables(model, (32, 32, 3), rng)
    params_rng, dropout_rng = jax.random.split(rng)
    init = jax.jit(functools.partial(model.init, train=False))  # XLA's default options.
    want = init({'params': params_rng, 'dropout': dropout_rng}, x)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

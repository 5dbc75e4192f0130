"""Gradient accumulation (config.grad_accum_steps, cnn_jax.accumulate): k micro-batches of
B make the optimiser step one batch of k x B makes; the defaults are today's step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import parallel, steps, tasks
from cnn_jax.errors import ConfigError
from cnn_jax.models import create_model, layers
from tests.conftest import tiny_config

SHAPE, CLASSES, STEPS = (8, 8, 1), 4, 3


def config(batch_size, accum):
    """No BatchNorm and no dropout: the big batch's gradient is the micro-batches' mean."""
    c = tiny_config(optimizer='momentum', learning_rate=0.05, batch_size=batch_size)
    c.grad_accum_steps = accum
    c.model_options.use_bn = False
    return c


def three_steps(c, devices):
    """Params and running loss sum after STEPS compiled steps (gather in the step) on `devices`."""
    mesh = parallel.make_mesh(devices)
    spec = steps.InputSpec(mean=(0.5,), std=(0.25,))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (64 * STEPS, *SHAPE), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, 64 * STEPS).astype(np.int32)
    compiled = steps.compile_steps(c, mesh, spec, num_train=len(images), steps_per_epoch=STEPS)
    model = create_model('small_cnn', CLASSES, **c.model_options.to_dict())
    state = steps.create_train_state(c, model, SHAPE, jax.random.key(0), STEPS)
    state = jax.device_put(state, parallel.replicated(mesh))
    initial = jax.device_get(state.params)
    acc = jax.device_put(steps.zero_metrics(), parallel.replicated(mesh))
    x, y = parallel.put_replicated(images, mesh), parallel.put_replicated(labels, mesh)
    perm = compiled.permutation(jax.random.key(2), 0)
    assert perm.shape == (STEPS, 64)  # The loader gives the optimiser's batch per step.
    for s in range(STEPS):
        state, acc = compiled.train(state, acc, x, y, perm, np.int32(s), jax.random.key(3))
    return initial, jax.device_get(state.params), jax.device_get(acc)


@pytest.mark.parametrize('num_devices', [1, 8])
def test_four_micro_batches_of_16_equal_one_batch_of_64(num_devices):
    if jax.device_count() < num_devices:
        pytest.skip(f'needs {num_devices} (virtual) devices')
    devices = jax.devices()[:num_devices]
    p0, p_big, m_big = three_steps(config(64, 1), devices)
    _, p_acc, m_acc = three_steps(config(16, 4), devices)
    assert m_acc['count'] == m_big['count'] == 64 * STEPS
    np.testing.assert_allclose(m_acc['loss'], m_big['loss'], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(m_acc['correct'], m_big['correct'])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), p_acc, p_big)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p_big, p0)
    assert max(jax.tree.leaves(moved)) > 1e-3  # The steps did train.


# --- The defaults are today's step ----------------------------------------------------------


def reference_train_step(state, batch, rng, *, loss='cross_entropy', label_smoothing=0.0):
    """cnn_jax.steps.train_step as it was before the levers (main 2f51e2c), verbatim."""
    from cnn_jax import losses

    dropout_rng = jax.random.fold_in(rng, state.step)

    def loss_fn(params):
        variables = {'params': params, 'batch_stats': state.batch_stats}
        logits, updates = state.apply_fn(
            variables,
            batch['image'],
            train=True,
            rngs={'dropout': dropout_rng},
            mutable=['batch_stats'],
        )
        per_example = losses.per_example_loss(logits, batch['label'], loss, label_smoothing)
        return jnp.mean(per_example), (per_example, logits, updates)

    grads, (per_example, logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
    new_state = state.apply_gradients(
        grads=grads, batch_stats=updates.get('batch_stats', state.batch_stats)
    )
    return new_state, steps._sums(per_example, logits, batch['label'], jnp.ones_like(per_example))


def test_default_levers_are_bit_identical_to_the_step_before_them():
    """BatchNorm, dropout and label smoothing on; three steps; every bit the same."""
    c = tiny_config(optimizer='momentum', learning_rate=0.05, batch_size=16)
    c.model_options.dropout_rate = 0.3
    assert c.grad_accum_steps == 1 and c.ema_decay == 0.0
    model = create_model('small_cnn', CLASSES, **c.model_options.to_dict())
    rng = np.random.default_rng(0)
    batch = {
        'image': jnp.asarray(rng.normal(size=(16, *SHAPE)), jnp.float32),
        'label': jnp.asarray(rng.integers(0, CLASSES, 16)),
    }
    options = steps.StepOptions.from_config(c)
    results = []
    for fn in (steps.train_step, reference_train_step):
        kwargs = {'options': options} if fn is steps.train_step else {}
        step = jax.jit(lambda s, b, r, fn=fn, kw=kwargs: fn(s, b, r, label_smoothing=0.1, **kw))
        state = steps.create_train_state(c, model, SHAPE, jax.random.key(0), STEPS)
        for _ in range(3):
            state, metrics = step(state, batch, jax.random.key(1))
        results.append(jax.device_get((state.params, state.batch_stats, state.opt_state, metrics)))
    assert jax.tree.structure(results[0]) == jax.tree.structure(results[1])
    jax.tree.map(np.testing.assert_array_equal, *results)


# --- End to end -----------------------------------------------------------------------------


def run_config(batch_size, accum):
    """Digits, 128 training examples: 4 optimiser steps of 32, a warmup-cosine schedule."""
    c = config(batch_size, accum)
    c.num_epochs, c.steps_per_epoch, c.max_train_examples = 1, None, 128
    c.max_eval_examples = 96
    c.schedule, c.warmup_epochs = 'warmup_cosine', 0.5
    return c


def test_an_accumulated_run_equals_its_large_batch_twin(tmp_path):
    """Through tasks.run (what launch.py calls): the schedule counts optimiser steps."""
    twin = tasks.run(run_config(32, 1), tmp_path / 'twin')
    accumulated = tasks.run(run_config(16, 2), tmp_path / 'accumulated')
    assert accumulated['steps_per_epoch'] == twin['steps_per_epoch'] == 128 // 32
    for key in ('train_loss', 'val_loss', 'test_loss', 'test_accuracy', 'val_accuracy'):
        np.testing.assert_allclose(accumulated[key], twin[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize(
    'batch_size, accum, message',
    [
        (16, 0, r'config.grad_accum_steps must be a whole number >= 1 \(1: off\), got 0'),
        (12, 4, 'batch_size=12 does not divide over 8 devices'),  # One micro-batch.
    ],
)
def test_bad_accumulation_is_a_config_error(tmp_path, batch_size, accum, message):
    if jax.device_count() < 8:
        pytest.skip('needs 8 (virtual) devices')
    with pytest.raises(ConfigError, match=message):
        tasks.run(run_config(batch_size, accum), tmp_path)


def test_the_compiled_step_holds_one_micro_batchs_activations():
    """XLA's own account of the compiled step's scratch memory (CPU backend): a batch of 256
    as 4 micro-batches of 64 needs under half what one batch of 256 needs."""
    temp = {}
    batch = {'image': jnp.zeros((256, 16, 16, 3)), 'label': jnp.zeros((256,), jnp.int32)}
    for batch_size, accum in ((256, 1), (64, 4)):
        c = tiny_config(batch_size=batch_size, grad_accum_steps=accum)
        c.model_options.features = (16,)
        model = create_model('small_cnn', CLASSES, **c.model_options.to_dict())
        state = steps.create_train_state(c, model, (16, 16, 3), jax.random.key(0), STEPS)
        options = steps.StepOptions.from_config(c)
        step = jax.jit(lambda s, b, o=options: steps.train_step(s, b, jax.random.key(0), options=o))
        temp[accum] = step.lower(state, batch).compile().memory_analysis().temp_size_in_bytes
    assert temp[4] < temp[1] / 2, temp


@pytest.mark.parametrize('model_name', ['small_cnn', 'resnet20'])
def test_every_convolution_in_the_accumulated_step_is_eigens_form(model_name, monkeypatch):
    """XLA:CPU runs a convolution through Eigen only as NHWC x HWIO -> NHWC, and rewrites
    other forms into it only outside loops. Inside the micro-batches' loop every one of the
    compiled step's convolutions (forward, both gradients; ResNet's strides too) must be in
    that form: lax's own gradient forms ran there as naive loops, 20-35x slower. (With the
    oneDNN wheels installed, oneDNN runs them instead; here XLA's path is checked.)"""
    monkeypatch.setattr(layers, 'onednn_conv_wins', lambda *_: False)
    c = tiny_config(batch_size=8, grad_accum_steps=2, model=model_name)
    c.model_options.features = (8, 8)  # Two convs: the second's input gradient too.
    options = c.model_options.to_dict() if model_name == 'small_cnn' else {}
    model = create_model(model_name, CLASSES, **options)
    state = steps.create_train_state(c, model, (16, 16, 3), jax.random.key(0), STEPS)
    step_options = steps.StepOptions.from_config(c)
    step = jax.jit(lambda s, b: steps.train_step(s, b, jax.random.key(0), options=step_options))
    batch = {'image': jnp.zeros((16, 16, 16, 3)), 'label': jnp.zeros((16,), jnp.int32)}
    text = step.lower(state, batch).compile().as_text()
    assert 'while' in text  # The micro-batches' loop.
    forms = re.findall(r'convolution\(.*dim_labels=([\w>-]+)', text)
    assert len(forms) >= 5 and set(forms) == {'b01f_01io->b01f'}, forms

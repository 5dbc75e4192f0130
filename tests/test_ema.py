"""EMA of the weights (config.ema_decay, cnn_jax.ema): the closed form, resume, the report."""

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

from cnn_jax import checkpoints, ema, steps, tasks
from cnn_jax.models import create_model
from tests import conftest
from tests.conftest import tiny_config

LR, K = 0.1, 7


def decays(decay: float, warmup: bool) -> np.ndarray:
    n = np.arange(K, dtype=np.float64)
    return np.minimum(decay, (1 + n) / (10 + n)) if warmup else np.full(K, decay)


@pytest.mark.parametrize('warmup', [False, True])
def test_ema_after_k_steps_equals_the_closed_form(warmup):
    """SGD on fixed gradients g_1..g_K: w_i = w_0 - lr (g_1 + ... + g_i), and the average
    ema_K = (d_1...d_K) w_0 + sum_i (1 - d_i) (d_{i+1}...d_K) w_i (statistics likewise)."""
    rng = np.random.default_rng(0)
    w0, grads = rng.normal(size=5), rng.normal(size=(K, 5))
    stats = rng.normal(size=(K + 1, 3))  # BatchNorm statistics after each step.
    state = steps.TrainState.create(
        apply_fn=None,
        params={'w': jnp.asarray(w0, jnp.float32)},
        tx=optax.sgd(LR),
        batch_stats={'mean': jnp.asarray(stats[0], jnp.float32)},
        ema=ema.init({'w': jnp.asarray(w0, jnp.float32)}, {'mean': jnp.asarray(stats[0])}),
    )
    options = steps.StepOptions(ema_decay=0.8, ema_warmup=warmup)
    step = jax.jit(functools.partial(steps.apply_update, options=options))
    for i in range(K):
        state = step(state, {'w': jnp.asarray(grads[i], jnp.float32)}, {'mean': stats[i + 1]})
    d = decays(0.8, warmup)
    weights = w0 - LR * np.concatenate([np.zeros((1, 5)), np.cumsum(grads, 0)])  # w_0..w_K
    after = np.array([np.prod(d[i + 1 :]) for i in range(K)])  # d_{i+1} ... d_K
    for got, history in (
        (state.ema['params']['w'], weights),
        (state.ema['batch_stats']['mean'], stats),
    ):
        want = np.prod(d) * history[0] + np.sum(((1 - d) * after)[:, None] * history[1:], 0)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(state.params['w']), weights[-1], rtol=1e-5, atol=1e-6)


def test_off_by_default_the_state_keeps_no_average():
    config = tiny_config()
    assert config.ema_decay == 0.0
    model = create_model('small_cnn', 4, **config.model_options.to_dict())
    state = steps.create_train_state(config, model, (8, 8, 1), jax.random.key(0), 10)
    assert state.ema is None and ema.weights_to_evaluate(state) is state


# --- End to end: resume, the report ---------------------------------------------------------


def ema_config():
    c = tiny_config(num_epochs=2, steps_per_epoch=4, ema_decay=0.9, ema_warmup=True)
    c.best_metric = 'val_loss'
    return c


def test_ema_run_resumed_mid_epoch_ends_where_the_uninterrupted_run_ends(tmp_path, monkeypatch):
    straight = tasks.run(ema_config(), tmp_path / 'straight')
    # The averaged weights are evaluated and reported, and the raw ones beside them.
    assert straight['test_raw_loss'] != straight['test_loss']
    assert 0 <= straight['test_raw_accuracy'] <= 1
    text = (tmp_path / 'straight' / 'report.md').read_text()
    assert '| test, raw weights |' in text and 'moving average of the weights' in text
    summary = json.loads((tmp_path / 'straight' / 'summary.json').read_text())
    assert summary['test_raw_accuracy'] == straight['test_raw_accuracy']

    conftest.assert_resumed_run_ends_like(straight, ema_config, tmp_path / 'resumed', monkeypatch)


# --- Vectorised sweeps ----------------------------------------------------------------------


def test_a_vectorised_sweep_keeps_each_variants_average_and_accumulates():
    """Two learning rates, EMA and 2 micro-batches: the second variant of the stack ends
    with the weights and average of its own compiled run (3 steps)."""
    config = tiny_config(optimizer='momentum', learning_rate=0.05, batch_size=16)
    config.ema_decay, config.ema_warmup, config.grad_accum_steps = 0.9, True, 2
    config.model_options.dropout_rate = 0.2
    overrides = [{'learning_rate': 0.1}, {'learning_rate': 0.01}]
    made, state, one = conftest.stack_and_alone(config, overrides)
    k = 1  # Not the first: its learning rate is the stack's own, not the base config's.
    got = jax.device_get(made.variant(state, k))
    want, got = jax.tree.leaves((one.params, one.ema)), jax.tree.leaves((got.params, got.ema))
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    leaves = jax.tree.leaves(jax.device_get(state.ema['params']))
    assert not np.allclose(leaves[0][0], leaves[0][1])  # The variants' averages differ.


class _StateBeforeEma(train_state.TrainState):
    """steps.TrainState as it was before the levers (3426b3b): no `ema` field."""

    batch_stats: Any = None


def test_a_checkpoint_saved_before_the_ema_field_resumes(tmp_path):
    """A run checkpointed by a commit before EMA existed resumes here (E8's run did): its
    values come back, and `ema` stays None."""
    params = {'w': jnp.arange(3.0), 'b': jnp.ones(2)}
    tx = optax.sgd(0.1, momentum=0.9)
    old = _StateBeforeEma.create(
        apply_fn=None, params=params, tx=tx, batch_stats={'m': jnp.ones(2)}
    )
    old = old.replace(step=7, opt_state=jax.tree.map(lambda x: x + 0.5, old.opt_state))
    saver = checkpoints.Checkpoints(tmp_path)
    saver.save_latest(7, old, {'epoch': 1})
    saver.close()
    zeros = jax.tree.map(jnp.zeros_like, (params, {'m': jnp.ones(2)}))
    template = steps.TrainState.create(apply_fn=None, params=zeros[0], tx=tx, batch_stats=zeros[1])
    state, loop = checkpoints.Checkpoints(tmp_path).restore_latest(template)
    assert loop == {'epoch': 1} and int(state.step) == 7 and state.ema is None
    jax.tree.map(
        np.testing.assert_array_equal, (state.params, state.opt_state), (params, old.opt_state)
    )
    np.testing.assert_array_equal(state.batch_stats['m'], np.ones(2))

"""Optimisers, schedules and losses against their formulas on hand-checkable cases."""

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import losses, optim
from cnn_jax.errors import ConfigError
from tests.conftest import tiny_config


def run_updates(config, grads_seq, params=1.0, steps_per_epoch=10):
    params = {'w': jnp.asarray([params])}
    tx = optim.build_optimizer(config, steps_per_epoch, params)
    state = tx.init(params)
    for g in grads_seq:
        updates, state = tx.update({'w': jnp.asarray([g])}, state, params)
        params = optax.apply_updates(params, updates)
    return float(params['w'][0])


def test_sgd_is_w_minus_lr_g():
    c = tiny_config(optimizer='sgd', learning_rate=0.1)
    assert run_updates(c, [2.0]) == pytest.approx(1.0 - 0.1 * 2.0)


def test_momentum_matches_pytorch_formula():
    # PyTorch: buf = m * buf + g; w -= lr * buf.
    c = tiny_config(optimizer='momentum', learning_rate=0.1, momentum=0.9)
    w = run_updates(c, [1.0, 1.0])
    assert w == pytest.approx(1.0 - 0.1 * 1.0 - 0.1 * (0.9 + 1.0))


def test_nesterov_matches_pytorch_formula():
    # PyTorch: buf = m * buf + g; w -= lr * (g + m * buf).
    c = tiny_config(optimizer='nesterov', learning_rate=0.1, momentum=0.9)
    w = run_updates(c, [1.0])
    assert w == pytest.approx(1.0 - 0.1 * (1.0 + 0.9 * 1.0))


def test_adam_first_step_is_lr_times_sign():
    c = tiny_config(optimizer='adam', learning_rate=0.01)
    assert run_updates(c, [5.0]) == pytest.approx(1.0 - 0.01, abs=1e-7)


def test_coupled_l2_adds_wd_times_param_to_gradient():
    c = tiny_config(optimizer='sgd', learning_rate=0.1, weight_decay=0.5)
    assert run_updates(c, [2.0], params=3.0) == pytest.approx(3.0 - 0.1 * (2.0 + 0.5 * 3.0))


def test_coupled_l2_goes_through_adam_but_decoupled_does_not():
    coupled = tiny_config(optimizer='adam', learning_rate=0.01, weight_decay=0.5)
    # With coupled L2 the decay joins the gradient, then Adam normalises it: still lr * sign.
    assert run_updates(coupled, [1.0], params=2.0) == pytest.approx(2.0 - 0.01, abs=1e-6)
    adamw = tiny_config(optimizer='adamw', learning_rate=0.01, weight_decay=0.5)
    # AdamW: w -= lr * (adam_step + wd * w).
    assert run_updates(adamw, [1.0], params=2.0) == pytest.approx(
        2.0 - 0.01 * (1.0 + 0.5 * 2.0), abs=1e-6
    )


def test_gradient_clipping_caps_global_norm():
    c = tiny_config(optimizer='sgd', learning_rate=1.0, grad_clip_norm=0.5)
    assert run_updates(c, [10.0]) == pytest.approx(1.0 - 0.5)


@pytest.mark.parametrize(
    'schedule, extra, expected',
    [
        ('constant', {}, [1.0, 1.0, 1.0]),
        ('step', {'step_epochs': (1, 2), 'step_factor': 0.1}, [1.0, 0.1, 0.01]),
        (
            'cosine',
            {},
            [1.0, 0.5 * (1 + math.cos(math.pi / 3)), 0.5 * (1 + math.cos(2 * math.pi / 3))],
        ),
        ('warmup_cosine', {'warmup_epochs': 1.0}, [0.0, 1.0, 0.5]),
    ],
)
def test_schedules_at_epoch_boundaries(schedule, extra, expected):
    # 3 epochs of 10 steps; the multiplier at steps 0, 10, 20.
    c = tiny_config(schedule=schedule, num_epochs=3, **extra)
    fn = optim.build_schedule(c, steps_per_epoch=10)
    np.testing.assert_allclose([float(fn(s)) for s in (0, 10, 20)], expected, atol=1e-6)


def test_freezing_leaves_frozen_params_and_scales_backbone():
    c = tiny_config(
        optimizer='sgd', learning_rate=0.1, freeze=('conv',), backbone_lr_factor=0.5, head_name='fc'
    )
    params = {'conv1': {'w': jnp.ones(1)}, 'layer1': {'w': jnp.ones(1)}, 'fc': {'w': jnp.ones(1)}}
    tx = optim.build_optimizer(c, 10, params)
    grads = {k: {'w': jnp.ones(1)} for k in params}
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(updates['conv1']['w'][0]) == 0.0
    assert float(updates['layer1']['w'][0]) == pytest.approx(-0.05)
    assert float(updates['fc']['w'][0]) == pytest.approx(-0.1)


@pytest.mark.parametrize(
    'key, value, match',
    [
        ('optimizer', 'adagrad', 'known optimizers: sgd, momentum'),
        ('schedule', 'linear', 'known schedules'),
        ('weight_decay_mode', 'both', 'coupled'),
        ('freeze', ('nope',), 'matches no parameters'),
    ],
)
def test_bad_optimizer_configs_name_the_problem(key, value, match):
    c = tiny_config(**{key: value})
    with pytest.raises(ConfigError, match=match):
        optim.build_optimizer(c, 10, {'conv1': {'w': jnp.ones(1)}, 'fc': {'w': jnp.ones(1)}})


def test_cross_entropy_uniform_logits_is_ln_classes():
    loss = losses.per_example_loss(jnp.zeros((2, 10)), jnp.asarray([3, 7]))
    np.testing.assert_allclose(loss, [math.log(10)] * 2, rtol=1e-6)


def test_label_smoothing_matches_formula():
    logits = jnp.asarray([[2.0, 0.0, -1.0]])
    logp = np.log(np.exp([2.0, 0.0, -1.0]) / np.exp([2.0, 0.0, -1.0]).sum())
    target = np.array([1.0, 0.0, 0.0]) * 0.7 + 0.3 / 3
    got = losses.per_example_loss(logits, jnp.asarray([0]), label_smoothing=0.3)
    np.testing.assert_allclose(got, [-(target * logp).sum()], rtol=1e-5)


def test_mse_and_l1_on_softmax_match_pytorch_reduction():
    logits = jnp.asarray([[0.0, 0.0], [math.log(3.0), 0.0]])  # softmax: [.5,.5], [.75,.25]
    labels = jnp.asarray([0, 1])
    mse = losses.per_example_loss(logits, labels, 'mse')
    l1 = losses.per_example_loss(logits, labels, 'l1')
    np.testing.assert_allclose(mse, [0.25, (0.75**2 + 0.75**2) / 2], rtol=1e-6)
    np.testing.assert_allclose(l1, [0.5, 0.75], rtol=1e-6)


def test_unknown_loss_lists_known():
    with pytest.raises(ConfigError, match='cross_entropy, mse, l1'):
        losses.check_loss('hinge')

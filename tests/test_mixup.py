"""Mixup and CutMix (config.augment.mixup_alpha, cutmix_alpha, mix_prob, switch_prob):
the mixed batch and its soft targets follow the drawn lambda, the losses take soft
targets, mixing off is today's step, and a launch with mixing trains."""

import functools
import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import losses, steps, tasks
from cnn_jax.data import augment
from cnn_jax.models import create_model
from tests import conftest
from tests.conftest import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
N, H, W, C, CLASSES = 8, 10, 12, 3, 5


def batch():
    """Image i filled with i + 1, so each pixel says which image it came from."""
    x = jnp.broadcast_to(jnp.arange(1.0, N + 1)[:, None, None, None], (N, H, W, C))
    return x, jnp.arange(N, dtype=jnp.int32) % CLASSES


def one_hot(labels):
    return np.eye(CLASSES, dtype=np.float32)[np.asarray(labels)]


@pytest.mark.parametrize('seed', range(4))
def test_mixup_is_the_convex_combination_of_the_drawn_lambda(seed):
    x, labels = batch()
    cfg = augment.AugmentConfig(mixup_alpha=0.4)
    mixed, targets, lam = augment.mix(jax.random.key(seed), x, labels, CLASSES, cfg)
    lam = float(lam)
    assert 0.0 < lam < 1.0
    np.testing.assert_allclose(mixed, lam * x + (1 - lam) * x[::-1], rtol=1e-6)
    want = lam * one_hot(labels) + (1 - lam) * one_hot(labels[::-1])
    np.testing.assert_allclose(targets, want, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.sum(targets, -1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('seed', range(6))
def test_cutmix_target_weight_is_the_pasted_areas_fraction(seed):
    x, labels = batch()
    cfg = augment.AugmentConfig(cutmix_alpha=1.0)
    mixed, targets, lam = augment.mix(jax.random.key(seed), x, labels, CLASSES, cfg)
    mixed = np.asarray(mixed)
    pasted = mixed != np.asarray(x)  # Every partner differs from its image (N even).
    np.testing.assert_array_equal(mixed[pasted], np.asarray(x[::-1])[pasted])
    box = pasted[0, :, :, 0]
    assert all((pasted[i] == box[:, :, None]).all() for i in range(N))  # One box for all.
    rows, cols = np.flatnonzero(box.any(1)), np.flatnonzero(box.any(0))
    if box.any():  # A rectangle: every pixel between its first and last rows and columns.
        assert box[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
    fraction = box.sum() / (H * W)
    np.testing.assert_allclose(float(lam), 1.0 - fraction, rtol=1e-6)
    want = (1 - fraction) * one_hot(labels) + fraction * one_hot(labels[::-1])
    np.testing.assert_allclose(targets, want, rtol=1e-6, atol=1e-6)


def test_cutmix_box_follows_timms_rand_bbox():
    """lam 0.75 on 8x8: cut 0.5 of each side, a 4x4 box centred at the drawn pixel,
    clipped at the border."""
    box = np.asarray(augment.cutmix_box(jax.random.key(0), jnp.float32(0.75), 8, 8))
    cy, cx = np.asarray(jax.random.randint(jax.random.key(0), (2,), 0, jnp.array([8, 8])))
    want = np.zeros((8, 8), bool)
    want[max(cy - 2, 0) : min(cy + 2, 8), max(cx - 2, 0) : min(cx + 2, 8)] = True
    np.testing.assert_array_equal(box, want)


@pytest.mark.parametrize('switch_prob, kind', [(1.0, 'cutmix'), (0.0, 'mixup')])
def test_switch_prob_picks_cutmix_or_mixup(switch_prob, kind):
    x, labels = batch()
    cfg = augment.AugmentConfig(mixup_alpha=0.4, cutmix_alpha=1.0, switch_prob=switch_prob)
    for seed in range(3):
        mixed, _, lam = augment.mix(jax.random.key(seed), x, labels, CLASSES, cfg)
        mixed, lam = np.asarray(mixed), float(lam)
        pure = np.isin(mixed, np.arange(1.0, N + 1)).all()  # Only copied pixels.
        assert pure == (kind == 'cutmix') or lam == 1.0


def test_mix_prob_zero_leaves_the_batch_and_one_hot_targets():
    x, labels = batch()
    cfg = augment.AugmentConfig(mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.0)
    mixed, targets, lam = augment.mix(jax.random.key(0), x, labels, CLASSES, cfg)
    assert float(lam) == 1.0
    np.testing.assert_array_equal(mixed, x)
    np.testing.assert_array_equal(targets, one_hot(labels))


def test_soft_target_losses_with_label_smoothing_are_timms():
    """Cross-entropy of mixed targets is the lam-weighted pair of losses; smoothing after
    mixing is timm's mixup_target (off = s / C, on = 1 - s + off, then mixed)."""
    logits = jax.random.normal(jax.random.key(1), (N, CLASSES))
    labels, lam, s = jnp.arange(N) % CLASSES, 0.3, 0.1
    soft = lam * one_hot(labels) + (1 - lam) * one_hot(labels[::-1])
    got = losses.per_example_loss(logits, jnp.asarray(soft), 'cross_entropy')
    ce = losses.per_example_loss
    want = lam * ce(logits, labels) + (1 - lam) * ce(logits, labels[::-1])
    np.testing.assert_allclose(got, want, rtol=1e-5)
    off, on = s / CLASSES, 1 - s + s / CLASSES
    smooth = np.where(one_hot(labels) > 0, on, off)
    timm = lam * smooth + (1 - lam) * np.where(one_hot(labels[::-1]) > 0, on, off)
    got = losses.per_example_loss(logits, jnp.asarray(soft), 'cross_entropy', label_smoothing=s)
    np.testing.assert_allclose(got, optax.softmax_cross_entropy(logits, timm), rtol=1e-5)
    probs = np.asarray(jax.nn.softmax(logits))
    mse = losses.per_example_loss(logits, jnp.asarray(soft), 'mse')
    np.testing.assert_allclose(mse, np.mean((probs - soft) ** 2, -1), rtol=1e-5)
    l1 = losses.per_example_loss(logits, jnp.asarray(soft), 'l1')
    np.testing.assert_allclose(l1, np.mean(np.abs(probs - soft), -1), rtol=1e-5)


def test_mixing_off_is_todays_step():
    """Alphas 0 (the default): no key drawn, integer labels, the step of the pipeline
    before mixing existed (augment, scale, normalise, train_step). Equal to float32
    rounding: the two are separately compiled programs, which XLA:CPU may fuse and so
    round differently (1 ulp on 2 of 16 values on one machine); another key's crops and
    flips would move the parameters by far more."""
    c = tiny_config()
    model = create_model('small_cnn', CLASSES, **c.model_options.to_dict())
    state = steps.create_train_state(c, model, (8, 8, 1), jax.random.key(0), 4)
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 255, (32, 8, 8, 1), dtype=np.uint8))
    labels = jnp.asarray(rng.integers(0, CLASSES, 32).astype(np.int32))
    aug = augment.AugmentConfig(flip=True, crop_padding=1, mix_prob=0.5)
    spec = steps.InputSpec((0.5,), (0.25,), augment=aug, num_classes=CLASSES)
    assert not aug.mixes
    shard = jax.sharding.NamedSharding(
        jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',)), jax.sharding.PartitionSpec()
    )
    step = jax.jit(steps.input_train_step(spec, shard, 'cross_entropy'))
    key = jax.random.key(3)
    got, _ = step(state, steps.zero_metrics(), images, labels, None, 0, key, 0.0)

    @jax.jit
    def today(state, images, labels, rng):
        aug_rng = jax.random.fold_in(jax.random.fold_in(rng, 1), state.step)
        x = augment.augment(aug_rng, images, aug)
        x = augment.normalize(augment.to_unit_range(x), np.array([0.5]), np.array([0.25]))
        batch = {'image': x, 'label': labels}
        return steps.train_step(state, batch, jax.random.fold_in(rng, 0))[0]

    want = today(state, images, labels, key)
    close = functools.partial(np.testing.assert_allclose, rtol=1e-6, atol=1e-9)
    jax.tree.map(close, got.params, want.params)
    other = today(state, images, labels, jax.random.key(4))
    assert not np.allclose(other.params['Dense_0']['kernel'], want.params['Dense_0']['kernel'])


def test_a_launch_with_mixup_and_cutmix_trains_to_finite_metrics(tmp_path):
    """launch.py as a user runs it: digits, mixup and CutMix with label smoothing and two
    accumulated micro-batches (soft targets through accumulate.micro_batches)."""
    args = [
        '--config=configs/quickstart.py',
        f'--workdir={tmp_path}',
        '--config.num_epochs=1',
        '--config.steps_per_epoch=8',
        '--config.augment.mixup_alpha=0.2',
        '--config.augment.cutmix_alpha=1.0',
        '--config.label_smoothing=0.1',
        '--config.grad_accum_steps=2',
    ]
    r = subprocess.run(
        [sys.executable, 'launch.py', *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / 'summary.json').read_text())
    row = json.loads((tmp_path / 'metrics.jsonl').read_text().splitlines()[-1])
    for value in (row['train_loss'], row['train_accuracy'], summary['test_loss']):
        assert np.isfinite(value)
    assert summary['test_accuracy'] > 0.3  # Ten classes: it learned from mixed batches.


@pytest.mark.slow
def test_a_vectorised_sweep_mixes_as_each_variants_own_run():
    """Two label smoothings over mixed batches: the second variant of the stack ends with
    the weights of its own compiled run (3 steps); mixing needs no refusal in sweeps."""
    config = tiny_config(optimizer='momentum', learning_rate=0.05, batch_size=16)
    config.augment.mixup_alpha, config.augment.cutmix_alpha = 0.4, 1.0
    overrides = [{'label_smoothing': 0.0}, {'label_smoothing': 0.2}]
    _, stacked, alone = conftest.stack_and_alone(config, overrides)
    stacked, alone = jax.tree.map(lambda x: x[1], stacked.params), alone.params
    for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(alone), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_mixed_run_resumed_mid_epoch_ends_where_the_uninterrupted_run_ends(tmp_path, monkeypatch):
    """The mixing key is the step's (its augmentation key folded), so a resumed run
    mixes the batches the uninterrupted one mixed."""

    def mixed():
        c = tiny_config(num_epochs=2, steps_per_epoch=4)
        c.augment.mixup_alpha, c.augment.cutmix_alpha, c.augment.flip = 0.4, 1.0, True
        return c

    straight = tasks.run(mixed(), tmp_path / 'straight')
    conftest.assert_resumed_run_ends_like(straight, mixed, tmp_path / 'resumed', monkeypatch)

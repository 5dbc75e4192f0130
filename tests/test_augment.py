"""Each augmentation moves pixels the way its parameters say, on hand-made images."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.data import augment


def ramp(n=4, h=6, w=6, c=1):
    """Distinct values: pixel (i, j) of image k holds 100k + 10i + j."""
    k, i, j = np.meshgrid(np.arange(n), np.arange(h), np.arange(w), indexing='ij')
    return jnp.asarray((100 * k + 10 * i + j)[..., None].repeat(c, -1), jnp.float32)


def test_flip_reverses_columns_or_leaves_image():
    x = ramp(n=64)
    y = augment.random_flip(jax.random.key(0), x)
    flipped = [bool(jnp.all(y[k] == x[k, :, ::-1])) for k in range(64)]
    same = [bool(jnp.all(y[k] == x[k])) for k in range(64)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert 16 < sum(flipped) < 48  # About half.


def test_crop_with_padding_shifts_by_at_most_padding():
    x = ramp(n=32) + 1.0  # No zeros inside the image: zeros mark the padding.
    pad = 2
    y = np.asarray(augment.random_crop(jax.random.key(1), x, pad))
    shifts = set()
    for k in range(32):
        # Find the shift (dy, dx) that explains the crop: y[i, j] = x[i + dy, j + dx].
        found = None
        for dy in range(-pad, pad + 1):
            for dx in range(-pad, pad + 1):
                shifted = np.zeros_like(y[k])
                src = np.asarray(x[k])
                h, w = src.shape[:2]
                for i in range(h):
                    for j in range(w):
                        si, sj = i + dy, j + dx
                        if 0 <= si < h and 0 <= sj < w:
                            shifted[i, j] = src[si, sj]
                if np.array_equal(shifted, y[k]):
                    found = (dy, dx)
        assert found is not None, f'image {k} is not a shifted copy'
        shifts.add(found)
    assert len(shifts) > 1  # Random, not one fixed shift.


def test_rotation_by_90_degrees_moves_rows_to_columns():
    x = ramp(n=1, h=5, w=5)
    y = augment.affine_transform(x, jnp.asarray([90.0]), jnp.asarray([1.0]))
    # Counter-clockwise by 90: the top row becomes the left column, read bottom-up.
    np.testing.assert_allclose(y[0, :, 0, 0], x[0, 0, ::-1, 0], atol=1e-4)
    np.testing.assert_allclose(y[0, 2, 2, 0], x[0, 2, 2, 0], atol=1e-4)  # Centre fixed.


def test_zoom_scales_distances_from_centre_and_fills_black():
    x = ramp(n=1, h=9, w=9) + 1.0
    zoom_in = augment.affine_transform(x, jnp.asarray([0.0]), jnp.asarray([2.0]))
    # Output (4, 6) is 2 px right of centre: it samples the input 1 px right of centre.
    np.testing.assert_allclose(zoom_in[0, 4, 6, 0], x[0, 4, 5, 0], atol=1e-4)
    zoom_out = augment.affine_transform(x, jnp.asarray([0.0]), jnp.asarray([0.5]))
    assert float(zoom_out[0, 0, 0, 0]) == 0.0  # Samples from outside: black.
    np.testing.assert_allclose(zoom_out[0, 5, 5, 0], x[0, 6, 6, 0], atol=1e-4)


def test_identity_affine_is_exact():
    x = ramp(n=2, h=7, w=5, c=3)
    y = augment.affine_transform(x, jnp.zeros(2), jnp.ones(2))
    np.testing.assert_allclose(y, x, atol=1e-4)


@pytest.mark.parametrize(
    'cfg',
    [
        augment.AugmentConfig(),
        augment.AugmentConfig(flip=True, crop_padding=2, rotation_degrees=10, scale=0.1),
    ],
)
def test_augment_keeps_shape_and_range(cfg):
    x = ramp(n=8) / 800.0  # Values in [0, 1).
    y = augment.augment(jax.random.key(3), x, cfg)
    assert y.shape == x.shape
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    if cfg == augment.AugmentConfig():
        np.testing.assert_array_equal(y, x)


def test_preprocess_resizes_and_normalises():
    images = jnp.full((2, 8, 8, 3), 255, jnp.uint8)
    out = augment.preprocess(images, np.array([0.5, 0.5, 0.5]), np.array([0.25, 0.5, 1.0]), 16)
    assert out.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(out[0, 0, 0], [2.0, 1.0, 0.5], rtol=1e-6)


@pytest.mark.parametrize(
    'cfg, image_size',
    [
        (augment.AugmentConfig(flip=True, crop_padding=2), None),  # Augmented on uint8.
        (augment.AugmentConfig(flip=True, crop_padding=2), 12),  # Resized first: float.
        (augment.AugmentConfig(crop_padding=2, rotation_degrees=10), None),  # Float.
    ],
)
def test_training_batch_is_augment_then_normalise_of_the_float_images(cfg, image_size):
    """make_batch may crop and flip the uint8 pixels first; the values must not change."""
    from cnn_jax import steps

    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    labels = jnp.arange(16, dtype=jnp.int32)
    indices = jnp.asarray([3, 1, 4, 15, 9, 2])
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    spec = steps.InputSpec(mean=mean, std=std, image_size=image_size, augment=cfg)
    key = jax.random.key(5)
    batch = spec.make_batch(images, labels, indices, key)
    x = augment.augment(key, augment.to_unit_range(images[indices], image_size), cfg)
    expected = augment.normalize(x, np.array(mean), np.array(std))
    np.testing.assert_array_equal(batch['image'], expected)
    np.testing.assert_array_equal(batch['label'], [3, 1, 4, 15, 9, 2])
    # The augmentation did something: the batch differs from the plain evaluation batch.
    assert not np.array_equal(batch['image'], spec.make_batch(images, labels, indices)['image'])

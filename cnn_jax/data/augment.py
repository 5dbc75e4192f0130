"""Image preprocessing and augmentation on the device, inside the compiled step.

Images arrive as uint8 NHWC batches gathered from the device-resident dataset. They are
scaled to [0, 1], resized, augmented (padding and rotation fill with black, as
torchvision does before `Normalize`) and then normalised per channel. When crop and flip
are the only transforms and nothing is resized, `steps.InputSpec` applies them to the
uint8 batch instead: they only move pixels, so the values are the same.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Which random transforms to apply to training batches (hashable: a jit constant)."""

    flip: bool = False
    crop_padding: int = 0
    rotation_degrees: float = 0.0
    scale: float = 0.0

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> AugmentConfig:
        return cls(
            flip=bool(cfg.flip),
            crop_padding=int(cfg.crop_padding),
            rotation_degrees=float(cfg.rotation_degrees),
            scale=float(cfg.scale),
        )

    @property
    def moves_pixels_only(self) -> bool:
        """True when every enabled transform copies pixels (crop, flip) without resampling.

        Such transforms give the same result on uint8 as on float images, and on uint8
        they touch a quarter of the memory.
        """
        return self.rotation_degrees == 0 and self.scale == 0


def to_unit_range(images: jnp.ndarray, image_size: int | None = None) -> jnp.ndarray:
    """uint8 -> float32 in [0, 1], resized (bilinear, antialiased) to image_size."""
    x = images.astype(jnp.float32) / 255.0
    if image_size is not None and x.shape[1:3] != (image_size, image_size):
        x = jax.image.resize(x, (x.shape[0], image_size, image_size, x.shape[3]), 'bilinear')
    return x


def normalize(x: jnp.ndarray, mean: np.ndarray, std: np.ndarray) -> jnp.ndarray:
    return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def preprocess(
    images: jnp.ndarray, mean: np.ndarray, std: np.ndarray, image_size: int | None = None
) -> jnp.ndarray:
    """The evaluation transform: scale, resize, normalise."""
    return normalize(to_unit_range(images, image_size), mean, std)


def random_flip(rng: jax.Array, x: jnp.ndarray) -> jnp.ndarray:
    """Reverses the columns of each image with probability 1/2."""
    flip = jax.random.bernoulli(rng, 0.5, (x.shape[0], 1, 1, 1))
    return jnp.where(flip, x[:, :, ::-1, :], x)


def random_crop(rng: jax.Array, x: jnp.ndarray, padding: int) -> jnp.ndarray:
    """Zero-pads by `padding` pixels and takes a random crop of the original size."""
    n, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    offsets = jax.random.randint(rng, (n, 2), 0, 2 * padding + 1)

    def crop(image, offset):
        return jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, offsets)


def affine_transform(x: jnp.ndarray, degrees: jnp.ndarray, scale: jnp.ndarray) -> jnp.ndarray:
    """Rotates each image by degrees[i] (counter-clockwise) and zooms it by scale[i].

    Bilinear sampling about the image centre; pixels from outside are black.
    """
    n, h, w, c = x.shape
    rows, cols = jnp.meshgrid(
        jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing='ij'
    )
    cy, cx = (h - 1) / 2.0, (w - 1) / 2.0

    def one(image, deg, s):
        t = jnp.deg2rad(deg)
        # Inverse map: output pixel -> input location (rotate back, shrink by the zoom).
        # Rows grow downwards, so a counter-clockwise turn (torchvision's positive angle)
        # samples from the clockwise-rotated location.
        dy, dx = (rows - cy) / s, (cols - cx) / s
        src_y = cy + jnp.cos(t) * dy + jnp.sin(t) * dx
        src_x = cx - jnp.sin(t) * dy + jnp.cos(t) * dx

        def channel(ch):
            return jax.scipy.ndimage.map_coordinates(ch, [src_y, src_x], order=1, cval=0.0)

        return jax.vmap(channel, in_axes=2, out_axes=2)(image)

    return jax.vmap(one)(x, degrees, scale)


def random_affine(
    rng: jax.Array, x: jnp.ndarray, max_degrees: float, max_scale: float
) -> jnp.ndarray:
    """Random rotation in [-max_degrees, max_degrees] and zoom in [1 - s, 1 + s]."""
    k1, k2 = jax.random.split(rng)
    n = x.shape[0]
    degrees = jax.random.uniform(k1, (n,), minval=-max_degrees, maxval=max_degrees)
    scale = jax.random.uniform(k2, (n,), minval=1.0 - max_scale, maxval=1.0 + max_scale)
    return affine_transform(x, degrees, scale)


def augment(rng: jax.Array, x: jnp.ndarray, cfg: AugmentConfig) -> jnp.ndarray:
    """Applies the transforms `cfg` enables, each with its own key."""
    k_crop, k_flip, k_affine = jax.random.split(rng, 3)
    if cfg.rotation_degrees > 0 or cfg.scale > 0:
        x = random_affine(k_affine, x, cfg.rotation_degrees, cfg.scale)
    if cfg.crop_padding > 0:
        x = random_crop(k_crop, x, cfg.crop_padding)
    if cfg.flip:
        x = random_flip(k_flip, x)
    return x

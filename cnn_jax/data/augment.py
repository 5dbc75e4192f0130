"""Image preprocessing and augmentation on the device, inside the compiled step.

Images arrive as uint8 NHWC batches gathered from the device-resident dataset. They are
scaled to [0, 1], resized, augmented (padding and rotation fill with black, as
torchvision does before `Normalize`) and then normalised per channel. When crop and flip
are the only transforms and nothing is resized, `steps.InputSpec` applies them to the
uint8 batch instead: they only move pixels, so the values are the same.

Mixup and CutMix (`mix`, timm's --mixup/--cutmix) come last, on the normalised batch:
they mix images with their partners and turn the labels into soft targets.
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
    mixup_alpha: float = 0.0  # `mix`: Beta(alpha, alpha) weights; 0: off.
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0  # The chance that a batch is mixed.
    switch_prob: float = 0.5  # With both alphas > 0: the chance of CutMix over mixup.

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> AugmentConfig:
        return cls(
            flip=bool(cfg.flip),
            crop_padding=int(cfg.crop_padding),
            rotation_degrees=float(cfg.rotation_degrees),
            scale=float(cfg.scale),
            mixup_alpha=float(cfg.mixup_alpha),
            cutmix_alpha=float(cfg.cutmix_alpha),
            mix_prob=float(cfg.mix_prob),
            switch_prob=float(cfg.switch_prob),
        )

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (mixup or CutMix), so targets are soft."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

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


def cutmix_box(rng: jax.Array, lam: jax.Array, h: int, w: int) -> jnp.ndarray:
    """timm's `rand_bbox`: an (h, w) bool mask of a box of about (1 - lam) of the image,
    centred at a uniform pixel and clipped at the borders."""
    cut = jnp.sqrt(1.0 - lam)
    half_h, half_w = (h * cut).astype(jnp.int32) // 2, (w * cut).astype(jnp.int32) // 2
    cy, cx = jax.random.randint(rng, (2,), 0, jnp.array([h, w]))
    rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
    inside_rows = (rows >= jnp.clip(cy - half_h, 0, h)) & (rows < jnp.clip(cy + half_h, 0, h))
    inside_cols = (cols >= jnp.clip(cx - half_w, 0, w)) & (cols < jnp.clip(cx + half_w, 0, w))
    return inside_rows & inside_cols


def mix(
    rng: jax.Array, x: jnp.ndarray, labels: jnp.ndarray, num_classes: int, cfg: AugmentConfig
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """timm's batch-mode Mixup: (images, soft targets (N, C), lam), each image mixed with
    its partner in the reversed batch.

    With probability cfg.mix_prob the batch is mixed (else lam = 1): by CutMix with
    probability cfg.switch_prob when both alphas are > 0, else by the one that is. lam ~
    Beta(alpha, alpha); mixup takes lam x + (1 - lam) partner, CutMix pastes the partner's
    `cutmix_box` and sets lam to the fraction of the image left. Targets are lam one_hot +
    (1 - lam) one_hot(partner); label smoothing applies after (cnn_jax.losses).
    """
    k_apply, k_switch, k_mixup, k_cutmix, k_box = jax.random.split(rng, 5)
    partner = x[::-1]
    mixed, lam = x, jnp.float32(1.0)
    if cfg.mixup_alpha > 0:
        lam = jax.random.beta(k_mixup, cfg.mixup_alpha, cfg.mixup_alpha)
        mixed = lam * x + (1.0 - lam) * partner
    if cfg.cutmix_alpha > 0:
        box_lam = jax.random.beta(k_cutmix, cfg.cutmix_alpha, cfg.cutmix_alpha)
        box = cutmix_box(k_box, box_lam, x.shape[1], x.shape[2])
        cut = jnp.where(box[None, :, :, None], partner, x)
        cut_lam = 1.0 - jnp.mean(box.astype(jnp.float32))
        use_cut = True if cfg.mixup_alpha == 0 else jax.random.bernoulli(k_switch, cfg.switch_prob)
        mixed, lam = jnp.where(use_cut, cut, mixed), jnp.where(use_cut, cut_lam, lam)
    apply = jax.random.bernoulli(k_apply, cfg.mix_prob)
    x, lam = jnp.where(apply, mixed, x), jnp.where(apply, lam, 1.0).astype(jnp.float32)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    return x, lam * one_hot + (1.0 - lam) * one_hot[::-1], lam

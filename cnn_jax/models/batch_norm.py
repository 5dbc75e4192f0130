"""BatchNorm with PyTorch's defaults, and on CPU a formulation XLA:CPU runs faster.

`batch_norm(train, dtype, name)` is the one way models make a BatchNorm layer. On a CPU
in float32 it is `BatchNorm`: nn.BatchNorm's variables, names and numerics (its fast
variance, E[x^2] - E[x]^2), with the training-mode gradient written out and the
per-channel sums taken over rows 128 values wide. XLA:CPU lowers nn.BatchNorm's sums
over (N, H, W) at 16-64 channels to a loop over a 4-D window and its autodiff gradient
to more passes than needed: ResNet-20's train step (batch 128) took 255-270 ms with it
against 204-215 ms with this (results/benchmark/memory_batchnorm_cpu.md). Elsewhere, and in
bfloat16, it is nn.BatchNorm itself.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# PyTorch's BatchNorm defaults: momentum 0.1 there is 0.9 here; eps 1e-5.
MOMENTUM, EPSILON = 0.9, 1e-5
_ROW = 128  # Values per row of the channel sums: a multiple of the vector width.


def batch_norm(train: bool, dtype: Any, name: str | None = None) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults, in the formulation that runs fastest here."""
    cls = BatchNorm if cpu_batch_norm_wins(jax.default_backend(), dtype) else nn.BatchNorm
    kwargs = dict(momentum=MOMENTUM, epsilon=EPSILON, dtype=dtype, name=name)
    return cls(use_running_average=not train, **kwargs)


def cpu_batch_norm_wins(platform: str, dtype: Any) -> bool:
    """Whether `BatchNorm` replaces nn.BatchNorm: float32 on XLA:CPU."""
    return platform == 'cpu' and jnp.dtype(jnp.float32 if dtype is None else dtype) == jnp.float32


def channel_sum(x: jax.Array) -> jax.Array:
    """x summed over every axis but the last, as rows of about 128 values: k channel
    vectors side by side (k a power of 2 that divides the rows), then the k folded."""
    c = x.shape[-1]
    rows, k = x.size // c, 1
    while k * c < _ROW and rows % (2 * k) == 0:
        k *= 2
    return x.reshape(rows // k, k * c).sum(0).reshape(k, c).sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def normalize_batch(
    x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(y, batch mean, batch variance) of training-mode BatchNorm over the last axis."""
    return _normalize_fwd(x, scale, bias, epsilon)[0]


# Jitted (inlined by XLA) so that jaxprs name them: the tests see where they run.
@functools.partial(jax.jit, static_argnums=3)
def _normalize_fwd(x, scale, bias, epsilon):
    n = x.size // x.shape[-1]
    mean = channel_sum(x) / n
    var = jnp.maximum(0.0, channel_sum(x * x) / n - mean * mean)
    inv_std = lax.rsqrt(var + epsilon)
    y = (x - mean) * (inv_std * scale) + bias
    return (y, mean, var), (x, mean, inv_std, scale)


@functools.partial(jax.jit, static_argnums=0)
def _normalize_bwd(epsilon, residuals, cotangents):
    # The statistics feed only the running averages, outside the loss: their cotangents
    # are zero, and the gradient is y's alone.
    del epsilon
    x, mean, inv_std, scale = residuals
    dy = cotangents[0]
    n = x.size // x.shape[-1]
    x_hat = (x - mean) * inv_std
    dbias = channel_sum(dy)
    dscale = channel_sum(dy * x_hat)
    dx = (scale * inv_std) * (dy - dbias / n - x_hat * (dscale / n))
    return dx, dscale, dbias


normalize_batch.defvjp(_normalize_fwd, _normalize_bwd)


class BatchNorm(nn.BatchNorm):
    """nn.BatchNorm over the last axis, float32, with `normalize_batch` in training mode.

    Same variables ('scale', 'bias'; 'batch_stats': 'mean', 'var'), names (the class is
    called BatchNorm, so unnamed layers are BatchNorm_0, ...) and values up to float32
    rounding. Not for axis_name, masks or other feature axes: batch_norm() never asks.
    """

    @nn.compact
    def __call__(
        self, x: jax.Array, use_running_average: bool | None = None, *, mask: Any = None
    ) -> jax.Array:
        if mask is not None or self.axis_name is not None or self.axis != -1:
            raise NotImplementedError('cnn_jax BatchNorm: no mask, axis_name or other axis')
        if not (self.use_scale and self.use_bias):
            raise NotImplementedError('cnn_jax BatchNorm: always with scale and bias')
        eval_mode = nn.merge_param(
            'use_running_average', self.use_running_average, use_running_average
        )
        c = x.shape[-1]
        ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
        ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))
        scale = self.param('scale', self.scale_init, (c,), self.param_dtype)
        bias = self.param('bias', self.bias_init, (c,), self.param_dtype)
        if eval_mode:
            return (x - ra_mean.value) * (lax.rsqrt(ra_var.value + self.epsilon) * scale) + bias
        y, mean, var = normalize_batch(x, scale, bias, self.epsilon)
        if not self.is_initializing():
            ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
            ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
        return y

"""PyTorch's default initialisation of Conv2d and Linear layers, for any Flax model.

The reports behind EXPERIMENTS.md trained plain `nn.Conv2d`/`nn.Linear` layers in PyTorch,
whose default draws weights and biases from U(-1/sqrt(fan_in), 1/sqrt(fan_in))
(kaiming_uniform with a=sqrt(5)). Flax's default (lecun_normal weights, zero biases) has
three times that weight variance, which trains another network from the same recipe.
`config.init='torch'` re-draws every conv and dense layer this way; BatchNorm starts at
scale 1, bias 0 in both frameworks.
"""

from __future__ import annotations

import math
from typing import Any

import jax
from flax import traverse_util

INITS = ('module', 'torch')  # 'module': each layer's own initialiser (Flax's, torchvision's).


def torch_default_init(params: Any, rng: jax.Array) -> Any:
    """`params` with every layer that has a kernel (conv, dense) re-drawn as PyTorch does."""
    flat = traverse_util.flatten_dict(params)
    kernels = sorted(k for k, v in flat.items() if k[-1] == 'kernel' and v.ndim >= 2)
    for path, key in zip(kernels, jax.random.split(rng, max(1, len(kernels))), strict=False):
        kernel = flat[path]
        bound = 1.0 / math.sqrt(math.prod(kernel.shape[:-1]))  # fan_in: kh * kw * c_in, or in.
        k_w, k_b = jax.random.split(key)
        flat[path] = jax.random.uniform(k_w, kernel.shape, kernel.dtype, -bound, bound)
        bias = (*path[:-1], 'bias')
        if bias in flat:
            flat[bias] = jax.random.uniform(k_b, flat[bias].shape, flat[bias].dtype, -bound, bound)
    return traverse_util.unflatten_dict(flat)


def apply_init(variables: dict, init: str, rng: jax.Array) -> dict:
    """`variables` as config.init asks: unchanged for 'module', re-drawn for 'torch'."""
    if init == 'module':
        return variables
    return {**variables, 'params': torch_default_init(variables['params'], rng)}

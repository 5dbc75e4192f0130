"""Whether a model can take an input size, and the smallest square input it can take.

Pooling and strided or unpadded convolutions shrink the map; on an input too small the map
reaches zero pixels and the model fails deep inside Flax (a ZeroDivisionError in a dense
layer's initialiser) or, behind a global pooling, silently computes NaN. `check_input_size`
finds this up front with shapes only (jax.eval_shape) and says which size would do.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.errors import ConfigError
from cnn_jax.models import MODELS

MAX_SIDE = 1024  # Sizes searched for the smallest that fits.


def trace_init(model: nn.Module, batch_shape: Sequence[int], interceptor: Any) -> Any:
    """The shapes of `model`'s variables (jax.eval_shape of its init on zeros of
    `batch_shape`: nothing is computed), with `interceptor` around every module method."""

    def init() -> Any:
        rngs = {'params': jax.random.key(0), 'dropout': jax.random.key(1)}
        with nn.intercept_methods(interceptor):
            return model.init(rngs, jnp.zeros(batch_shape, jnp.float32), train=False)

    return jax.eval_shape(init)


def fits(model: nn.Module, input_shape: Sequence[int]) -> bool:
    """True if `model` initialises on one (H, W, C) image without an empty intermediate."""
    empty = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if any(0 in getattr(leaf, 'shape', (1,)) for leaf in jax.tree.leaves(out)):
            empty.append(context.module)
        return out

    try:
        trace_init(model, (1, *input_shape), record)
    except ConfigError:  # A bad option of the model: not a matter of size.
        raise
    except Exception:  # noqa: BLE001 - an empty map fails in many ways (ZeroDivisionError, ...)
        return False
    return not empty


def min_square_size(model: nn.Module, channels: int, start: int = 1) -> int | None:
    """The smallest side s >= start with `fits(model, (s, s, channels))`, or None up to
    MAX_SIDE. Assumes that a model that fits a size fits every larger one."""
    lo = hi = start
    while not fits(model, (hi, hi, channels)):
        if hi >= MAX_SIDE:
            return None
        lo, hi = hi + 1, min(2 * hi, MAX_SIDE)
    while lo < hi:  # hi fits, lo - 1 does not.
        mid = (lo + hi) // 2
        if fits(model, (mid, mid, channels)):
            hi = mid
        else:
            lo = mid + 1
    return hi


def model_name(model: nn.Module) -> str:
    """The name in MODELS that builds `model` (the most specific alias), else its class."""
    best, matched = type(model).__name__, -1
    for name, factory in MODELS.items():
        cls, fixed = factory, {}
        if isinstance(factory, functools.partial):
            cls, fixed = factory.func, factory.keywords
        same = cls is type(model) and all(getattr(model, k) == v for k, v in fixed.items())
        if same and len(fixed) > matched:
            best, matched = name, len(fixed)
    return best


def check_input_size(model: nn.Module, input_shape: Sequence[int]) -> None:
    """Raises ConfigError if `model` cannot take (H, W, C) `input_shape`, naming the
    smallest square size that it can take. Does nothing when no size would help (the
    model's own error then surfaces where it is used)."""
    h, w, c = input_shape[-3:]
    if fits(model, (h, w, c)):
        return
    size = min_square_size(model, c, start=max(h, w) + 1)
    if size is None:
        return
    raise ConfigError(
        f'model {model_name(model)!r} needs inputs of at least {size}x{size} pixels, but '
        f'gets {h}x{w}; resize them on the device with --config.image_size={size} (or larger)'
    )

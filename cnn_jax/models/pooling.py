"""Pooling modules (max, average, global average) and the max-pool formulations they pick.

reduce_window's gradient is select_and_scatter, which XLA:CPU runs as a slow loop, so
max pooling on 4-D input is written without it:
- non-overlapping windows: a reshape and a max (`_tiled_max`), on every platform;
- overlapping windows on the CPU: `window_max`, the maximum of the window's strided slices
  with the winning tap kept as int8 for the gradient, which is then padded slices;
- overlapping windows elsewhere: `_strided_max`, an elementwise maximum of the slices.
"""

import functools
import itertools
from collections.abc import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = str | int | Sequence[tuple[int, int]]
Pairs = tuple[tuple[int, int], tuple[int, int]]


class MaxPool(nn.Module):
    """Max pooling; padded positions hold -inf (as torch.nn.MaxPool2d)."""

    window: tuple[int, int] = (2, 2)
    strides: tuple[int, int] | None = None  # None: the window (non-overlapping).
    padding: Padding = 'VALID'

    def __call__(self, x: jax.Array) -> jax.Array:
        window, strides = tuple(self.window), tuple(self.strides or self.window)
        if window == strides and self.padding == 'VALID' and x.ndim == 4:
            return _tiled_max(x, *window)
        pads = _pad(self.padding)
        if x.ndim != 4:
            return nn.max_pool(x, window, strides, pads)
        if isinstance(pads, str):
            pads = lax.padtype_to_pads(x.shape[1:3], window, strides, pads)
        if window_max_wins(jax.default_backend()):
            return window_max(x, window, strides, pads)
        return _strided_max(x, window, strides, pads)


class AvgPool(nn.Module):
    """Average pooling; padded zeros count in the mean (torch's count_include_pad)."""

    window: tuple[int, int] = (2, 2)
    strides: tuple[int, int] | None = None
    padding: Padding = 'VALID'

    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.avg_pool(x, self.window, self.strides or self.window, _pad(self.padding))


class GlobalAvgPool(nn.Module):
    """Mean over the spatial axes: (N, H, W, C) -> (N, C)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jnp.mean(x, axis=(1, 2))


def _pad(padding: Padding) -> str | Sequence[tuple[int, int]]:
    # nn.max_pool takes 'SAME'/'VALID' or explicit pairs only; an int is torch's padding.
    if isinstance(padding, int):
        return ((padding, padding), (padding, padding))
    return padding


def _tiled_max(x: jax.Array, wh: int, ww: int) -> jax.Array:
    """Non-overlapping max pooling as a reshape and a max: the same values as reduce_window.

    XLA's CPU backend turns reduce_window's gradient (select_and_scatter) into a slow loop;
    a plain reduction trains faster there (2 CPU cores, python -m benchmarks, same run:
    cifar_cnn3 210 -> 310 img/s, VGG-16 at 64 px 6.9 -> 8.6, SimpleNN 3,015 -> 3,339). Ties
    share the gradient where select_and_scatter gives it to one position; after ReLU, ties
    are zeros, whose gradient ReLU stops anyway.
    """
    n, h, w, c = x.shape
    x = x[:, : h // wh * wh, : w // ww * ww]  # VALID drops the remainder rows and columns.
    return x.reshape(n, h // wh, wh, w // ww, ww, c).max(axis=(2, 4))


def _taps(
    x: jax.Array, window: tuple[int, int], strides: tuple[int, int], pads: Pairs
) -> Iterator[jax.Array]:
    """The -inf-padded input's strided slice under each window tap, taps in row-major order."""
    x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
    (wh, ww), (sh, sw) = window, strides
    oh, ow = (x.shape[1] - wh) // sh + 1, (x.shape[2] - ww) // sw + 1
    for i, j in itertools.product(range(wh), range(ww)):
        yield x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]


def _strided_max(
    x: jax.Array, window: tuple[int, int], strides: tuple[int, int], pads: Pairs
) -> jax.Array:
    """Overlapping max pooling as an elementwise maximum of the window's strided slices.

    Same values as reduce_window; its gradient is elementwise selects instead of XLA:CPU's
    slow select_and_scatter: ResNet's 3x3 stride-2 pool on a 32x32x64 map at batch 64,
    forward + backward 160 -> 28 ms. Ties share the gradient (zeros after ReLU, whose
    gradient ReLU stops anyway); -inf padding never wins a window that holds input.
    """
    return functools.reduce(jnp.maximum, _taps(x, window, strides, pads))


def window_max_wins(platform: str) -> bool:
    """Whether overlapping max pools run as `window_max`: on XLA:CPU, where autodiff of
    `_strided_max` fuses the forward's selects into one slow gradient loop (ResNet-18's
    stem pool: 55 ms of a 385 ms step). Other platforms keep `_strided_max` unchanged."""
    return platform == 'cpu'


def window_max(
    x: jax.Array, window: tuple[int, int], strides: tuple[int, int], pads: Pairs
) -> jax.Array:
    """Max pooling over NHWC `x` (-inf padding), whose gradient goes to the first maximum of
    each window in row-major order, as reduce_window's (select_and_scatter) and torch's do.

    The forward keeps the winning tap per output (int8); the backward pads each tap's
    share of the output gradient back to the input's positions (a strided, interior-padded
    `lax.pad`) and sums the taps. A NaN wins its window, and its value propagates.
    """
    pads = tuple(tuple(p) for p in pads)
    return _window_max(x, tuple(window), tuple(strides), pads, x.shape[1:3])


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _window_max(x, window, strides, pads, hw):
    return _window_max_fwd(x, window, strides, pads, hw)[0]


def _window_max_fwd(
    x: jax.Array, window: tuple[int, int], strides: tuple[int, int], pads: Pairs, hw: tuple
) -> tuple[jax.Array, jax.Array]:
    taps = _taps(x, window, strides, pads)
    out = next(taps)
    index = jnp.int8 if window[0] * window[1] <= 127 else jnp.int32
    winner = jnp.zeros(out.shape, index)
    for k, part in enumerate(taps, start=1):
        # Strictly greater: an equal later tap does not take the window (first maximum).
        take = (part > out) | jnp.isnan(part)
        out, winner = jnp.where(take, part, out), jnp.where(take, index(k), winner)
    return out, winner


# Jitted (inlined by XLA) so that jaxprs name it: the tests see where it runs.
@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _window_max_bwd(
    window: tuple[int, int],
    strides: tuple[int, int],
    pads: Pairs,
    hw: tuple[int, int],
    winner: jax.Array,
    g: jax.Array,
) -> tuple[jax.Array]:
    (h, w), (wh, ww), (sh, sw), (oh, ow) = hw, window, strides, winner.shape[1:3]
    hp, wp = h + sum(pads[0]), w + sum(pads[1])
    zero = jnp.zeros((), g.dtype)
    dx = None
    for k, (i, j) in enumerate(itertools.product(range(wh), range(ww))):
        # Tap (i, j) of output (p, q) read padded input (i + sh * p, j + sw * q).
        config = (
            (0, 0, 0),
            (i, hp - i - sh * (oh - 1) - 1, sh - 1),
            (j, wp - j - sw * (ow - 1) - 1, sw - 1),
            (0, 0, 0),
        )
        part = lax.pad(jnp.where(winner == k, g, zero), zero, config)
        dx = part if dx is None else dx + part
    (top, _), (left, _) = pads
    return (dx[:, top : top + h, left : left + w],)


_window_max.defvjp(_window_max_fwd, _window_max_bwd)

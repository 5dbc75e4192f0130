"""Pieces shared by every model: activation by name, the norm option, dropout, flatten and
the convolution formulations `FastConv` picks per platform (pooling: cnn_jax.models.pooling).

Parameter-free operations (activations, pooling, flatten) are small modules rather than
bare functions so that `cnn_jax.summary.layer_table` sees them as rows, the way
torchsummary lists ReLU and MaxPool2d. They own no variables, so they never change a
model's parameter tree.
"""

import functools
import itertools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap

from cnn_jax.errors import ConfigError
from cnn_jax.models.batch_norm import batch_norm
from cnn_jax.models.onednn_conv import onednn_conv, onednn_conv_wins


def relu_for(platform: str) -> Callable[[jax.Array], jax.Array]:
    """ReLU in the formulation that runs fastest on `platform` (same values and gradients).

    On XLA:CPU, x * (x > 0) trains ResNet-20 (batch 128) in 0.68x the CPU time per step of
    nn.relu (918 against 1,359 ms, one process, interleaved, under load; see
    results/benchmark/profile_resnet20_cpu.md); elsewhere nn.relu is unchanged.
    """
    return _mask_relu if platform == 'cpu' else nn.relu


def _mask_relu(x: jax.Array) -> jax.Array:
    # The mask has no gradient, so d/dx = mask: nn.relu's gradient (0 at x = 0 too).
    return x * (x > 0).astype(x.dtype)


def relu(x: jax.Array) -> jax.Array:
    """ReLU, formulated for the default backend at trace time (see relu_for)."""
    return relu_for(jax.default_backend())(x)


# name -> (function, display name in the layer table).
ACTIVATIONS: dict[str, tuple[Callable[[jax.Array], jax.Array], str]] = {
    'identity': (lambda x: x, 'Identity'),
    'relu': (relu, 'ReLU'),
    'tanh': (jnp.tanh, 'Tanh'),
    'sigmoid': (nn.sigmoid, 'Sigmoid'),
    'swish': (nn.swish, 'SiLU'),
    # torch.nn.LeakyReLU's default slope, torch.nn.GELU's default (erf) form.
    'leaky_relu': (functools.partial(nn.leaky_relu, negative_slope=0.01), 'LeakyReLU'),
    'gelu': (functools.partial(nn.gelu, approximate=False), 'GELU'),
}

# 'dropout' is Dropout2d (whole channels) after a conv and plain Dropout after a dense
# layer; 'batchnorm_dropout' is BN followed by that dropout (E11).
NORMS = ('none', 'batchnorm', 'dropout', 'batchnorm_dropout')


class Activation(nn.Module):
    """An activation function chosen by name (see ACTIVATIONS)."""

    fn: str = 'relu'

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.fn not in ACTIVATIONS:
            known = ', '.join(ACTIVATIONS)
            raise ConfigError(f'unknown activation {self.fn!r}; known activations: {known}')
        return ACTIVATIONS[self.fn][0](x)


def tap_conv_wins(platform: str, kernel_shape: Sequence[int]) -> bool:
    """Whether `tap_conv` beats lax for this HWIO kernel: XLA:CPU's 5x5+ first layers only,
    where Eigen builds patches element by element for a GEMM of few columns. CPU ms, conv +
    ReLU + pool, forward + weight gradient (`python -m benchmarks.profile_step --first-convs`,
    results/benchmark/simplenn_cpu.md): 5x5 3->8 9.9 -> 8.0, 5x5 1->8 5.2 -> 2.3; SimpleNN's
    step 0.76x. Lost at 5x5 3->32 (1.26x); ResNet-20's 3x3 3->16 stem won alone (0.66x) but
    not in its step (1.02x, 1.04x), so 3x3 kernels keep lax.
    """
    kh, kw, cin, cout = kernel_shape
    return platform == 'cpu' and cin <= 3 and kh * kw >= 25 and kh * kw * cin * cout <= 1024


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def tap_conv(x: jax.Array, w: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
    """NHWC x HWIO convolution as one fused float32 sum of shifted slices times kernel rows;
    lax's gradients. The conditional keeps the sum's result: XLA:CPU would fuse the sum into
    each consumer, recomputing it in ReLU's and pooling's gradients (SimpleNN's step 3.7x
    slower). A non-finite kernel runs lax (NaN and inf propagate as there), and so does
    vmap (a sweep's variants), under which the conditional would run both branches.
    """
    sums, convs = (functools.partial(f, strides=strides, pads=pads) for f in (_tap_sum, _lax))
    conv = custom_vmap(lambda x, w: lax.cond(jnp.isfinite(w).all(), sums, convs, x, w))
    conv.def_vmap(lambda _, bat, *a: (jax.vmap(convs, [0 if b else None for b in bat])(*a), True))
    return conv(x, w)


def _shifted(x: jax.Array, kh: int, kw: int, strides: Sequence[int], pads: Any):
    """(i, j, the padded input's slice that kernel tap (i, j) multiplies)."""
    x, (sh, sw) = jnp.pad(x, ((0, 0), *map(tuple, pads), (0, 0))), strides
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    for i, j in itertools.product(range(kh), range(kw)):
        yield i, j, x[:, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]


def _tap_sum(x: jax.Array, w: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
    out, f32 = jnp.zeros((), jnp.float32), jnp.float32
    for i, j, part in _shifted(x.astype(f32), *w.shape[:2], strides, pads):
        for c in range(w.shape[2]):
            out = out + part[..., c : c + 1] * w[i, j, c].astype(f32)
    return out.astype(x.dtype)


def _lax(x: jax.Array, w: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def canonical_conv_wins(platform: str) -> bool:
    """Whether `canonical_conv` replaces lax: on XLA:CPU, the only backend with Eigen's
    canonical form; elsewhere lax is unchanged."""
    return platform == 'cpu'


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def canonical_conv(x: jax.Array, w: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
    """lax's NHWC x HWIO convolution whose two gradients are NHWC x HWIO convolutions too.

    XLA:CPU runs a convolution through Eigen only in that canonical form, and puts other
    forms into it (by transposes) in the program's top level only. lax's gradients are
    other forms, so inside a loop (`lax.scan`: gradient accumulation) they ran as naive
    loops: E10's CNN, 4 micro-batches of 16, 0.25 steps/s against 6.2 for one batch of 64.
    Here the transposes are explicit, so every convolution is canonical wherever it runs
    (6.8 steps/s); at the top level they are the ones XLA would make.
    """
    return _lax(x, w, strides, pads)


def _canonical_grads(strides: tuple, pads: tuple, res: tuple, g: jax.Array) -> tuple:
    """lax's transpose rules applied to convolutions laid out so that their transposes are
    canonical: for the input, the kernel as HWOI; for the kernel, the input as CHWN (C
    the batch), the kernel as IHWO and the output as HWNO (N the input features)."""
    x, w = res
    w_hwoi = w.transpose(0, 1, 3, 2)
    (dx,) = jax.vjp(
        lambda x: lax.conv_general_dilated(
            x, w_hwoi, strides, pads, dimension_numbers=('NHWC', 'HWOI', 'NHWC')
        ),
        x,
    )[1](g)
    x_chwn = x.transpose(3, 1, 2, 0)
    layout = lax.ConvDimensionNumbers((3, 0, 1, 2), (3, 0, 1, 2), (2, 3, 0, 1))
    (dw_ihwo,) = jax.vjp(
        lambda w: lax.conv_general_dilated(x_chwn, w, strides, pads, dimension_numbers=layout),
        w.transpose(2, 0, 1, 3),
    )[1](g.transpose(1, 2, 0, 3))
    return dx, dw_ihwo.transpose(1, 2, 0, 3)


canonical_conv.defvjp(lambda x, w, s, p: (canonical_conv(x, w, s, p), (x, w)), _canonical_grads)
tap_conv.defvjp(lambda x, w, s, p: (tap_conv(x, w, s, p), (x, w)), _canonical_grads)


class FastConv:
    """`lax.conv_general_dilated` in the formulation that XLA:CPU runs fastest.

    For nn.Conv's `conv_general_dilated_cls`: parameters and results are nn.Conv's.
    - On maps of at most 2x2 pixels, a matrix product: XLA:CPU runs a 3x3 convolution
      over a 2x2 map with 512 channels (ResNet-18's last stage at 64x64 input, VGG's last
      block at 32x32) in 1.1 s at batch 64, 40x its time on a 3x3 map (and oneDNN's
      ResNet-18 step is slower than with the product).
    - On CPU, oneDNN's convolution where `onednn_conv_wins` (float32, the optional oneDNN
      wheels installed): SimpleNN's first layer too, where it beats `tap_conv`.
    - Else where `tap_conv_wins` (first layers on CPU), `tap_conv`.
    - Otherwise on CPU `canonical_conv`; elsewhere lax.
    NHWC without dilation or groups only; anything else goes to lax unchanged.
    """

    def __call__(
        self,
        lhs: jax.Array,
        rhs: jax.Array,
        window_strides: Sequence[int],
        padding: Any,
        lhs_dilation: Sequence[int] | None = None,
        rhs_dilation: Sequence[int] | None = None,
        dimension_numbers: Any = None,
        feature_group_count: int = 1,
        precision: Any = None,
        **kwargs: Any,
    ) -> jax.Array:
        nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
        plain = lhs.ndim == 4 and dimension_numbers == nhwc and feature_group_count == 1
        dilated = [d for d in (lhs_dilation, rhs_dilation) if d is not None and tuple(d) != (1, 1)]
        plain = plain and not kwargs and not dilated
        strides, (kh, kw, _, cout) = tuple(window_strides), rhs.shape
        if plain and isinstance(padding, str):
            padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), strides, padding)
        if plain and max(lhs.shape[1:3]) <= 2 and strides == (1, 1):
            cols = jnp.concatenate([p for _, _, p in _shifted(lhs, kh, kw, strides, padding)], -1)
            return jnp.dot(cols, rhs.reshape(-1, cout), precision=precision)
        pads, platform = (tuple(map(tuple, padding)) if plain else ()), jax.default_backend()
        onednn = plain and min(min(pads)) >= 0 and lhs.dtype == rhs.dtype
        if onednn and onednn_conv_wins(platform, lhs.dtype):
            return onednn_conv(lhs, rhs, strides, pads)
        if plain and tap_conv_wins(platform, rhs.shape):
            return tap_conv(lhs, rhs, strides, pads)
        if plain and canonical_conv_wins(platform):
            return canonical_conv(lhs, rhs, strides, pads)
        args = (lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count)
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, *args, precision=precision, **kwargs
        )


class Flatten(nn.Module):
    """(N, ...) -> (N, prod(...)), in NHWC order."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return x.reshape((x.shape[0], -1))


def dropout(x: jax.Array, rate: float, *, train: bool, spatial: bool = False) -> jax.Array:
    """Dropout; `spatial` on NHWC input drops whole channels (torch's Dropout2d)."""
    # Made even at rate 0 (a no-op then) so the layer table shows the architecture.
    dims = (1, 2) if spatial and x.ndim == 4 else ()
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f'dropout rate must be in [0, 1), got {rate}')
    return nn.Dropout(rate, broadcast_dims=dims, deterministic=not train)(x)


def normalize(x: jax.Array, norm: str, *, train: bool, rate: float, dtype: Any) -> jax.Array:
    """The norm option after a conv (4-D input) or a dense layer (2-D input).

    Call inside a compact method: the layers it makes belong to the calling module.
    """
    if norm not in NORMS:
        raise ConfigError(f'unknown norm {norm!r}; known norms: {", ".join(NORMS)}')
    if norm in ('batchnorm', 'batchnorm_dropout'):
        x = batch_norm(train, dtype)(x)
    if norm in ('dropout', 'batchnorm_dropout'):
        x = dropout(x, rate, train=train, spatial=True)
    return x

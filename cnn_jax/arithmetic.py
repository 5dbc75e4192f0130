"""Convolution arithmetic (E9): output sizes, padding and parameter counts, with which
cnn_jax.summary checks the models. The rest of E9 (pool sizes with ceil_mode, kernel sizes,
a true 2D convolution, softmax) is used by nothing in the library: tests/conv_arithmetic.py.

Sizes are per spatial axis: W input, F kernel (window), S stride, P padding per side.
O = floor((W + 2P - F_eff) / S) + 1 with F_eff = D (F - 1) + 1 for dilation D; this is
torch's and flax's rule for explicit padding. Padding may be an int (both sides), a
(before, after) pair, or 'valid' / 'same' (TensorFlow / flax semantics).
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

PaddingArg = int | tuple[int, int] | str


class LayerParams(NamedTuple):
    """A layer's parameter count: trainable parameters and non-trainable state."""

    trainable: int
    non_trainable: int = 0

    @property
    def total(self) -> int:
        return self.trainable + self.non_trainable


def effective_kernel(kernel_size: int, dilation: int) -> int:
    return dilation * (kernel_size - 1) + 1


def check_positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ValueError(f'{name} must be >= 1, got {v}')


def same_padding_pair(
    input_size: int, kernel_size: int, stride: int = 1, dilation: int = 1
) -> tuple[int, int]:
    """The (before, after) padding of 'same' (flax/TF): O = ceil(W / S).

    The total goes mostly after when it is odd, as flax and TensorFlow put it.
    """
    check_positive(input_size=input_size, kernel_size=kernel_size, stride=stride, dilation=dilation)
    out = -(-input_size // stride)
    total = max((out - 1) * stride + effective_kernel(kernel_size, dilation) - input_size, 0)
    return total // 2, total - total // 2


def padding_pair(
    padding: PaddingArg, input_size: int, kernel_size: int, stride: int, dilation: int
) -> tuple[int, int]:
    """The (before, after) padding of one axis."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == 'valid':
            return 0, 0
        if mode == 'same':
            return same_padding_pair(input_size, kernel_size, stride, dilation)
        raise ValueError(f"padding must be an int, a pair, 'valid' or 'same', got {padding!r}")
    if isinstance(padding, int):
        return padding, padding
    lo, hi = padding
    return int(lo), int(hi)


def conv_output_size(
    input_size: int,
    kernel_size: int,
    stride: int = 1,
    padding: PaddingArg = 0,
    dilation: int = 1,
) -> int:
    """O = floor((W + P_before + P_after - F_eff) / S) + 1, the size of a conv's output."""
    check_positive(input_size=input_size, kernel_size=kernel_size, stride=stride, dilation=dilation)
    lo, hi = padding_pair(padding, input_size, kernel_size, stride, dilation)
    span = input_size + lo + hi - effective_kernel(kernel_size, dilation)
    if span < 0:
        raise ValueError(
            f'kernel {kernel_size} (dilation {dilation}) is larger than the padded input '
            f'{input_size} + {lo} + {hi}'
        )
    return span // stride + 1


def conv_params(
    kernel_size: int | Sequence[int],
    in_channels: int,
    out_channels: int,
    use_bias: bool = True,
    groups: int = 1,
) -> int:
    """Parameters of a conv: prod(F) * (C_in / groups) * C_out weights + C_out biases."""
    ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
    if in_channels % groups or out_channels % groups:
        raise ValueError(f'groups {groups} must divide {in_channels} and {out_channels}')
    return math.prod(ks) * (in_channels // groups) * out_channels + (
        out_channels if use_bias else 0
    )


def dense_params(in_features: int, out_features: int, use_bias: bool = True) -> int:
    """Parameters of a dense layer: in * out weights + out biases."""
    return in_features * out_features + (out_features if use_bias else 0)


def batchnorm_params(channels: int, use_scale: bool = True, use_bias: bool = True) -> LayerParams:
    """BN: scale and shift are trainable; running mean and variance are state.

    PyTorch's num_batches_tracked counter is not counted (it is bookkeeping, not a tensor
    of the layer's width).
    """
    trainable = channels * (int(use_scale) + int(use_bias))
    return LayerParams(trainable, 2 * channels)

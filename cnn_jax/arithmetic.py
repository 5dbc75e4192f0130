"""Convolution arithmetic (E9): output sizes, padding, kernel sizes, parameter counts and
a true 2D convolution, for teaching and for checking the models.

Sizes are per spatial axis: W input, F kernel (window), S stride, P padding per side.
O = floor((W + 2P - F_eff) / S) + 1 with F_eff = D (F - 1) + 1 for dilation D; this is
torch's and flax's rule for explicit padding. Padding may be an int (both sides), a
(before, after) pair, or 'valid' / 'same' (TensorFlow / flax semantics).
"""

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

PaddingArg = int | tuple[int, int] | str


class LayerParams(NamedTuple):
    """A layer's parameter count: trainable parameters and non-trainable state."""

    trainable: int
    non_trainable: int = 0

    @property
    def total(self) -> int:
        return self.trainable + self.non_trainable


def _effective_kernel(kernel_size: int, dilation: int) -> int:
    return dilation * (kernel_size - 1) + 1


def _positive(**values: int) -> None:
    for name, v in values.items():
        if v < 1:
            raise ValueError(f'{name} must be >= 1, got {v}')


def same_padding_pair(
    input_size: int, kernel_size: int, stride: int = 1, dilation: int = 1
) -> tuple[int, int]:
    """The (before, after) padding of 'same' (flax/TF): O = ceil(W / S).

    The total goes mostly after when it is odd, as flax and TensorFlow put it.
    """
    _positive(input_size=input_size, kernel_size=kernel_size, stride=stride, dilation=dilation)
    out = -(-input_size // stride)
    total = max((out - 1) * stride + _effective_kernel(kernel_size, dilation) - input_size, 0)
    return total // 2, total - total // 2


def _pads(
    padding: PaddingArg,
    input_size: int,
    kernel_size: int,
    stride: int,
    dilation: int,
    full: bool = False,
) -> tuple[int, int]:
    """(before, after) padding of one axis; 'full' (every overlap) only where `full` says."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == 'valid':
            return 0, 0
        if mode == 'same':
            return same_padding_pair(input_size, kernel_size, stride, dilation)
        if mode == 'full' and full:
            return kernel_size - 1, kernel_size - 1
        allowed = "'valid', 'same' or 'full'" if full else "'valid' or 'same'"
        raise ValueError(f'padding must be an int, a pair, {allowed}, got {padding!r}')
    if isinstance(padding, int):
        return padding, padding
    lo, hi = padding
    return int(lo), int(hi)


def conv_output_size(
    input_size: int, kernel_size: int, stride: int = 1, padding: PaddingArg = 0, dilation: int = 1
) -> int:
    """O = floor((W + P_before + P_after - F_eff) / S) + 1, the size of a conv's output."""
    _positive(input_size=input_size, kernel_size=kernel_size, stride=stride, dilation=dilation)
    lo, hi = _pads(padding, input_size, kernel_size, stride, dilation)
    span = input_size + lo + hi - _effective_kernel(kernel_size, dilation)
    if span < 0:
        raise ValueError(
            f'kernel {kernel_size} (dilation {dilation}) is larger than the padded input '
            f'{input_size} + {lo} + {hi}'
        )
    return span // stride + 1


def pool_output_size(
    input_size: int,
    window: int,
    stride: int | None = None,
    padding: PaddingArg = 0,
    ceil_mode: bool = False,
) -> int:
    """Output size of a max/avg pool; stride defaults to the window (torch's default).

    ceil_mode rounds up as torch's ceil_mode=True does, where the last window must start
    inside the input or its left padding.
    """
    stride = window if stride is None else stride
    if not ceil_mode:
        return conv_output_size(input_size, window, stride, padding)
    _positive(input_size=input_size, window=window, stride=stride)
    lo, hi = _pads(padding, input_size, window, stride, 1)
    out = -(-(input_size + lo + hi - window) // stride) + 1
    if (out - 1) * stride >= input_size + lo:
        out -= 1
    return out


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    """The padding P per side that keeps a stride-1 conv's size: P = (F_eff - 1) / 2.

    An even effective kernel has no symmetric answer; use same_padding_pair.
    """
    _positive(kernel_size=kernel_size, dilation=dilation)
    f = _effective_kernel(kernel_size, dilation)
    if f % 2 == 0:
        raise ValueError(
            f'an even kernel ({f}) cannot keep the size with equal padding on both sides; '
            'use same_padding_pair for (before, after)'
        )
    return (f - 1) // 2


def kernel_size_for(input_size: int, output_size: int, stride: int = 1, padding: int = 0) -> int:
    """The kernel size F that explains an observed output: F = W + 2P - S (O - 1).

    With stride S > 1 flooring lets S - 1 smaller kernels give the same output too; this is
    the one for which the formula divides exactly (the largest).
    """
    _positive(input_size=input_size, output_size=output_size, stride=stride)
    f = input_size + 2 * padding - stride * (output_size - 1)
    if f < 1:
        raise ValueError(
            f'no kernel maps size {input_size} (padding {padding}, stride {stride}) '
            f'to {output_size}'
        )
    return f


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
    return LayerParams(channels * (int(use_scale) + int(use_bias)), 2 * channels)


def conv2d(
    image: np.ndarray,
    kernel: np.ndarray,
    padding: PaddingArg | Sequence[tuple[int, int]] = 'same',
    stride: int = 1,
) -> np.ndarray:
    """A true 2D convolution of one channel: the kernel is flipped, padding is zeros.

    out[i, j] = sum_{a, b} kernel[a, b] * x_pad[i*S + (Fh-1) - a, j*S + (Fw-1) - b].
    padding 'same' pads ((F-1)//2, F//2) per axis, which reproduces
    scipy.ndimage.convolve(image, kernel, mode='constant') for odd and even kernels;
    'full' pads F-1 per side (the whole convolution), 'valid' none. Integer inputs give
    exact integer outputs.
    """
    image = np.asarray(image)
    kernel = np.asarray(kernel)
    if image.ndim != 2 or kernel.ndim != 2:
        raise ValueError(f'conv2d takes 2-D image and kernel, got {image.shape}, {kernel.shape}')
    if isinstance(padding, str | int):
        pads = [_pads(padding, image.shape[a], kernel.shape[a], 1, 1, full=True) for a in range(2)]
    else:
        pads = [(int(lo), int(hi)) for lo, hi in padding]
    x = np.pad(image, pads, mode='constant')
    fh, fw = kernel.shape
    oh = (x.shape[0] - fh) // stride + 1
    ow = (x.shape[1] - fw) // stride + 1
    if oh < 1 or ow < 1:
        raise ValueError(f'kernel {kernel.shape} is larger than the padded image {x.shape}')
    flipped = kernel[::-1, ::-1]
    out = np.zeros((oh, ow), dtype=np.result_type(image, kernel))
    # One shifted, strided view of the image per kernel tap: F_h * F_w vector operations.
    for a in range(fh):
        for b in range(fw):
            window = x[
                a : a + stride * (oh - 1) + 1 : stride, b : b + stride * (ow - 1) + 1 : stride
            ]
            out += flipped[a, b] * window
    return out


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax computed after subtracting the maximum, which it is invariant to."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - np.max(z, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)

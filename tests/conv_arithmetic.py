"""The teaching half of E9's convolution arithmetic, which nothing in cnn_jax uses: pool
output sizes (torch's ceil_mode), the symmetric 'same' padding, the kernel size behind an
observed output, a true 2D convolution and a stable softmax. The formulas the library
checks its models with (conv output sizes, parameter counts) are cnn_jax.arithmetic's.
"""

from collections.abc import Sequence

import numpy as np

from cnn_jax import arithmetic


def pool_output_size(
    input_size: int,
    window: int,
    stride: int | None = None,
    padding: arithmetic.PaddingArg = 0,
    ceil_mode: bool = False,
) -> int:
    """Output size of a max/avg pool; stride defaults to the window (torch's default).

    ceil_mode rounds up as torch's ceil_mode=True does, where the last window must start
    inside the input or its left padding.
    """
    stride = window if stride is None else stride
    if not ceil_mode:
        return arithmetic.conv_output_size(input_size, window, stride, padding)
    arithmetic.check_positive(input_size=input_size, window=window, stride=stride)
    lo, hi = arithmetic.padding_pair(padding, input_size, window, stride, 1)
    out = -(-(input_size + lo + hi - window) // stride) + 1
    if (out - 1) * stride >= input_size + lo:
        out -= 1
    return out


def same_padding(kernel_size: int, dilation: int = 1) -> int:
    """The padding P per side that keeps a stride-1 conv's size: P = (F_eff - 1) / 2.

    An even effective kernel has no symmetric answer; use same_padding_pair.
    """
    arithmetic.check_positive(kernel_size=kernel_size, dilation=dilation)
    f = arithmetic.effective_kernel(kernel_size, dilation)
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
    arithmetic.check_positive(input_size=input_size, output_size=output_size, stride=stride)
    f = input_size + 2 * padding - stride * (output_size - 1)
    if f < 1:
        raise ValueError(
            f'no kernel maps size {input_size} (padding {padding}, stride {stride}) '
            f'to {output_size}'
        )
    return f


def conv2d(
    image: np.ndarray,
    kernel: np.ndarray,
    padding: arithmetic.PaddingArg | Sequence[tuple[int, int]] = 'same',
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
    if isinstance(padding, str) and padding.lower() == 'full':
        pads = [(k - 1, k - 1) for k in kernel.shape]
    elif isinstance(padding, str | int):
        pads = [
            arithmetic.padding_pair(padding, image.shape[a], kernel.shape[a], 1, 1)
            for a in range(2)
        ]
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
    z = z - np.max(z, axis=axis, keepdims=True)
    e = np.exp(z)
    return e / np.sum(e, axis=axis, keepdims=True)

"""ResNets: torchvision's ImageNet layout (ResNet-18/34/50, E2/E5/E12) and the CIFAR one
of He et al. (2016), section 4.2 (ResNet-20/32/44/56/110, E8).

Names follow torchvision so that its weights import one to one (see notes/CONTRACTS.md):
stem `conv1`, `bn1`; blocks `layer{i}_{j}` holding `conv1, bn1, conv2, bn2[, conv3, bn3]`
and the projection `downsample_conv`, `downsample_bn`; head `fc`. Paddings are explicit
and torch's: flax's 'SAME' pads a stride-2 conv on an even input by (0, 1) where torch
pads (1, 1), which would shift every feature map by one pixel against imported weights.
"""

import functools
from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.errors import ConfigError
from cnn_jax.models.batch_norm import batch_norm
from cnn_jax.models.layers import Activation, FastConv
from cnn_jax.models.pooling import GlobalAvgPool, MaxPool

# torchvision initialises convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _pad(p: int) -> tuple[tuple[int, int], tuple[int, int]]:
    return ((p, p), (p, p))


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    """A bias-free conv with torch's symmetric padding kernel // 2."""
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=_pad(kernel // 2),
        use_bias=False,
        kernel_init=_conv_init,
        dtype=dtype,
        name=name,
        conv_general_dilated_cls=FastConv,
    )


class BasicBlock(nn.Module):
    """Two 3x3 convs + BN; the first carries the stride (torchvision BasicBlock).

    conv{i} + bn{i} per entry of `convs()`, ReLU between them, then ReLU of the sum with
    the shortcut: identity, or where the shape changes a strided 1x1 conv + BN projection.
    """

    features: int
    strides: int = 1
    dtype: Any = jnp.float32

    expansion: ClassVar[int] = 1

    def convs(self) -> tuple[tuple[int, int, int], ...]:
        """(features, kernel, stride) of conv1, conv2, ..."""
        return (self.features, 3, self.strides), (self.features, 3, 1)

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = x
        for i, (features, kernel, stride) in enumerate(self.convs(), 1):
            if i > 1:
                y = Activation('relu')(y)
            y = _conv(features, kernel, stride, self.dtype, f'conv{i}')(y)
            y = batch_norm(train, self.dtype, f'bn{i}')(y)
        if x.shape != y.shape:
            x = _conv(y.shape[-1], 1, self.strides, self.dtype, 'downsample_conv')(x)
            x = batch_norm(train, self.dtype, 'downsample_bn')(x)
        return Activation('relu')(y + x)


class Bottleneck(BasicBlock):
    """1x1 reduce, 3x3 (with the stride: torchvision v1.5), 1x1 expand by 4; BN after each."""

    expansion: ClassVar[int] = 4

    def convs(self) -> tuple[tuple[int, int, int], ...]:
        f = self.features
        return (f, 1, 1), (f, 3, self.strides), (f * self.expansion, 1, 1)


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    'basic': BasicBlock,
    'bottleneck': Bottleneck,
}
LAYOUTS = ('imagenet', 'cifar')


class ResNet(nn.Module):
    """A ResNet of `block`s, `stage_sizes[i]` of them in stage i+1.

    layout 'imagenet': 7x7/2 conv (pad 3) + BN + ReLU + 3x3/2 max-pool (pad 1), stages of
    width 64, 128, 256, 512. layout 'cifar': 3x3 conv (pad 1) + BN + ReLU, no pooling,
    stages of width 16, 32, 64. Every stage after the first halves the map. `width`
    overrides the first stage's width (the others double it).
    """

    num_classes: int
    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    block: str = 'basic'
    layout: str = 'imagenet'
    width: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, features_only: bool = False) -> jax.Array:
        if self.block not in BLOCKS:
            raise ConfigError(f'unknown block {self.block!r}; known blocks: {", ".join(BLOCKS)}')
        if self.layout not in LAYOUTS:
            raise ConfigError(
                f'unknown layout {self.layout!r}; known layouts: {", ".join(LAYOUTS)}'
            )
        block_cls = BLOCKS[self.block]
        imagenet = self.layout == 'imagenet'
        width = self.width or (64 if imagenet else 16)

        x = x.astype(self.dtype)
        x = _conv(width, 7 if imagenet else 3, 2 if imagenet else 1, self.dtype, 'conv1')(x)
        x = batch_norm(train, self.dtype, 'bn1')(x)
        x = Activation('relu')(x)
        if imagenet:
            x = MaxPool((3, 3), (2, 2), padding=1, name='maxpool')(x)
        for i, num_blocks in enumerate(self.stage_sizes):
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                name = f'layer{i + 1}_{j}'
                block = block_cls(
                    features=width * 2**i, strides=stride, dtype=self.dtype, name=name
                )
                x = block(x, train=train)
        x = GlobalAvgPool(name='avgpool')(x)
        if not features_only:
            x = nn.Dense(self.num_classes, dtype=self.dtype, name='fc')(x)
        return x.astype(jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block='basic')
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block='basic')
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block='bottleneck')


def cifar_resnet(depth: int) -> functools.partial:
    """ResNet-`depth` of He et al. for CIFAR: depth = 6n + 2, n BasicBlocks per stage."""
    if (depth - 2) % 6:
        raise ConfigError(f'CIFAR ResNet depth must be 6n + 2 (20, 32, 44, ...), got {depth}')
    n = (depth - 2) // 6
    return functools.partial(ResNet, stage_sizes=(n, n, n), block='basic', layout='cifar')


ResNet20 = cifar_resnet(20)
ResNet32 = cifar_resnet(32)
ResNet44 = cifar_resnet(44)
ResNet56 = cifar_resnet(56)
ResNet110 = cifar_resnet(110)

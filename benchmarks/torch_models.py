"""PyTorch twins of cnn_jax's models: the benchmark's other side, and the tests' reference.

`twin(module, input_shape, num_classes)` builds the torch.nn network of a Flax module of
cnn_jax.models from the module's fields (BlockCNN, SmallCNN, VGG, CifarCNN6, ResNet): the
same layers and parameter count (tests/test_benchmark.py checks), on NCHW input.

`ResNet` follows torchvision's definition (torchvision/models/resnet.py) and its state_dict
names (conv1, bn1, layer1.0.conv1, ..., layer2.0.downsample.0/1, fc), so a torchvision
state_dict loads into it as it is: tests/torch_reference.py runs it as the torch side of
the checks of the weight import (cnn_jax.transfer.weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from flax import linen
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    'relu': nn.ReLU,
    'tanh': nn.Tanh,
    'sigmoid': nn.Sigmoid,
    'swish': nn.SiLU,
    'leaky_relu': nn.LeakyReLU,
    'identity': nn.Identity,
    'gelu': nn.GELU,
}


# --- ResNet: torchvision's definition and names -----------------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs; the stride on the first (torchvision.models.resnet.BasicBlock)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = _downsample(inplanes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.downsample(x))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 with the stride (ResNet v1.5, as torchvision), 1x1 expand by 4."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.downsample = _downsample(inplanes, out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + self.downsample(x))


def _downsample(inplanes: int, out: int, stride: int) -> nn.Module:
    """The shortcut: identity, or a strided 1x1 conv + BN where the shape changes."""
    if stride == 1 and inplanes == out:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False), nn.BatchNorm2d(out))


BLOCKS: dict[str, type[BasicBlock] | type[Bottleneck]] = {
    'basic': BasicBlock,
    'bottleneck': Bottleneck,
}


class ResNet(nn.Module):
    """torchvision's ResNet; layout 'cifar' is He et al.'s CIFAR stem (3x3 conv, no pool).

    Stage i has `stage_sizes[i]` blocks of width `width * 2**i` (default width 64 for
    'imagenet', 16 for 'cifar'); every stage after the first halves the map.
    """

    def __init__(
        self,
        block: str,
        stage_sizes: Sequence[int],
        num_classes: int,
        *,
        layout: str = 'imagenet',
        width: int | None = None,
        in_channels: int = 3,
    ):
        super().__init__()
        imagenet = layout == 'imagenet'
        width = width or (64 if imagenet else 16)
        kernel, stride, pad = (7, 2, 3) if imagenet else (3, 1, 1)
        self.conv1 = nn.Conv2d(in_channels, width, kernel, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1) if imagenet else nn.Identity()
        cls = BLOCKS[block]
        inplanes = width
        for i, n in enumerate(stage_sizes):
            planes = width * 2**i
            blocks = []
            for j in range(n):
                blocks.append(cls(inplanes, planes, 2 if i > 0 and j == 0 else 1))
                inplanes = planes * cls.expansion
            self.add_module(f'layer{i + 1}', nn.Sequential(*blocks))
        self.num_stages = len(stage_sizes)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f'layer{i + 1}')(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# --- Twins of cnn_jax's modules -----------------------------------------------------------


def twin(module: linen.Module, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """The torch.nn network of the Flax `module` (of cnn_jax.models) at NHWC `input_shape`."""
    h, _, c = input_shape
    kind = type(module).__name__
    if kind == 'BlockCNN':
        return _block_cnn(module, h, c, num_classes)
    if kind == 'SmallCNN':
        return _small_cnn(module, h, c, num_classes)
    if kind == 'VGG':
        return _vgg(module, h, c, num_classes)
    if kind == 'CifarCNN6':
        return _cifar_cnn6(module, h, c, num_classes)
    if kind == 'ResNet':
        return ResNet(
            module.block,
            module.stage_sizes,
            num_classes,
            layout=module.layout,
            width=module.width,
            in_channels=c,
        )
    raise ValueError(f'no PyTorch twin for {kind}')


def _block_cnn(module: linen.Module, size: int, c: int, num_classes: int) -> nn.Module:
    act = ACTIVATIONS[module.activation]
    layers = []
    for f, k in zip(module.features, module.kernel_sizes, strict=True):
        p = k // 2 if module.padding == 'same' else 0
        layers += [nn.Conv2d(c, f, k, padding=p)]
        if 'batchnorm' in module.norm:
            layers.append(nn.BatchNorm2d(f))
        if 'dropout' in module.norm:
            layers.append(nn.Dropout2d(module.norm_rate))
        layers += [act(), nn.MaxPool2d(2)]
        c, size = f, (size + 2 * p - k + 1) // 2
    layers.append(nn.Flatten())
    width = c * size * size
    for f in module.hidden:
        layers.append(nn.Linear(width, f))
        if 'batchnorm' in module.dense_norm:
            layers.append(nn.BatchNorm1d(f))
        layers.append(act())
        if module.dropout_rate:
            layers.append(nn.Dropout(module.dropout_rate))
        width = f
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _small_cnn(module: linen.Module, size: int, c: int, num_classes: int) -> nn.Module:
    layers = []
    for f in module.features:
        layers += [nn.Conv2d(c, f, 3, padding=1, bias=not module.use_bn)]
        if module.use_bn:
            layers.append(nn.BatchNorm2d(f))
        layers.append(nn.ReLU())
        if size >= 4:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        c = f
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(c * size * size, module.dense),
        nn.ReLU(),
        nn.Dropout(module.dropout_rate),
        nn.Linear(module.dense, num_classes),
    )


def _vgg(module: linen.Module, size: int, c: int, num_classes: int) -> nn.Module:
    act = ACTIVATIONS[module.activation]
    layers = []
    for layer in module.layers:
        if layer == 'M':
            layers.append(nn.MaxPool2d(2))
            size //= 2
            continue
        layers.append(nn.Conv2d(c, int(layer), 3, padding=1))
        if 'batchnorm' in module.norm:
            layers.append(nn.BatchNorm2d(int(layer)))
        layers.append(act())
        c = int(layer)
    hidden = module.hidden
    return nn.Sequential(
        *layers,
        nn.Flatten(),
        nn.Linear(c * size * size, hidden),
        act(),
        nn.Dropout(module.dropout_rate),
        nn.Linear(hidden, hidden),
        act(),
        nn.Dropout(module.dropout_rate),
        nn.Linear(hidden, num_classes),
    )


def _cifar_cnn6(module: linen.Module, size: int, c: int, num_classes: int) -> nn.Module:
    """E4's six-conv CNN (cnn_jax/models/cifar_cnn6.py): the norm before its activation."""
    act, dense_act = ACTIVATIONS[module.activation], ACTIVATIONS[module.dense_activation]

    def norm(width: int, spatial: bool) -> list[nn.Module]:
        layers = []
        if 'batchnorm' in module.norm:
            layers.append((nn.BatchNorm2d if spatial else nn.BatchNorm1d)(width))
        if 'dropout' in module.norm:
            layers.append((nn.Dropout2d if spatial else nn.Dropout)(module.norm_rate))
        return layers

    size = (size - 2) // 2 - 2  # 3x3 valid, 2x2 pool, 3x3 valid.
    layers = [nn.Conv2d(c, 6, 3), act(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3), act()]
    for cin, f in ((8, 10), (10, 12), (12, 14)):
        layers += [nn.Conv2d(cin, f, 1), *(norm(f, True) if f == 14 else []), act()]
    layers += [nn.Conv2d(14, 16, 1), act(), nn.Flatten()]
    width = 16 * size * size
    for f in (1024, 512, 256):
        layers += [nn.Linear(width, f), *(norm(f, False) if f == 512 else []), dense_act()]
        width = f
    return nn.Sequential(*layers, nn.Linear(width, num_classes))

"""The benchmarked models at their experiments' shapes, and the device the figures come from.

A `Case` is one model with its experiment's data shape, batch size, optimiser and
augmentation; `Case.config` gives the experiment config cnn_jax trains it with.
"""

from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any

import jax
import ml_collections

from configs import default

try:  # torch is optional: without it the JAX side runs alone.
    import torch
except ImportError:
    torch = None

# Dense peak TFLOP/s by device kind (substring of jax's device_kind) and compute dtype;
# float32 on NVIDIA GPUs is the TF32 tensor-core peak (XLA's default precision uses it).
# Sources: NVIDIA H100/H200/A100/L4 datasheets (SXM, without sparsity); Google Cloud TPU docs.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    'H200': {'bfloat16': 989.4, 'float32': 494.7},
    'H100 PCIe': {'bfloat16': 756.0, 'float32': 378.0},
    'H100': {'bfloat16': 989.4, 'float32': 494.7},
    'A100': {'bfloat16': 312.0, 'float32': 156.0},
    'L4': {'bfloat16': 121.0, 'float32': 60.0},
    'TPU v4': {'bfloat16': 275.0, 'float32': 275.0},
    'TPU v5 lite': {'bfloat16': 197.0, 'float32': 197.0},
    'TPU v5': {'bfloat16': 459.0, 'float32': 459.0},
    'TPU v6 lite': {'bfloat16': 918.0, 'float32': 918.0},
}

DEFAULT_MODELS_CPU = ('simplenn', 'cifar_cnn3', 'resnet20', 'vgg16')
DEFAULT_MODELS_ACCELERATOR = ('simplenn', 'cifar_cnn3', 'resnet20', 'vgg16', 'resnet50')


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked model: its experiment's data shape, batch, optimiser and augmentation."""

    name: str
    model: str
    data_shape: tuple[int, int, int]  # Stored uint8 images (H, W, C).
    batch_size: int
    num_classes: int
    image_size: int | None = None  # Resized on the device to this (the model's input).
    options: tuple[tuple[str, Any], ...] = ()
    optimizer: str = 'momentum'
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: tuple[tuple[str, Any], ...] = ()  # AugmentConfig fields.
    note: str = ''

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w, c = self.data_shape
        return (self.image_size, self.image_size, c) if self.image_size else (h, w, c)

    def config(self, dtype: str = 'float32') -> ml_collections.ConfigDict:
        """The experiment config of this case (configs.default plus the case's settings)."""
        c = default.get_config()
        c.model = self.model
        for key, value in self.options:
            c.model_options[key] = value
        c.dtype = dtype
        c.batch_size = self.batch_size
        c.image_size = self.image_size
        c.optimizer = self.optimizer
        c.learning_rate = self.learning_rate
        c.momentum = self.momentum
        c.weight_decay = self.weight_decay
        for key, value in self.augment:
            c.augment[key] = value
        return c


_CROP_FLIP = (('crop_padding', 4), ('flip', True))
# The experiments of notes/EXPERIMENTS.md at their configs' shapes and batch sizes.
CASES: dict[str, Case] = {
    'simplenn': Case(
        'simplenn',
        'simplenn',
        (32, 32, 3),
        64,
        10,
        weight_decay=1e-4,
        augment=_CROP_FLIP,
        note='E6; crop+flip as its augmentation ablation',
    ),
    'cifar_cnn3': Case(
        'cifar_cnn3',
        'cifar_cnn3',
        (32, 32, 3),
        64,
        10,
        optimizer='sgd',
        learning_rate=0.05,
        note='E10',
    ),
    'resnet20': Case(
        'resnet20',
        'resnet20',
        (32, 32, 3),
        128,
        10,
        learning_rate=0.1,
        weight_decay=1e-4,
        augment=_CROP_FLIP,
        note='E8',
    ),
    'vgg16': Case(
        'vgg16',
        'vgg16',
        (32, 32, 3),
        64,
        3,
        image_size=64,
        options=(('dropout_rate', 0.5),),
        weight_decay=5e-4,
        augment=(('flip', True), ('rotation_degrees', 10.0), ('scale', 0.1)),
        note='E1 augment rung: CIFAR 32x32 resized to 64 on the device',
    ),
    'resnet18': Case(
        'resnet18',
        'resnet18',
        (32, 32, 3),
        64,
        3,
        image_size=64,
        note='E1 ResNet-18: CIFAR 32x32 resized to 64 on the device; its last stage is 2x2',
    ),
    'resnet50': Case(
        'resnet50',
        'resnet50',
        (32, 32, 3),
        64,
        10,
        image_size=224,
        learning_rate=0.01,
        augment=(('flip', True),),
        note='E5: CIFAR resized to 224 on the device',
    ),
    'resnet18_224': Case(
        'resnet18_224',
        'resnet18',
        (32, 32, 3),
        64,
        10,
        image_size=224,
        augment=(('flip', True),),
        note='ResNet-18 at ImageNet size: CIFAR resized to 224 on the device',
    ),
    'vgg_e1': Case(
        'vgg_e1',
        'vgg13',
        (32, 32, 3),
        64,
        3,
        image_size=64,
        options=(('dropout_rate', 0.5),),
        weight_decay=5e-4,
        augment=(('flip', True), ('rotation_degrees', 10.0), ('scale', 0.1)),
        note="E1's VGG (configs/vgg.py:augment, ten convs): CIFAR resized to 64 on the device",
    ),
    'tiny': Case(
        'tiny',
        'small_cnn',
        (8, 8, 1),
        16,
        10,
        options=(('features', (4,)), ('dense', 16)),
        augment=(('flip', True),),
        note='smoke test',
    ),
}


def device_info(dtype: str = 'float32') -> dict[str, Any]:
    """The device, library versions, XLA_FLAGS, whether oneDNN ran the CPU's float32
    convolutions, and the load the figures were taken with."""
    from cnn_jax.models import onednn_conv

    dev = jax.devices()[0]
    peak = peak_tflops(dev.device_kind, dtype) if dev.platform != 'cpu' else None
    return {
        'platform': dev.platform,
        'device_kind': dev.device_kind,
        'num_devices': jax.device_count(),
        'cpu_count': os.cpu_count(),
        'processor': platform.processor() or platform.machine(),
        'jax': jax.__version__,
        'torch': torch.__version__ if torch else None,
        'torch_threads': torch.get_num_threads() if torch else None,
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        'onednn_convolutions': onednn_conv.onednn_conv_wins(dev.platform, 'float32'),
        'peak_tflops': peak,
        'load_average': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
    }


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak for `dtype` from PEAK_TFLOPS, or None if not listed."""
    for key, peaks in PEAK_TFLOPS.items():  # Ordered: 'H100 PCIe' before 'H100'.
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None

"""Device-resident or streamed input: a dataset's bytes against a device memory budget.

The device-resident path replicates every split on every device, so what counts is the
whole dataset against one device's memory, less room for the parameters, optimiser
state and activations. Proposed config keys:
- `input_mode`: 'auto' (device when the dataset fits the budget, else stream), 'device'
  or 'stream';
- `device_memory_budget_gb`: the budget in GiB; None derives it from the device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from cnn_jax.errors import ConfigError

INPUT_MODES = ('auto', 'device', 'stream')
# Share of a device's memory the dataset may take: the rest is for the model's training.
DEVICE_MEMORY_FRACTION = 0.5
# When the device reports no memory limit (the CPU backend): per device, and the CPU
# devices of a host share its memory, each holding a copy.
CPU_BUDGET_BYTES = 2 * 2**30


def dataset_bytes(num_examples: int, image_shape: Sequence[int], label_bytes: int = 4) -> int:
    """Bytes of `num_examples` uint8 images of `image_shape` and their int32 labels."""
    return num_examples * (math.prod(image_shape) + label_bytes)


def device_memory_budget(budget_gb: float | None = None, device: Any = None) -> int:
    """Bytes the device-resident dataset may use on each device.

    `budget_gb` when given; else DEVICE_MEMORY_FRACTION of the device's
    `memory_stats()['bytes_limit']` (GPUs and TPUs report it); else CPU_BUDGET_BYTES.
    """
    if budget_gb is not None:
        if budget_gb <= 0:
            raise ConfigError(f'device_memory_budget_gb must be positive, got {budget_gb}')
        return int(budget_gb * 2**30)
    device = jax.local_devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without statistics raise or return None.
        stats = None
    if stats and stats.get('bytes_limit'):
        return int(stats['bytes_limit'] * DEVICE_MEMORY_FRACTION)
    return CPU_BUDGET_BYTES


def choose_input_mode(mode: str, resident_bytes: int, budget_bytes: int) -> str:
    """'device' or 'stream': `mode` itself unless 'auto', which compares the bytes."""
    if mode not in INPUT_MODES:
        raise ConfigError(f'unknown input_mode {mode!r}; known: {", ".join(INPUT_MODES)}')
    if mode != 'auto':
        return mode
    return 'device' if resident_bytes <= budget_bytes else 'stream'


def input_mode(
    config: ml_collections.ConfigDict, num_examples: int, image_shape: Sequence[int]
) -> str:
    """config.input_mode resolved for a dataset of `num_examples` (all splits) images."""
    budget = device_memory_budget(config.get('device_memory_budget_gb'))
    needed = dataset_bytes(num_examples, image_shape)
    return choose_input_mode(config.get('input_mode', 'auto'), needed, budget)

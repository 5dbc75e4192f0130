"""Data parallelism: one 'data' mesh axis over every device, the batch sharded on it.

The train state and the device-resident datasets are replicated; each step's batch
indices are sharded, so each device gathers, augments and runs its slice of the batch.
Under `jax.jit` XLA inserts the gradient all-reduce; BatchNorm statistics are computed
over the global batch, so N devices give the same numbers as one.
"""

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn_jax.errors import ConfigError

DATA_AXIS = 'data'


def maybe_initialize_distributed() -> None:
    """Joins a multi-host job when the launcher set JAX's coordinator variables."""
    if os.environ.get('JAX_COORDINATOR_ADDRESS') and jax.process_count() == 1:
        jax.distributed.initialize()


def make_mesh(devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the devices."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'batch_size') -> None:
    n = mesh.devices.size
    if batch_size % n:
        raise ConfigError(
            f'{what}={batch_size} does not divide over {n} devices; use a multiple of {n}'
        )


def put_replicated(array: np.ndarray, mesh: Mesh) -> jax.Array:
    """A host array copied to every device (works across hosts: each holds the same data)."""
    sharding = replicated(mesh)
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

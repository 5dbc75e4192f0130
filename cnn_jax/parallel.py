"""Data parallelism: one 'data' mesh axis over every device, the batch sharded on it.

The train state and the device-resident datasets are replicated; each step's batch
indices are sharded, so each device gathers, augments and runs its slice of the batch.
Under `jax.jit` XLA inserts the gradient all-reduce; BatchNorm statistics are computed
over the global batch, so N devices give the same numbers as one.

Multi-process jobs (several hosts, or several processes on one): `initialize_distributed`
joins them before anything starts a JAX backend; every process then runs the same program
on the same data, process 0 alone writes files, and the helpers below give every process
the same host values (`to_host`, `any_process`, `from_main`, `barrier`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn_jax.errors import ConfigError

DATA_AXIS = 'data'
ENV_COORDINATOR = 'JAX_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'JAX_NUM_PROCESSES'
ENV_PROCESS_ID = 'JAX_PROCESS_ID'


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, '').strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f'{name}={value!r} is not an integer') from None


# The launchers whose jobs jax.distributed.initialize() joins without arguments, told by
# the environment variables each documents and JAX reads (JAX's private cluster detection
# is not imported; tests/test_multiprocess.py checks that the two agree).
SLURM_VARS = 'SLURM_JOB_ID SLURM_STEP_NODELIST SLURM_NTASKS SLURM_PROCID SLURM_LOCALID'.split()
OMPI_URI = 'OMPI_MCA_orte_hnp_uri'  # Set only under Open MPI's mpirun/mpiexec.
TPU_HOSTS = ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES')  # A GKE TPU slice's workers.


def cluster_process_count(environ: Mapping[str, str] | None = None) -> int:
    """Processes in the cluster job JAX would join (Open MPI, SLURM, GKE TPU); 1 if none.

    Reads the launcher's environment only (`os.environ` by default): no backend starts.
    Kubernetes jobs (their size is in the Kubernetes API) and TPU VMs whose workers are
    listed only in GCE metadata are not detected: give them JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID.
    """
    env = os.environ if environ is None else environ
    try:
        if OMPI_URI in env:
            return int(env['OMPI_COMM_WORLD_SIZE'])
        if all(name in env for name in SLURM_VARS):
            return int(env['SLURM_NTASKS'])
        hosts = next((env[name] for name in TPU_HOSTS if env.get(name)), '')
        if hosts:
            return len(hosts.split(',')) * int(env.get('MEGASCALE_NUM_SLICES') or 1)
    except (KeyError, ValueError):  # A malformed launcher environment: a single process.
        pass
    return 1


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Joins a multi-process job when this is one; True if it did.

    Call it first, before anything starts a JAX backend (jax.distributed.initialize
    refuses afterwards). The job is multi-process when the arguments (launch.py's
    --coordinator/--num_processes/--process_id) or JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID say so, or when JAX detects a cluster job of
    more than one process; a missing value is left to that detection.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    given = (coordinator, num_processes, process_id)
    if all(v is None for v in given):
        if cluster_process_count() <= 1:
            return False
    elif num_processes == 1:
        return False
    elif None in given and cluster_process_count() <= 1:
        raise ConfigError(
            'a multi-process job needs the coordinator address, the number of processes and '
            f'this process id (--coordinator/--num_processes/--process_id or {ENV_COORDINATOR}'
            f', {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}); got {coordinator=}, '
            f'{num_processes=}, {process_id=}'
        )
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def is_main_process() -> bool:
    """Process 0: the one that writes a multi-process job's files."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process gets here (files one wrote are then there for all)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of `x` as a NumPy array on every process (gathered if sharded across)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (a collective: all must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


def from_main(value: Any) -> Any:
    """Process 0's `value` (a JSON-able object) on every process (a collective)."""
    if jax.process_count() == 1:
        return value
    data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_main_process() else None
    size = int(multihost_utils.broadcast_one_to_all(np.int32(0 if data is None else data.size)))
    padded = np.zeros(size, np.uint8) if data is None else data
    return json.loads(bytes(multihost_utils.broadcast_one_to_all(padded)).decode())


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
    return jax.make_array_from_callback(array.shape, replicated(mesh), lambda index: array[index])

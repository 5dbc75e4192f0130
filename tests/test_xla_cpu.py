"""XLA CPU flags: only flags this jaxlib knows, never over the user's own settings."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest

from cnn_jax import xla_cpu


def test_jaxlib_knows_its_flags_and_not_made_up_ones():
    assert xla_cpu.jaxlib_knows('--xla_force_host_platform_device_count=8')
    assert not xla_cpu.jaxlib_knows('--xla_cpu_no_such_flag_in_any_build=1')


def test_apply_keeps_the_users_setting(monkeypatch):
    monkeypatch.setattr(xla_cpu, 'backends_started', lambda: False)
    monkeypatch.setenv('XLA_FLAGS', '--xla_a=1')
    assert xla_cpu.apply_xla_flags(['--xla_a=2', '--xla_b=3'])
    assert os.environ['XLA_FLAGS'] == '--xla_a=1 --xla_b=3'
    monkeypatch.setattr(xla_cpu, 'backends_started', lambda: True)
    assert not xla_cpu.apply_xla_flags(['--xla_c=4'])
    assert os.environ['XLA_FLAGS'] == '--xla_a=1 --xla_b=3'


def test_recommended_flags_start_jax():
    """In a fresh process (this one's JAX has started): XLA accepts what was added."""
    code = (
        'import json, os\n'
        'from cnn_jax import xla_cpu\n'
        'added = xla_cpu.use_recommended_flags()\n'
        'import jax, jax.numpy as jnp\n'
        'assert float(jnp.ones(3).sum()) == 3.0\n'
        "print(json.dumps([added, os.environ.get('XLA_FLAGS', '')]))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    root = pathlib.Path(__file__).parent.parent
    proc = subprocess.run(
        [sys.executable, '-c', code], env=env, capture_output=True, text=True, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    added, flags = json.loads(proc.stdout.strip().splitlines()[-1])
    assert flags.split() == added  # Nothing was set before; what was added reached XLA.


def test_backends_started_is_told_without_changing_jax_config():
    """In a fresh process: False after `import jax`, True once a computation ran; the
    probe leaves jax_num_cpu_devices as it was, so XLA_FLAGS' device count still holds."""
    code = (
        'import json\n'
        'import jax, jax.numpy as jnp\n'
        'from cnn_jax import xla_cpu\n'
        'before = xla_cpu.backends_started()\n'
        'total = float(jnp.ones(3).sum())\n'
        'after = xla_cpu.backends_started()\n'
        'print(json.dumps([before, total, after, jax.config.jax_num_cpu_devices,'
        ' jax.device_count()]))\n'
    )
    env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=3'}
    root = pathlib.Path(__file__).parent.parent
    proc = subprocess.run(
        [sys.executable, '-c', code], env=env, capture_output=True, text=True, cwd=root
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [False, 3.0, True, -1, 3]
    jnp.zeros(1).block_until_ready()  # This process's JAX has started now, if not before.
    assert xla_cpu.backends_started()


# 10 train-step-like calls after 20: three BatchNorm + ReLU layers forward and backward at a ResNet
# stage's 8 MB activations; their intermediates are XLA's buffers, freed after each call.
FAULTS_CODE = """
import json, resource
from cnn_jax import xla_cpu

changed = xla_cpu.keep_freed_memory()  # As launch.py: before JAX loads.
import jax, jax.numpy as jnp


def bn_relu(x):
    return jax.nn.relu((x - x.mean((0, 1, 2))) * jax.lax.rsqrt(x.var((0, 1, 2)) + 1e-5))


f = jax.jit(jax.grad(lambda x: jnp.sum(bn_relu(bn_relu(bn_relu(x))) ** 2)))
x = jnp.ones((128, 32, 32, 16)) * jnp.arange(16.0)
for _ in range(20):  # Compiled, and the heap grown to the program's peak.
    f(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    f(x).block_until_ready()
print(json.dumps([changed, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before]))
"""


def page_faults(**env: str) -> tuple[bool, int]:
    """(keep_freed_memory's answer, the minor page faults of the 10 calls), in a fresh
    process without the caller's MALLOC_* settings."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith('MALLOC_')}
    environ.pop('CNN_JAX_MALLOC', None)
    proc = subprocess.run(
        [sys.executable, '-c', FAULTS_CODE],
        env={**environ, 'XLA_FLAGS': '', **env},
        capture_output=True,
        text=True,
        cwd=pathlib.Path(__file__).parent.parent,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    changed, faults = json.loads(proc.stdout.strip().splitlines()[-1])
    return changed, faults


@pytest.mark.skipif(sys.platform != 'linux', reason="glibc's malloc")
def test_freed_step_buffers_are_reused_not_mapped_afresh():
    """glibc's defaults map the step's large buffers afresh at each call and fault on every
    4 KB page written; kept by keep_freed_memory, they are reused."""
    changed, default_faults = page_faults(CNN_JAX_MALLOC='0')
    assert not changed
    changed, kept_faults = page_faults()
    assert changed and kept_faults < default_faults / 5, (kept_faults, default_faults)
    assert page_faults(MALLOC_ARENA_MAX='2')[0] is False  # The user's own tuning stays.

"""XLA CPU flags: only flags this jaxlib knows, never over the user's own settings."""

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp

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

"""XLA CPU flags: only flags this jaxlib knows, never over the user's own settings."""

import json
import os
import pathlib
import subprocess
import sys

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

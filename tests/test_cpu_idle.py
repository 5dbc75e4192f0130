"""benchmarks.cpu_idle: each CPU's idle share from /proc/stat, and the command's table (no
timing asserted)."""

import os
import sys

import pytest

from benchmarks import cpu_idle


def test_idle_share_counts_idle_and_iowait_ticks_of_each_cpu():
    before = {'cpu0': [10, 0, 5, 100, 0, 0, 0, 0], 'cpu1': [0, 0, 0, 0, 0, 0, 0, 0]}
    after = {'cpu0': [20, 0, 5, 130, 10, 0, 0, 0], 'cpu1': [40, 0, 0, 0, 0, 0, 0, 0]}
    assert cpu_idle.idle_shares(before, after) == {'cpu0': 0.8, 'cpu1': 0.0}


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc/stat')
def test_cpu_times_has_every_cpu_of_this_machine():
    times = cpu_idle.cpu_times()
    assert len(times) == os.cpu_count()
    assert all(len(ticks) == 8 and sum(ticks) > 0 for ticks in times.values())


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc/stat')
def test_cpu_idle_command_tables_both_sides(capsys, monkeypatch):
    """python -m benchmarks.cpu_idle: a row per child, each with every CPU's idle share."""
    pytest.importorskip('torch')
    flags = os.environ.get('XLA_FLAGS', '').replace('--xla_force_host_platform_device_count=8', '')
    monkeypatch.setenv('XLA_FLAGS', flags)  # One device, as a user's run on a CPU has.
    assert cpu_idle.main(['--model', 'tiny', '--steps', '2', '--rounds', '1']) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith('| 1 |')]
    assert [r.split('|')[2].strip() for r in rows] == ['cnn_jax', 'torch eager']
    for row in rows:
        ms, cores, idle = (cell.strip() for cell in row.split('|')[3:6])
        assert float(ms) > 0 and float(cores) > 0
        assert len(idle.split(', ')) == os.cpu_count()
        assert all(0 <= int(share.rstrip('%')) <= 100 for share in idle.split(', '))

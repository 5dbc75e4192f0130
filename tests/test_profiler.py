"""config.profile_steps (cnn_jax.records.StepProfile): a launch traces its steps after
warm-up into the workdir's TensorBoard folder, and its numbers are the run's without."""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from cnn_jax.records import StepProfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ['--config=configs/quickstart.py', '--config.num_epochs=1', '--config.steps_per_epoch=5']


def launch(workdir: pathlib.Path, *args: str) -> dict:
    r = subprocess.run(
        [sys.executable, 'launch.py', *RUN, f'--workdir={workdir}', *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads((workdir / 'summary.json').read_text())


def test_step_profile_traces_the_steps_after_warm_up(tmp_path):
    """Started after the first step, stopped after two more: one trace, then nothing."""
    profile, x = StepProfile(tmp_path, 2), jnp.ones(4)
    f = jax.jit(lambda x: x * 2.0)
    tracing = []
    for _ in range(5):
        x = f(x)
        profile.step(x)
        tracing.append(profile.tracing)
    assert tracing == [True, True, False, False, False]
    assert len(list((tmp_path / 'tensorboard').glob('plugins/profile/*/*.xplane.pb'))) == 1
    assert not StepProfile(tmp_path, 0).left  # 0: off.


@pytest.mark.slow
def test_profile_steps_writes_a_trace_and_changes_no_metric(tmp_path):
    profiled = launch(tmp_path / 'profiled', '--config.profile_steps=2')
    traces = list(
        (tmp_path / 'profiled' / 'tensorboard' / 'plugins' / 'profile').glob('*/*.xplane.pb')
    )
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    plain = launch(tmp_path / 'plain')
    assert not (tmp_path / 'plain' / 'tensorboard' / 'plugins').exists()
    for key in ('train_loss', 'val_loss', 'test_loss', 'test_accuracy', 'confusion_matrix'):
        assert profiled[key] == plain[key], key

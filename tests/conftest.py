"""Test session setup: 8 virtual CPU devices (multi-device paths run in every test)."""

import math
import os

from cnn_jax.xla_cpu import jaxlib_knows  # noqa: E402 (imports no jax)

# XLA:CPU ends the process when a collective's last participant is 40 s late
# ("Termination timeout for `all reduce` ... Exiting to ensure a consistent program
# state"). That was the fast tier's rare worker abort in sessions 8-11: 8 virtual devices
# on 2 shared cores, with other training running beside the tests. 120 s gives the slow
# participant room, and the warning after 10 s shows when a collective lagged.
_COLLECTIVE_TIMEOUTS = (
    '--xla_cpu_collective_call_terminate_timeout_seconds=120',
    '--xla_cpu_collective_call_warn_stuck_timeout_seconds=10',
)
# Must happen before jax is imported anywhere.
os.environ.setdefault(
    'XLA_FLAGS',
    ' '.join(
        ['--xla_force_host_platform_device_count=8']
        + [f for f in _COLLECTIVE_TIMEOUTS if jaxlib_knows(f)]
    ),
)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def suite_cache(request, tmp_path_factory):
    """One folder for the suite's caches, in .pytest_cache: one .ci/run's fast tier reuses it
    from run to run, and its slow tier too, so CIFAR-10's archive is decoded once and a
    program compiled once. Each pytest-xdist worker has its own: with one folder, loading
    the other worker's compiled programs aborted a worker in 2 of 4 runs of two test files
    (0 of 3 with a folder each). The first worker's is the one-process slow tier's, which
    so reuses half the fast tier's programs (none cost it 46 s of compiling). Under
    -p no:cacheprovider, a temporary folder per session."""
    cache = getattr(request.config, 'cache', None)
    worker = os.environ.get('PYTEST_XDIST_WORKER', '')
    name = 'cnn_jax_test_cache' + ('' if worker in ('', 'gw0') else worker)
    return cache.mkdir(name) if cache else tmp_path_factory.mktemp('cache')


@pytest.fixture(scope='session', autouse=True)
def _compilation_cache(suite_cache):
    """JAX's persistent compilation cache: the many small runs share their compiled steps,
    and a re-run of the suite loads them instead of compiling again (launch.py's children
    use <CNN_JAX_CACHE>/xla, cli.enable_compilation_cache)."""
    import jax

    jax.config.update('jax_compilation_cache_dir', str(suite_cache / 'xla'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
    jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
    # No size cap, as in launch.py's children: with one, JAX evicts by reading every entry's
    # access-time file, which entries the children wrote lack, so every later write failed.
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a test that skips for want of torch or of the oneDNN wheels fails: CI
    installs requirements-test.txt, so the PyTorch-reference and oneDNN tests must run there."""
    outcome = yield
    report = outcome.get_result()
    why = str(call.excinfo.value) if call.excinfo is not None else ''
    wanted = "could not import 'torch'" in why or 'oneDNN wheels not installed' in why
    if report.skipped and wanted and os.environ.get('CI') == 'true':
        report.outcome = 'failed'
        report.longrepr = f'CI=true, so requirements-test.txt is installed, yet: {why}'


@pytest.fixture(autouse=True)
def _isolated_cache(suite_cache, monkeypatch):
    """Decoded-folder caches (and launch.py's compiled programs) go to the suite's cache,
    never ~/.cache."""
    monkeypatch.setenv('CNN_JAX_CACHE', str(suite_cache))


def tiny_config(**overrides):
    """A seconds-long experiment on digits with a tiny CNN (8 devices: batch multiple of 8)."""
    from configs import default

    c = default.get_config()
    c.dataset = 'digits'
    c.model = 'small_cnn'
    c.model_options.features = (8,)
    c.model_options.dense = 16
    c.num_epochs = 2
    c.batch_size = 32
    c.eval_batch_size = 64
    c.optimizer = 'adam'
    c.learning_rate = 3e-3
    c.steps_per_epoch = 5
    c.log_every_steps = 2
    for key, value in overrides.items():
        target = c
        *path, last = key.split('.')
        for p in path:
            target = target[p]
        target[last] = value
    return c


def assert_close(got, want, *, rel_tol: float, abs_tol: float, where: str = '') -> None:
    """Equal structures (dicts, lists); floats within math.isclose's tolerances."""
    if isinstance(want, dict):
        assert set(got) == set(want), where
        for key in want:
            assert_close(
                got[key], want[key], rel_tol=rel_tol, abs_tol=abs_tol, where=f'{where}.{key}'
            )
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_close(g, w, rel_tol=rel_tol, abs_tol=abs_tol, where=f'{where}[{i}]')
    elif isinstance(want, float) and not isinstance(got, bool):
        assert math.isclose(got, want, rel_tol=rel_tol, abs_tol=abs_tol), (where, got, want)
    else:
        assert got == want, (where, got, want)


def stack_and_alone(config, overrides, num_steps=3):
    """`num_steps` compiled steps of a vectorised stack of `config`'s variants `overrides`,
    and of the second variant as its own run, on config's dataset resident on every
    device: (the stack's steps, its final state, the second variant's final state)."""
    import jax
    import numpy as np

    from cnn_jax import experiment, parallel, steps, sweep
    from cnn_jax.data import load_dataset
    from cnn_jax.data.metadata import model_input_shape
    from cnn_jax.training_loop import input_spec

    dataset = load_dataset(config)
    mesh, n = parallel.make_mesh(), len(dataset.train)
    spec, shape = input_spec(config, dataset), model_input_shape(config, dataset)
    model = experiment.build_model(config, dataset.num_classes)
    images = parallel.put_replicated(dataset.train.images, mesh)
    labels = parallel.put_replicated(dataset.train.labels, mesh)
    configs = sweep.variant_configs(config, overrides)
    ends = []
    for made in (
        sweep.stacked_steps(configs, model, shape, spec, mesh, n, 10),
        steps.plain_steps([configs[1]], model, shape, spec, mesh, n, 10),
    ):
        state = jax.device_put(made.state, parallel.replicated(mesh))
        acc, perm = made.zero_metrics(), made.permutation(0)
        for s in range(num_steps):
            state, acc = made.train(state, acc, images, labels, perm, np.int32(s), made.rng, None)
        ends.append((made, state))
    (stack, stacked), (_, alone) = ends
    return stack, stacked, alone


# Summary keys that differ between two runs of one config: timings, where it resumed.
VOLATILE = {'wall_time_s', 'compile_s', 'train_steps_per_s', 'train_images_per_s'}
VOLATILE |= {'resumed_from_step'}


def assert_resumed_run_ends_like(straight, make_config, workdir, monkeypatch, at_step=6):
    """tasks.run (launch.py's path) of make_config() in `workdir`, stopped after `at_step`
    and run again, ends with the summary `straight` (an uninterrupted run's) has."""
    import functools

    from cnn_jax import experiment, tasks, training_loop
    from cnn_jax.errors import Interrupted

    hook = functools.partial(training_loop.train_and_evaluate, hooks=[lambda step: step == at_step])
    with monkeypatch.context() as m:
        m.setattr(experiment, 'train_and_evaluate', hook)
        with pytest.raises(Interrupted, match=f'interrupted at step {at_step};'):
            tasks.run(make_config(), workdir)
    out = tasks.run(make_config(), workdir)
    assert out['resumed_from_step'] == at_step
    assert_close(
        {k: v for k, v in out.items() if k not in VOLATILE},
        {k: v for k, v in straight.items() if k not in VOLATILE},
        rel_tol=1e-6,
        abs_tol=1e-6,
    )

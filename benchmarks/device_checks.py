"""What benchmarks.gpu_check runs on cnn_jax's own steps: bring-up checks and scanned steps.

- `device_report`: the device, its memory, the JAX / jaxlib / XLA versions;
- `step_check`: one (or a few) real train steps (`plain_steps`, or cnn_jax.sweep's
  stacked variants) of a model on synthetic data: compiles, runs, gives finite losses;
- `scan_speed`: many train steps per compiled call (a `jax.lax.scan` over a chunk of
  steps, metric sums kept on the device) against one call per step, for models whose
  step is short enough that Python dispatch may bound it. Built here, not in cnn_jax.

Every cnn_jax import of benchmarks.gpu_check is in this module (one place to follow a
rename in the library).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import ml_collections
import numpy as np

from benchmarks.cases import Case
from benchmarks.timing import interleaved, median, rounded
from cnn_jax import parallel, sweep
from cnn_jax import steps as steps_lib
from cnn_jax.data.augment import AugmentConfig
from cnn_jax.models import MODELS, build_model
from cnn_jax.models.input_size import min_square_size


def device_report() -> dict[str, Any]:
    """The first device, its memory (where the backend reports it) and the versions."""
    dev = jax.devices()[0]
    out: dict[str, Any] = {
        'platform': dev.platform,
        'device_kind': dev.device_kind,
        'num_devices': jax.device_count(),
        'jax': jax.__version__,
        'jaxlib': getattr(jaxlib, '__version__', None),
    }
    try:
        out['platform_version'] = dev.client.platform_version  # CUDA / XLA build line.
    except Exception as e:  # noqa: BLE001 - not every backend has it
        out['platform_version'] = f'unavailable ({type(e).__name__})'
    try:
        stats = dev.memory_stats() or {}
    except Exception:  # noqa: BLE001 - CPU devices give none
        stats = {}
    limit = stats.get('bytes_limit')
    out['memory_gib'] = round(limit / 2**30, 2) if limit else None
    return out


def registry_models() -> dict[str, str | None]:
    """Every model name of cnn_jax.models.MODELS -> the earlier name that builds the same
    network at its defaults (None for the first): an alias needs no second compile."""
    first: dict[str, str] = {}
    out = {}
    for name, cls in MODELS.items():
        key = repr(cls(num_classes=10))  # Flax modules print every field.
        out[name] = first.get(key)
        first.setdefault(key, name)
    return out


def model_family(name: str) -> str:
    """The Flax module class that builds registry model `name` (VGG, ResNet, ...)."""
    return type(MODELS[name](num_classes=10)).__name__


def synthetic_data(
    config: ml_collections.ConfigDict, num_classes: int, data_shape: Sequence[int], n: int
) -> tuple[Any, steps_lib.InputSpec, Any, Any]:
    """A device-resident synthetic uint8 dataset of `n` examples and its InputSpec."""
    mesh = parallel.make_mesh()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, *data_shape), dtype=np.uint8)
    labels = rng.integers(0, num_classes, (n,), dtype=np.int32)
    channels = data_shape[-1]
    spec = steps_lib.InputSpec(
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        image_size=config.image_size,
        augment=AugmentConfig.from_config(config.augment),
    )
    return mesh, spec, parallel.put_replicated(images, mesh), parallel.put_replicated(labels, mesh)


def step_check(
    configs: Sequence[ml_collections.ConfigDict],
    num_classes: int,
    data_shape: tuple[int, int, int],
    steps: int = 2,
) -> dict[str, Any]:
    """Compiles and runs `steps` real train steps; K > 1 configs train as one vmapped program.

    Goes through the training loop's own step builders (`plain_steps`, or
    `cnn_jax.sweep.stacked_steps` for K variants). Returns compile and run seconds and
    each variant's mean loss, which must be finite (an exception otherwise).
    """
    config = configs[0]
    steps_per_epoch = steps
    mesh, spec, images, labels = synthetic_data(
        config, num_classes, data_shape, config.batch_size * steps_per_epoch
    )
    model = build_model(config, num_classes)
    h, w, c = data_shape
    shape = (config.image_size, config.image_size, c) if config.image_size else (h, w, c)
    make = steps_lib.plain_steps if len(configs) == 1 else sweep.stacked_steps
    t0 = time.perf_counter()
    vs = make(configs, model, shape, spec, mesh, images.shape[0], steps_per_epoch)
    repl = parallel.replicated(mesh)
    state = jax.device_put(vs.state, repl)
    acc = jax.device_put(vs.zero_metrics(), repl)
    perm = vs.permutation(0)
    active = jax.device_put(np.ones(len(configs), bool), repl)
    times = []
    for s in range(steps):
        state, acc = vs.train(state, acc, images, labels, perm, np.int32(s), vs.rng, active)
        jax.block_until_ready(acc)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
    sums = jax.device_get(acc)
    losses = np.atleast_1d(sums['loss'] / np.maximum(sums['count'], 1.0))
    if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f'non-finite training loss {losses.tolist()}')
    return {
        'input': list(shape),
        'batch': config.batch_size,
        'dtype': config.dtype,
        'variants': len(configs),
        'compile_and_first_step_s': rounded(times[0]),
        'step_s': rounded(median(times[1:]), 4),
        'mean_loss': [round(float(x), 4) for x in losses],
    }


def registry_case(name: str, batch_size: int, side: int = 32) -> tuple[Case, tuple[int, int, int]]:
    """A Case for registry model `name` at the smallest square input >= `side` it takes."""
    model = MODELS[name](num_classes=10)
    size = min_square_size(model, 3, start=side) or side
    return Case(name, name, (size, size, 3), batch_size, 10), (size, size, 3)


# --- Many steps per compiled call -----------------------------------------------------


def make_scanned_train(config: ml_collections.ConfigDict, spec: Any, mesh: Any, chunk: int):
    """jit(f(state, acc, images, labels, perm, first_step, rng) -> (state, acc)): `chunk`
    train steps in one call (`jax.lax.scan`), the batch index wrapping within the epoch."""
    body = steps_lib.input_train_step(spec, parallel.data_sharding(mesh), config.loss)
    body = functools.partial(body, label_smoothing=config.label_smoothing)
    repl = parallel.replicated(mesh)

    def run(state, acc, images, labels, perm, first_step, rng):
        def one(carry, i):
            st, ac = carry
            s = (first_step + i) % perm.shape[0]
            return body(st, ac, images, labels, perm, s, rng), None

        (state, acc), _ = jax.lax.scan(one, (state, acc), jnp.arange(chunk))
        return state, acc

    return jax.jit(run, donate_argnums=(0, 1), out_shardings=(repl, repl))


def scan_speed(
    case: Case,
    dtype: str,
    chunk: int,
    *,
    windows: int = 3,
    warmup: int = 1,
    window_s: float = 1.0,
    settle_s: float = 0.2,
) -> dict[str, Any]:
    """Images/s of one compiled call per step ('per_step', as the training loop runs) and of
    `chunk` steps per call ('scan'), windows interleaved; both real steps with the input
    pipeline on a synthetic device-resident dataset."""
    config = case.config(dtype)
    steps_per_epoch = max(chunk, 8)
    mesh, spec, images, labels = synthetic_data(
        config, case.num_classes, case.data_shape, case.batch_size * steps_per_epoch
    )
    model = build_model(config, case.num_classes)
    key = jax.random.key(0)
    repl = parallel.replicated(mesh)

    state = steps_lib.create_train_state(config, model, case.input_shape, key, steps_per_epoch)
    state = jax.device_put(state, repl)

    def fresh():  # Copies of one state: a second create_train_state is another pytree.
        copy = jax.tree.map(lambda x: x.copy(), state)
        return copy, jax.device_put(steps_lib.zero_metrics(), repl)

    compiled = steps_lib.compile_steps(config, mesh, spec, images.shape[0], steps_per_epoch)
    perm = compiled.permutation(key, 0)
    args = (images, labels, perm)
    t0 = time.perf_counter()
    single = compiled.train.lower(*fresh(), *args, np.int32(0), key).compile()
    single_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scanned_fn = make_scanned_train(config, spec, mesh, chunk)
    scanned = scanned_fn.lower(*fresh(), *args, np.int32(0), key).compile()
    scan_s = time.perf_counter() - t0

    def runner(fn, per_call):
        box = {'carry': fresh(), 's': 0}

        def run(n: int) -> None:
            st, ac = box['carry']
            for _ in range(n):
                st, ac = fn(st, ac, *args, np.int32(box['s'] % steps_per_epoch), key)
                box['s'] += per_call
            jax.block_until_ready((st, ac))
            box['carry'] = (st, ac)

        return run

    runners = {'per_step': runner(single, 1), 'scan': runner(scanned, chunk)}
    times, per_window = interleaved(runners, 1, windows, warmup, settle_s, window_s)
    steps_per_call = {'per_step': 1, 'scan': chunk}
    ips = {
        k: [case.batch_size * steps_per_call[k] * per_window[k] / t for t in v]
        for k, v in times.items()
    }
    speedups = [a / b for a, b in zip(ips['scan'], ips['per_step'], strict=True)]
    return {
        'model': case.name,
        'batch': case.batch_size,
        'dtype': dtype,
        'chunk': chunk,
        'per_step_ips': rounded(median(ips['per_step']), 1),
        'scan_ips': rounded(median(ips['scan']), 1),
        'scan_speedup': rounded(median(speedups), 3),
        'per_step_compile_s': rounded(single_s),
        'scan_compile_s': rounded(scan_s),
    }

"""Vectorised sweeps (cnn_jax.sweep) against separate runs: images/s per variant for K.

`python -m benchmarks --sweep [--sweep-k 1,2,4,8] [--sweep-groups 2,4]` runs it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from benchmarks.timing import interleaved
from cnn_jax import parallel, sweep
from cnn_jax import steps as steps_lib
from cnn_jax.data.augment import AugmentConfig
from cnn_jax.models import build_model


def benchmark_vectorized(
    config: ml_collections.ConfigDict,
    input_shape: tuple[int, int, int],
    num_classes: int,
    ks: Sequence[int] = (1, 2, 4, 8),
    *,
    steps: int = 5,
    windows: int = 5,
    warmup: int = 2,
    settle_s: float = 0.2,
    window_s: float = 1.0,
    seed: int = 0,
    group_sizes: Sequence[int | None] = (None,),
) -> dict[str, Any]:
    """Per-variant throughput of K vectorised variants against K separate runs.

    Each K is measured once per entry of `group_sizes` smaller than K (None: one vmap).

    'separate' is the real single-run step (`steps_lib.compile_steps(...).train`), whose
    images/s is also the per-variant rate of K runs one after another. 'K=k' is the
    vectorised step of `cnn_jax.sweep.make_vectorized_train` over k learning rates (one
    seed, so shared batches). Both read a synthetic uint8 dataset through the input
    pipeline. The windows of all of them are interleaved; speedups are medians of per-round
    ratios.
    """
    mesh = parallel.make_mesh()
    model = build_model(config, num_classes)
    steps_per_epoch = 8
    num_train = config.batch_size * steps_per_epoch
    rng = np.random.default_rng(seed)
    images = parallel.put_replicated(
        rng.integers(0, 256, (num_train, *input_shape), dtype=np.uint8), mesh
    )
    labels = parallel.put_replicated(
        rng.integers(0, num_classes, (num_train,), dtype=np.int32), mesh
    )
    channels = input_shape[-1]
    spec = steps_lib.InputSpec(
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        augment=AugmentConfig.from_config(config.augment),
    )
    runners, compile_s = {}, {}

    key = jax.random.key(config.seed)
    init_rng, train_rng, data_rng = jax.random.split(key, 3)
    single = steps_lib.create_train_state(config, model, input_shape, init_rng, steps_per_epoch)
    single = jax.device_put(single, parallel.replicated(mesh))
    sstep = steps_lib.compile_steps(config, mesh, spec, num_train, steps_per_epoch)
    sperm = sstep.permutation(data_rng, 0)
    t0 = time.perf_counter()
    sacc = jax.device_put(steps_lib.zero_metrics(), parallel.replicated(mesh))
    sfn = sstep.train.lower(single, sacc, images, labels, sperm, np.int32(0), train_rng).compile()
    compile_s['separate'] = time.perf_counter() - t0

    def make_runner(fn, state, acc, perm, rng):
        box = {'state': state, 'acc': acc, 's': 0}

        def run(n: int) -> None:
            st, ac = box['state'], box['acc']
            for _ in range(n):
                st, ac = fn(st, ac, images, labels, perm, np.int32(box['s'] % steps_per_epoch), rng)
                box['s'] += 1
            jax.block_until_ready((st, ac))
            box['state'], box['acc'] = st, ac

        return run

    runners['separate'] = make_runner(sfn, single, sacc, sperm, train_rng)
    base_lr = float(config.learning_rate)
    measured = [(k, g) for k in ks for g in group_sizes if g is None or g < k]
    for k, g in measured:
        variants = [{'learning_rate': base_lr * 0.5**i} for i in range(k)]
        configs = sweep.variant_configs(config, variants)
        rngs = sweep.VariantRngs.from_seeds([c.seed for c in configs])
        state = sweep.create_stacked_state(configs, model, input_shape, rngs, steps_per_epoch)
        state = jax.device_put(state, parallel.replicated(mesh))
        acc = jax.device_put(steps_lib.zero_metrics(k), parallel.replicated(mesh))
        perm = sweep.permutations(rngs, 0, num_train, steps_per_epoch, config.batch_size, mesh)
        vtrain = sweep.make_vectorized_train(configs, mesh, spec, state, rngs, group_size=g)
        t0 = time.perf_counter()
        fn = vtrain.lower(state, acc, images, labels, perm, np.int32(0), rngs.train[0]).compile()
        name = _run_name(k, g)
        compile_s[name] = time.perf_counter() - t0
        runners[name] = make_runner(fn, state, acc, perm, rngs.train[0])

    times, per_window = interleaved(runners, steps, windows, warmup, settle_s, window_s)
    batch = config.batch_size
    ips = {name: [batch * per_window[name] / t for t in ts] for name, ts in times.items()}
    separate = ips['separate']
    rows = []
    for k, g in measured:
        name = _run_name(k, g)
        summed = [k * x for x in ips[name]]  # Images/s summed over the k variants.
        speedups = [a / b for a, b in zip(summed, separate, strict=True)]
        rows.append(
            {
                'k': k,
                'group_size': g or k,
                'images_per_s_each_variant': round(float(np.median(ips[name])), 1),
                'images_per_s_all_variants': round(float(np.median(summed)), 1),
                'speedup_vs_separate': round(float(np.median(speedups)), 3),
                'compile_s': round(compile_s[name], 2),
                'window_images_per_s_all_variants': [round(x, 1) for x in summed],
            }
        )
    return {
        'model': config.model,
        'input': list(input_shape),
        'batch': batch,
        'augment': spec.augment.__dict__,
        'settings': {'steps': steps, 'windows': windows, 'warmup': warmup, 'window_s': window_s},
        'separate_ips': round(float(np.median(separate)), 1),
        'separate_compile_s': round(compile_s['separate'], 2),
        'window_separate_ips': [round(x, 1) for x in separate],
        'rows': rows,
    }


def _run_name(k: int, group: int | None) -> str:
    return f'K={k}' if group is None else f'K={k}/group={group}'


def format_benchmark(result: dict[str, Any]) -> str:
    """The K table of `benchmark_vectorized` as Markdown."""
    d = result.get('device', {})
    h, w, c = result['input']
    lines = [
        f'# Vectorised sweep: {result["model"]} {h}x{w}x{c}, batch {result["batch"]}, '
        f'on {d.get("device_kind", "?")} ({d.get("platform", "?")}, {d.get("cpu_count", "?")} '
        'CPU cores)',
        '',
        f'K separate runs (one after another): {result["separate_ips"]:,.0f} images/s per '
        f'variant (compile {result["separate_compile_s"]} s). Learning rates differ per variant; '
        'same batches; real input pipeline on a synthetic uint8 dataset; median of '
        f'{result["settings"]["windows"]} interleaved windows.',
        '',
        'Speedup = time of K separate runs / time of one vectorised run of K variants '
        '(images/s summed over the variants / images/s of one separate run).',
        '',
        '| K | vmap group | images/s of each variant | images/s, all variants | '
        'speedup vs K separate runs | compile_s |',
        '|---|---|---|---|---|---|',
    ]
    for r in result['rows']:
        lines.append(
            f'| {r["k"]} | {r["group_size"]} | {r["images_per_s_each_variant"]:,.0f} | '
            f'{r["images_per_s_all_variants"]:,.0f} | {r["speedup_vs_separate"]:.2f} | '
            f'{r["compile_s"]} |'
        )
    return '\n'.join(lines) + '\n'

"""Vectorised sweeps (cnn_jax.sweep) against separate runs: images/s per variant for K.

`python -m benchmarks --sweep [--sweep-k 1,2,4,8] [--sweep-groups 2,4]` runs it.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from benchmarks.timing import interleaved
from cnn_jax import parallel, sweep
from cnn_jax import steps as steps_lib
from cnn_jax.data.augment import AugmentConfig
from cnn_jax.models import build_model

STEPS_PER_EPOCH = 8  # Of the synthetic dataset every step reads from.


@dataclasses.dataclass
class _Bench:
    """The synthetic dataset on the mesh, the input pipeline's spec, and what each timed
    program compiled in."""

    config: ml_collections.ConfigDict
    mesh: Any
    images: jax.Array
    labels: jax.Array
    spec: steps_lib.InputSpec
    compile_s: dict[str, float] = dataclasses.field(default_factory=dict)

    @classmethod
    def synthetic(cls, config, input_shape, num_classes: int, seed: int) -> _Bench:
        mesh = parallel.make_mesh()
        rng = np.random.default_rng(seed)
        num_train = config.batch_size * STEPS_PER_EPOCH
        images = rng.integers(0, 256, (num_train, *input_shape), dtype=np.uint8)
        labels = rng.integers(0, num_classes, (num_train,), dtype=np.int32)
        channels = input_shape[-1]
        spec = steps_lib.InputSpec(
            mean=(0.5,) * channels,
            std=(0.25,) * channels,
            augment=AugmentConfig.from_config(config.augment),
        )
        put = functools.partial(parallel.put_replicated, mesh=mesh)
        return cls(config, mesh, put(images), put(labels), spec)

    @property
    def num_train(self) -> int:
        return len(self.labels)

    def runner(self, name: str, fn, state, acc, perm, rng) -> Callable[[int], None]:
        """Runs n steps of the compiled `fn` (lowered and compiled here, timed) from where
        the last call stopped."""
        t0 = time.perf_counter()
        fn = fn.lower(state, acc, self.images, self.labels, perm, np.int32(0), rng).compile()
        self.compile_s[name] = time.perf_counter() - t0
        box = {'state': state, 'acc': acc, 's': 0}

        def run(n: int) -> None:
            st, ac = box['state'], box['acc']
            for _ in range(n):
                s = np.int32(box['s'] % STEPS_PER_EPOCH)
                st, ac = fn(st, ac, self.images, self.labels, perm, s, rng)
                box['s'] += 1
            jax.block_until_ready((st, ac))
            box['state'], box['acc'] = st, ac

        return run

    def separate(self, model, input_shape) -> Callable[[int], None]:
        """The real single-run step."""
        config, replicated = self.config, parallel.replicated(self.mesh)
        init_rng, train_rng, data_rng = jax.random.split(jax.random.key(config.seed), 3)
        state = steps_lib.create_train_state(config, model, input_shape, init_rng, STEPS_PER_EPOCH)
        compiled = steps_lib.compile_steps(
            config, self.mesh, self.spec, self.num_train, STEPS_PER_EPOCH
        )
        state = jax.device_put(state, replicated)
        acc = jax.device_put(steps_lib.zero_metrics(), replicated)
        perm = compiled.permutation(data_rng, 0)
        return self.runner('separate', compiled.train, state, acc, perm, train_rng)

    def vectorized(self, model, input_shape, k: int, group: int | None) -> Callable[[int], None]:
        """k learning rates (halving from the config's) as one vmapped step."""
        config, replicated = self.config, parallel.replicated(self.mesh)
        variants = [{'learning_rate': float(config.learning_rate) * 0.5**i} for i in range(k)]
        configs = sweep.variant_configs(config, variants)
        rngs = sweep.VariantRngs.from_seeds([c.seed for c in configs])
        state = sweep.create_stacked_state(configs, model, input_shape, rngs, STEPS_PER_EPOCH)
        state = jax.device_put(state, replicated)
        acc = jax.device_put(steps_lib.zero_metrics(k), replicated)
        perm = sweep.permutations(
            rngs, 0, self.num_train, STEPS_PER_EPOCH, config.batch_size, self.mesh
        )
        fn = sweep.make_vectorized_train(
            configs, self.mesh, self.spec, state, rngs, group_size=group
        )
        return self.runner(_run_name(k, group), fn, state, acc, perm, rngs.train[0])


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
    bench = _Bench.synthetic(config, input_shape, num_classes, seed)
    model = build_model(config, num_classes)
    runners = {'separate': bench.separate(model, input_shape)}
    measured = [(k, g) for k in ks for g in group_sizes if g is None or g < k]
    for k, g in measured:
        runners[_run_name(k, g)] = bench.vectorized(model, input_shape, k, g)

    times, per_window = interleaved(runners, steps, windows, warmup, settle_s, window_s)
    batch = config.batch_size
    ips = {name: [batch * per_window[name] / t for t in ts] for name, ts in times.items()}
    separate = ips['separate']
    return {
        'model': config.model,
        'input': list(input_shape),
        'batch': batch,
        'augment': bench.spec.augment.__dict__,
        'settings': {'steps': steps, 'windows': windows, 'warmup': warmup, 'window_s': window_s},
        'separate_ips': round(float(np.median(separate)), 1),
        'separate_compile_s': round(bench.compile_s['separate'], 2),
        'window_separate_ips': [round(x, 1) for x in separate],
        'rows': [_row(k, g, ips, bench.compile_s) for k, g in measured],
    }


def _row(k: int, g: int | None, ips: dict[str, list[float]], compile_s: dict) -> dict[str, Any]:
    """K=k's images/s, each variant's and summed, and its speedup over separate runs."""
    name = _run_name(k, g)
    summed = [k * x for x in ips[name]]  # Images/s summed over the k variants.
    speedups = [a / b for a, b in zip(summed, ips['separate'], strict=True)]
    return {
        'k': k,
        'group_size': g or k,
        'images_per_s_each_variant': round(float(np.median(ips[name])), 1),
        'images_per_s_all_variants': round(float(np.median(summed)), 1),
        'speedup_vs_separate': round(float(np.median(speedups)), 3),
        'compile_s': round(compile_s[name], 2),
        'window_images_per_s_all_variants': [round(x, 1) for x in summed],
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

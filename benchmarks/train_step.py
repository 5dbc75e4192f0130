"""Training throughput of cnn_jax's compiled step, against PyTorch and the device's peak.

For each model (a Case) at its experiment's input shape and batch size, `measure_case`
times, windows interleaved (benchmarks.timing):
- jax_synthetic: `cnn_jax.steps.train_step` on a device-resident float batch;
- jax_pipeline: the real compiled step (`cnn_jax.steps.compile_steps(...).train`), which
  gathers the batch from a device-resident uint8 dataset, augments and normalises it on
  the device, donating the state, called as the training loop calls it;
- torch_eager and torch_compile: the same architecture in torch.nn
  (benchmarks.torch_models), SGD with the same hyperparameters, same batch;
and takes the FLOPs of the compiled step from XLA's cost analysis.
`forward_backward_split` times the forward pass and forward + backward alone.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import torch_process
from benchmarks.cases import CASES, Case, device_info, peak_tflops
from benchmarks.tables import format_table
from benchmarks.timing import Runner, interleaved, log, median, rounded, significant
from cnn_jax import parallel
from cnn_jax import steps as steps_lib
from cnn_jax.data.augment import AugmentConfig
from cnn_jax.models import build_model

try:  # torch is optional: without it the JAX side runs alone.
    import torch

    from benchmarks import torch_models
except ImportError:
    torch = torch_models = None


def _flops(compiled) -> float | None:
    """FLOPs of one call from XLA's cost analysis (None where the backend gives none)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get('flops')
    return float(flops) if flops and flops > 0 else None


def jax_runners(
    case: Case, dtype: str = 'float32', seed: int = 0, steps_per_epoch: int = 8
) -> tuple[dict[str, Runner], dict[str, Any]]:
    """The 'synthetic' and 'pipeline' runners of `case` and what their compilation measured.

    Both use cnn_jax's own code: `steps_lib.train_step` jitted with the state donated on a
    pre-made float batch, and `steps_lib.compile_steps(...).train` (gather + augment +
    normalise + step, state donated) called with a host step index as the training loop
    calls it.
    """
    config = case.config(dtype)
    mesh = parallel.make_mesh()
    model = build_model(config, case.num_classes)
    num_train = case.batch_size * steps_per_epoch
    rng = np.random.default_rng(seed)
    images_np = rng.integers(0, 256, (num_train, *case.data_shape), dtype=np.uint8)
    labels_np = rng.integers(0, case.num_classes, (num_train,), dtype=np.int32)
    channels = case.data_shape[-1]
    spec = steps_lib.InputSpec(
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        image_size=case.image_size,
        augment=AugmentConfig.from_config(config.augment),
    )
    key = jax.random.key(seed)
    state = steps_lib.create_train_state(config, model, case.input_shape, key, steps_per_epoch)
    state = jax.device_put(state, parallel.replicated(mesh))
    images = parallel.put_replicated(images_np, mesh)
    labels = parallel.put_replicated(labels_np, mesh)

    t0 = time.perf_counter()
    steps = steps_lib.compile_steps(config, mesh, spec, num_train, steps_per_epoch)
    perm = steps.permutation(key, 0)
    acc = jax.device_put(steps_lib.zero_metrics(), parallel.replicated(mesh))
    pipe_args = (images, labels, perm)
    pipe = steps.train.lower(state, acc, *pipe_args, np.int32(0), key).compile()
    compile_s = time.perf_counter() - t0

    batch = jax.device_put(spec.make_batch(images, labels, perm[0]), parallel.data_sharding(mesh))
    step_fn = functools.partial(
        steps_lib.train_step, loss=config.loss, label_smoothing=config.label_smoothing
    )
    synth_state = jax.tree.map(lambda x: x.copy(), state)
    synth = jax.jit(step_fn, donate_argnums=0).lower(synth_state, batch, key).compile()
    info = {
        'compile_s': compile_s,
        'flops_per_step': _flops(pipe),
        'model_flops_per_step': _flops(synth),
    }

    box = {'pipe': (state, acc), 'synth': synth_state, 's': 0}

    def run_pipeline(n: int) -> None:
        st, ac = box['pipe']
        for _ in range(n):
            st, ac = pipe(st, ac, *pipe_args, np.int32(box['s'] % steps_per_epoch), key)
            box['s'] += 1
        jax.block_until_ready((st, ac))
        box['pipe'] = (st, ac)

    def run_synthetic(n: int) -> None:
        st = box['synth']
        for _ in range(n):
            st, _ = synth(st, batch, key)
        jax.block_until_ready(st)
        box['synth'] = st

    return {'jax_synthetic': run_synthetic, 'jax_pipeline': run_pipeline}, info


def synthetic_runner(model: str, side: str) -> Runner:
    """One side's synthetic train step of CASES[model], for a child process that measures
    it alone: cnn_jax's ('jax': `jax_synthetic`) or torch eager's ('torch')."""
    if side == 'jax':
        return jax_runners(CASES[model])[0]['jax_synthetic']
    return torch_runners(CASES[model], compile_model=False)[0]['torch_eager']


def torch_model(case: Case, dtype: str = 'float32') -> torch.nn.Module:
    """The architecture of `case` in torch.nn (read from the Flax module's fields)."""
    if torch_models is None:
        raise ImportError('torch is not installed')
    module = build_model(case.config(dtype), case.num_classes)
    return torch_models.twin(module, case.input_shape, case.num_classes)


def torch_runners(
    case: Case, dtype: str = 'float32', compile_model: bool = True, seed: int = 0
) -> tuple[dict[str, Runner], dict[str, Any]]:
    """'torch_eager' (and 'torch_compile' when it works) runners of `case`'s train step."""
    if torch is None:
        return {}, {'torch': 'not installed'}
    torch.manual_seed(seed)
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if device == 'cuda':
        torch.backends.cudnn.benchmark = True
    h, w, c = case.input_shape
    x = torch.randn(case.batch_size, c, h, w, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, case.num_classes, (case.batch_size,), device=device)
    autocast = dtype == 'bfloat16'

    def make(compiled: bool) -> Runner:
        model = torch_model(case, dtype).to(device).to(memory_format=torch.channels_last)
        model.train()
        opt = torch.optim.SGD(
            model.parameters(),
            lr=case.learning_rate,
            momentum=case.momentum if case.optimizer != 'sgd' else 0.0,
            weight_decay=case.weight_decay,
        )
        net = torch.compile(model) if compiled else model

        def run(n: int) -> None:
            for _ in range(n):
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device, torch.bfloat16, enabled=autocast):
                    loss = torch.nn.functional.cross_entropy(net(x), y)
                loss.backward()
                opt.step()
            if device == 'cuda':
                torch.cuda.synchronize()

        return run

    runners = {'torch_eager': make(False)}
    info: dict[str, Any] = {'torch_device': device}
    if compile_model:
        try:
            run = make(True)
            t0 = time.perf_counter()
            run(2)  # Compiles forward and backward.
            info['torch_compile_s'] = time.perf_counter() - t0
            runners['torch_compile'] = run
        except Exception as e:  # noqa: BLE001 - inductor needs a compiler, may not support it
            info['torch_compile_error'] = f'{type(e).__name__}: {str(e)[:300]}'
    return runners, info


def forward_backward_split(
    name: str,
    steps: int = 3,
    windows: int = 5,
    warmup: int = 2,
    settle_s: float = 0.2,
    window_s: float = 1.0,
) -> dict[str, Any]:
    """Milliseconds of a training-mode forward pass and of forward + backward, JAX and torch.

    Shows which half of the step a ratio below 1 comes from: same model, input and batch
    as `name`'s case; no optimiser, loss = sum of the logits; windows interleaved.
    """
    case = CASES[name]
    model = build_model(case.config(), case.num_classes)
    x = jnp.asarray(
        np.random.default_rng(0).normal(size=(case.batch_size, *case.input_shape)), jnp.float32
    )
    variables = model.init(jax.random.key(0), x[:1], train=False)
    rngs = {'dropout': jax.random.key(1)}

    def forward(params, x):
        v = {**variables, 'params': params}
        return model.apply(v, x, train=True, mutable=['batch_stats'], rngs=rngs)[0]

    fwd = jax.jit(forward)
    grad = jax.jit(jax.grad(lambda p, x: forward(p, x).sum()))
    params = variables['params']

    def repeat(fn):
        def run(n: int) -> None:
            for _ in range(n):
                out = fn(params, x)
            jax.block_until_ready(out)

        return run

    runners = {'jax_forward': repeat(fwd), 'jax_forward_backward': repeat(grad)}
    if torch is not None:
        net = torch_model(case).to(memory_format=torch.channels_last).train()
        h, w, c = case.input_shape
        tx = torch.randn(case.batch_size, c, h, w).contiguous(memory_format=torch.channels_last)

        def torch_forward(n: int) -> None:
            with torch.no_grad():
                for _ in range(n):
                    net(tx)

        def torch_forward_backward(n: int) -> None:
            for _ in range(n):
                net.zero_grad(set_to_none=True)
                net(tx).sum().backward()

        runners.update(torch_forward=torch_forward, torch_forward_backward=torch_forward_backward)
    times, per_window = interleaved(runners, steps, windows, warmup, settle_s, window_s)
    ms = {k: 1000 * statistics.median(t) / per_window[k] for k, t in times.items()}
    out: dict[str, Any] = {
        'model': name,
        'batch': case.batch_size,
        **{f'{k}_ms': significant(v) for k, v in ms.items()},
    }
    if torch is not None:
        out['forward_speed_ratio'] = significant(ms['torch_forward'] / ms['jax_forward'], 3)
        jax_bwd = ms['jax_forward_backward'] - ms['jax_forward']
        torch_bwd = ms['torch_forward_backward'] - ms['torch_forward']
        out['backward_speed_ratio'] = significant(torch_bwd / jax_bwd, 3) if jax_bwd > 0 else None
    return out


def measure_case(
    case: Case,
    *,
    steps: int = 5,
    windows: int = 5,
    warmup: int = 2,
    dtype: str = 'float32',
    torch_mode: str = 'eager+compile',
    settle_s: float = 0.2,
    window_s: float = 1.0,
) -> dict[str, Any]:
    """Every figure of one table row for `case` (see the module docstring)."""
    runners, info = jax_runners(case, dtype)
    if torch_mode == 'eager-process' and torch is not None:
        runners['torch_eager'], t_info = torch_process.eager_runner(case, dtype)
        info.update(t_info)
    elif torch_mode != 'none':
        t_runners, t_info = torch_runners(case, dtype, compile_model='compile' in torch_mode)
        runners.update(t_runners)
        info.update(t_info)
    times, per_window = interleaved(runners, steps, windows, max(warmup, 1), settle_s, window_s)
    ips = {k: [case.batch_size * per_window[k] / t for t in v] for k, v in times.items()}
    med = {k: median(v) for k, v in ips.items()}

    def paired(a: str, b: str) -> float | None:
        if a not in ips or b not in ips:
            return None
        return median([x / y for x, y in zip(ips[a], ips[b], strict=True)])

    # Pipeline overhead: extra time per step of the real step over the pre-made batch.
    overhead = paired('jax_synthetic', 'jax_pipeline')
    flops = info.get('flops_per_step')
    pipe_ips = med['jax_pipeline']
    achieved = flops * pipe_ips / case.batch_size / 1e12 if flops and pipe_ips else None
    dev = jax.devices()[0]
    peak = peak_tflops(dev.device_kind, dtype) if dev.platform != 'cpu' else None
    h, w, c = case.input_shape
    data = 'x'.join(map(str, case.data_shape))
    return {
        'model': case.name,
        'input': f'{h}x{w}x{c}' + (f' (from {data})' if case.image_size else ''),
        'batch': case.batch_size,
        'dtype': dtype,
        'augment': dict(case.augment),
        'note': case.note,
        'compile_s': rounded(info['compile_s']),
        'jax_synthetic_ips': rounded(med['jax_synthetic'], 1),
        'jax_pipeline_ips': rounded(pipe_ips, 1),
        'pipeline_overhead_pct': rounded((overhead - 1) * 100, 1) if overhead else None,
        'torch_eager_ips': rounded(med.get('torch_eager'), 1),
        'torch_compile_ips': rounded(med.get('torch_compile'), 1),
        'ratio_vs_torch_eager': rounded(paired('jax_pipeline', 'torch_eager'), 3),
        'ratio_vs_torch_compile': rounded(paired('jax_pipeline', 'torch_compile'), 3),
        'synthetic_ratio_vs_torch_eager': rounded(paired('jax_synthetic', 'torch_eager'), 3),
        'gflop_per_step': significant(flops / 1e9) if flops else None,
        'model_gflop_per_step': significant(info['model_flops_per_step'] / 1e9)
        if info.get('model_flops_per_step')
        else None,
        'achieved_tflops': significant(achieved),
        'peak_tflops': peak,
        'pct_of_peak': rounded(100 * achieved / peak, 1) if achieved and peak else None,
        'torch_compile_s': rounded(info.get('torch_compile_s')),
        'torch_compile_error': info.get('torch_compile_error'),
        'torch_device': info.get('torch_device'),
        'steps_per_window': per_window,
        'window_images_per_s': {k: [round(x, 1) for x in v] for k, v in ips.items()},
    }


def run_benchmark(
    models: Sequence[str],
    *,
    steps: int = 5,
    windows: int = 5,
    warmup: int = 2,
    dtype: str = 'float32',
    torch_mode: str = 'eager+compile',
    batch_sizes: dict[str, int] | None = None,
    settle_s: float = 0.2,
    window_s: float = 1.0,
    log: Callable[[str], None] = log,
) -> dict[str, Any]:
    """Measures every model in `models` (names of CASES); returns the JSON-able result."""
    unknown = [m for m in models if m not in CASES]
    if unknown:
        raise ValueError(f'unknown benchmark model(s) {unknown}; known: {", ".join(CASES)}')
    result = {
        'device': device_info(dtype),
        'settings': {
            'steps': steps,
            'windows': windows,
            'warmup': warmup,
            'dtype': dtype,
            'torch': torch_mode,
            'settle_s': settle_s,
            'window_s': window_s,
        },
        'results': [],
    }
    for name in models:
        case = CASES[name]
        if batch_sizes and name in batch_sizes:
            case = dataclasses.replace(case, batch_size=batch_sizes[name])
        log(f'benchmark: {name} {case.input_shape} batch {case.batch_size} ...')
        row = measure_case(
            case,
            steps=steps,
            windows=windows,
            warmup=warmup,
            dtype=dtype,
            torch_mode=torch_mode,
            settle_s=settle_s,
            window_s=window_s,
        )
        log(format_table([row]).splitlines()[-1])
        result['results'].append(row)
    return result

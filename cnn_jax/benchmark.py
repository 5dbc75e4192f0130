"""Training throughput of cnn_jax's compiled step, against PyTorch and the device's peak.

    python -m cnn_jax.benchmark                              # the experiments' models
    python -m cnn_jax.benchmark --models resnet20 --steps 5 --windows 7
    python -m cnn_jax.benchmark --quick --json /tmp/b.json   # a tiny model, seconds (tests)
    python -m cnn_jax.benchmark --compare-xla-flags --models simplenn,resnet20
    python -m cnn_jax.benchmark --sweep                      # vectorised sweeps, K = 1, 2, 4, 8
    python -m cnn_jax.benchmark --split --models resnet20    # forward vs backward, JAX vs torch

For each model at its experiment's input shape and batch size it measures:
- compile_s: tracing + lowering + XLA compilation of the real train step
  (`cnn_jax.train.compile_steps(...).train`);
- jax img/s (synthetic): `cnn_jax.train.train_step` on a device-resident float batch;
- jax img/s (pipeline): the real compiled step, which gathers the batch from a
  device-resident uint8 dataset, augments and normalises on the device (the experiment's
  augmentation, resize included), donating the state, called as the training loop calls it;
- torch img/s: the same architecture in torch.nn (NHWC via channels_last, SGD with the same
  hyperparameters, same batch), eager and under torch.compile where that works;
- GFLOP/step from XLA's cost analysis of the compiled step, achieved TFLOP/s, % of peak.

Throughput is the median over `--windows` timed windows of `--steps` steps each, after
warm-up, synchronised with `block_until_ready` (torch: `cuda.synchronize`). The windows of
all paths are interleaved round by round, and ratios are the median of per-round ratios,
so load from other processes on a shared machine hits both sides alike. Between paths the
process sleeps `--settle` seconds: XLA's and torch's CPU thread pools spin-wait after work,
and without a pause whichever runs second measured up to 5x slower on 2 cores.

Nothing here needs TensorFlow, TFDS or CLU: data is synthetic.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from cnn_jax.xla_cpu import RECOMMENDED_CPU_XLA_FLAGS, apply_xla_flags

# Dense peak TFLOP/s by device kind (substring of jax's device_kind) and compute dtype;
# float32 on NVIDIA GPUs is the TF32 tensor-core peak (XLA's default precision uses it).
# Sources: NVIDIA H100/H200/A100/L4 datasheets (SXM, without sparsity); Google Cloud TPU docs.
PEAK_TFLOPS: dict[str, dict[str, float]] = {
    'H200': {'bfloat16': 989.4, 'float32': 494.7},
    'H100 PCIe': {'bfloat16': 756.0, 'float32': 378.0},
    'H100': {'bfloat16': 989.4, 'float32': 494.7},
    'A100': {'bfloat16': 312.0, 'float32': 156.0},
    'L4': {'bfloat16': 121.0, 'float32': 60.0},
    'TPU v4': {'bfloat16': 275.0, 'float32': 275.0},
    'TPU v5 lite': {'bfloat16': 197.0, 'float32': 197.0},
    'TPU v5': {'bfloat16': 459.0, 'float32': 459.0},
    'TPU v6 lite': {'bfloat16': 918.0, 'float32': 918.0},
}

DEFAULT_MODELS_CPU = ('simplenn', 'cifar_cnn3', 'resnet20', 'vgg16')
DEFAULT_MODELS_ACCELERATOR = ('simplenn', 'cifar_cnn3', 'resnet20', 'vgg16', 'resnet50')
RESULTS_DIR = pathlib.Path('results') / 'benchmark'


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmarked model: its experiment's data shape, batch, optimiser and augmentation."""

    name: str
    model: str
    data_shape: tuple[int, int, int]  # Stored uint8 images (H, W, C).
    batch_size: int
    num_classes: int
    image_size: int | None = None  # Resized on the device to this (the model's input).
    options: tuple[tuple[str, Any], ...] = ()
    optimizer: str = 'momentum'
    learning_rate: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: tuple[tuple[str, Any], ...] = ()  # AugmentConfig fields.
    note: str = ''

    @property
    def input_shape(self) -> tuple[int, int, int]:
        h, w, c = self.data_shape
        return (self.image_size, self.image_size, c) if self.image_size else (h, w, c)

    def config(self, dtype: str = 'float32'):
        """The experiment config of this case (configs.default plus the case's settings)."""
        from configs import default

        c = default.get_config()
        c.model = self.model
        for key, value in self.options:
            c.model_options[key] = value
        c.dtype = dtype
        c.batch_size = self.batch_size
        c.image_size = self.image_size
        c.optimizer = self.optimizer
        c.learning_rate = self.learning_rate
        c.momentum = self.momentum
        c.weight_decay = self.weight_decay
        for key, value in self.augment:
            c.augment[key] = value
        return c


_CROP_FLIP = (('crop_padding', 4), ('flip', True))
# The experiments of notes/EXPERIMENTS.md at their configs' shapes and batch sizes.
CASES: dict[str, Case] = {
    'simplenn': Case(
        'simplenn',
        'simplenn',
        (32, 32, 3),
        64,
        10,
        weight_decay=1e-4,
        augment=_CROP_FLIP,
        note='E6; crop+flip as its augmentation ablation',
    ),
    'cifar_cnn3': Case(
        'cifar_cnn3',
        'cifar_cnn3',
        (32, 32, 3),
        64,
        10,
        optimizer='sgd',
        learning_rate=0.05,
        note='E10',
    ),
    'resnet20': Case(
        'resnet20',
        'resnet20',
        (32, 32, 3),
        128,
        10,
        learning_rate=0.1,
        weight_decay=1e-4,
        augment=_CROP_FLIP,
        note='E8',
    ),
    'vgg16': Case(
        'vgg16',
        'vgg16',
        (32, 32, 3),
        64,
        3,
        image_size=64,
        options=(('dropout_rate', 0.5),),
        weight_decay=5e-4,
        augment=(('flip', True), ('rotation_degrees', 10.0), ('scale', 0.1)),
        note='E1 augment rung: CIFAR 32x32 resized to 64 on the device',
    ),
    'resnet18': Case(
        'resnet18',
        'resnet18',
        (32, 32, 3),
        64,
        3,
        image_size=64,
        note='E1 ResNet-18: CIFAR 32x32 resized to 64 on the device; its last stage is 2x2',
    ),
    'resnet50': Case(
        'resnet50',
        'resnet50',
        (32, 32, 3),
        64,
        10,
        image_size=224,
        learning_rate=0.01,
        augment=(('flip', True),),
        note='E5: CIFAR resized to 224 on the device',
    ),
    'tiny': Case(
        'tiny',
        'small_cnn',
        (8, 8, 1),
        16,
        10,
        options=(('features', (4,)), ('dense', 16)),
        augment=(('flip', True),),
        note='smoke test',
    ),
}


# --- Environment ----------------------------------------------------------------------


def _torch():
    """torch, or None when it is not installed (the JAX side runs alone then)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def device_info(dtype: str = 'float32') -> dict[str, Any]:
    import jax

    dev = jax.devices()[0]
    torch = _torch()
    peak = peak_tflops(dev.device_kind, dtype) if dev.platform != 'cpu' else None
    return {
        'platform': dev.platform,
        'device_kind': dev.device_kind,
        'num_devices': jax.device_count(),
        'cpu_count': os.cpu_count(),
        'processor': platform.processor() or platform.machine(),
        'jax': jax.__version__,
        'torch': torch.__version__ if torch else None,
        'torch_threads': torch.get_num_threads() if torch else None,
        'xla_flags': os.environ.get('XLA_FLAGS', ''),
        'peak_tflops': peak,
        'load_average': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None,
    }


def peak_tflops(device_kind: str, dtype: str) -> float | None:
    """The device's dense peak for `dtype` from PEAK_TFLOPS, or None if not listed."""
    for key, peaks in PEAK_TFLOPS.items():  # Ordered: 'H100 PCIe' before 'H100'.
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


# --- Timing ---------------------------------------------------------------------------

Runner = Callable[[int], None]  # Runs n steps and waits for them to finish.


def time_window(run: Runner, steps: int) -> float:
    """Seconds for `steps` steps, synchronised at the end by the runner."""
    t0 = time.perf_counter()
    run(steps)
    return time.perf_counter() - t0


def interleaved(
    runners: dict[str, Runner],
    steps: int,
    windows: int,
    warmup: int,
    settle_s: float,
    window_s: float = 0.0,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per window of every runner, the runners taking turns window by window.

    Each runner gets at least `steps` steps per window, more if needed to fill `window_s`
    seconds (judged from its last warm-up step): windows of a few milliseconds measure the
    scheduler more than the step. Returns the times and each runner's steps per window.
    """
    per_window = {}
    for name, run in runners.items():
        if warmup > 1:
            run(warmup - 1)
        one = time_window(run, 1)
        per_window[name] = max(steps, math.ceil(window_s / one)) if one > 0 else steps
        time.sleep(settle_s)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(windows):
        for name, run in runners.items():
            times[name].append(time_window(run, per_window[name]))
            time.sleep(settle_s)
    return times, per_window


def _median(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def _log(message: str) -> None:
    print(message, flush=True)


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def _sig(x: float | None, digits: int = 4) -> float | None:
    """`x` to `digits` significant digits (tiny FLOP counts must not round to 0)."""
    return None if x is None else float(f'{x:.{digits}g}')


# --- JAX side -------------------------------------------------------------------------


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

    Both use cnn_jax's own code: `train.train_step` jitted with the state donated on a
    pre-made float batch, and `train.compile_steps(...).train` (gather + augment +
    normalise + step, state donated) called with a host step index as the training loop
    calls it.
    """
    import jax
    import numpy as np

    from cnn_jax import experiment, parallel, train
    from cnn_jax.data.augment import AugmentConfig

    config = case.config(dtype)
    mesh = parallel.make_mesh()
    model = experiment.build_model(config, case.num_classes)
    num_train = case.batch_size * steps_per_epoch
    rng = np.random.default_rng(seed)
    images_np = rng.integers(0, 256, (num_train, *case.data_shape), dtype=np.uint8)
    labels_np = rng.integers(0, case.num_classes, (num_train,), dtype=np.int32)
    channels = case.data_shape[-1]
    spec = train.InputSpec(
        mean=(0.5,) * channels,
        std=(0.25,) * channels,
        image_size=case.image_size,
        augment=AugmentConfig.from_config(config.augment),
    )
    key = jax.random.key(seed)
    state = train.create_train_state(config, model, case.input_shape, key, steps_per_epoch)
    state = jax.device_put(state, parallel.replicated(mesh))
    images = parallel.put_replicated(images_np, mesh)
    labels = parallel.put_replicated(labels_np, mesh)

    t0 = time.perf_counter()
    steps = train.compile_steps(config, mesh, spec, num_train, steps_per_epoch)
    perm = steps.permutation(key, 0)
    acc = jax.device_put(train.zero_metrics(), parallel.replicated(mesh))
    pipe_args = (images, labels, perm)
    pipe = steps.train.lower(state, acc, *pipe_args, np.int32(0), key).compile()
    compile_s = time.perf_counter() - t0

    batch = jax.device_put(spec.make_batch(images, labels, perm[0]), parallel.data_sharding(mesh))
    step_fn = functools.partial(
        train.train_step, loss=config.loss, label_smoothing=config.label_smoothing
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


# --- PyTorch side ---------------------------------------------------------------------


def torch_model(case: Case, dtype: str = 'float32'):
    """The architecture of `case` in torch.nn (read from the Flax module's fields)."""
    torch = _torch()
    if torch is None:
        raise ImportError('torch is not installed')
    from cnn_jax import experiment

    nn = torch.nn
    module = experiment.build_model(case.config(dtype), case.num_classes)
    acts = {
        'relu': nn.ReLU,
        'tanh': nn.Tanh,
        'sigmoid': nn.Sigmoid,
        'swish': nn.SiLU,
        'leaky_relu': nn.LeakyReLU,
        'identity': nn.Identity,
        'gelu': nn.GELU,
    }
    h, _, c = case.input_shape
    kind = type(module).__name__
    if kind == 'BlockCNN':
        act = acts[module.activation]
        layers, size = [], h
        for f, k in zip(module.features, module.kernel_sizes, strict=True):
            p = k // 2 if module.padding == 'same' else 0
            layers += [nn.Conv2d(c, f, k, padding=p)]
            if 'batchnorm' in module.norm:
                layers.append(nn.BatchNorm2d(f))
            if 'dropout' in module.norm:
                layers.append(nn.Dropout2d(module.norm_rate))
            layers += [act(), nn.MaxPool2d(2)]
            c, size = f, (size + 2 * p - k + 1) // 2
        layers.append(nn.Flatten())
        width = c * size * size
        for f in module.hidden:
            layers.append(nn.Linear(width, f))
            if 'batchnorm' in module.dense_norm:
                layers.append(nn.BatchNorm1d(f))
            layers.append(act())
            if module.dropout_rate:
                layers.append(nn.Dropout(module.dropout_rate))
            width = f
        layers.append(nn.Linear(width, case.num_classes))
        return nn.Sequential(*layers)
    if kind == 'SmallCNN':
        layers, size = [], h
        for f in module.features:
            layers += [nn.Conv2d(c, f, 3, padding=1, bias=not module.use_bn)]
            if module.use_bn:
                layers.append(nn.BatchNorm2d(f))
            layers.append(nn.ReLU())
            if size >= 4:
                layers.append(nn.MaxPool2d(2))
                size //= 2
            c = f
        return nn.Sequential(
            *layers,
            nn.Flatten(),
            nn.Linear(c * size * size, module.dense),
            nn.ReLU(),
            nn.Dropout(module.dropout_rate),
            nn.Linear(module.dense, case.num_classes),
        )
    if kind == 'VGG':
        act = acts[module.activation]
        layers, size = [], h
        for layer in module.layers:
            if layer == 'M':
                layers.append(nn.MaxPool2d(2))
                size //= 2
                continue
            layers.append(nn.Conv2d(c, int(layer), 3, padding=1))
            if 'batchnorm' in module.norm:
                layers.append(nn.BatchNorm2d(int(layer)))
            layers.append(act())
            c = int(layer)
        hidden = module.hidden
        return nn.Sequential(
            *layers,
            nn.Flatten(),
            nn.Linear(c * size * size, hidden),
            act(),
            nn.Dropout(module.dropout_rate),
            nn.Linear(hidden, hidden),
            act(),
            nn.Dropout(module.dropout_rate),
            nn.Linear(hidden, case.num_classes),
        )
    if kind == 'ResNet':
        return _torch_resnet(torch, module, c, case.num_classes)
    raise ValueError(f'no PyTorch twin for model {case.model!r} ({kind})')


def _torch_resnet(torch, module, in_channels: int, num_classes: int):
    nn = torch.nn
    imagenet = module.layout == 'imagenet'
    bottleneck = module.block == 'bottleneck'
    expansion = 4 if bottleneck else 1

    class Block(nn.Module):
        def __init__(self, cin: int, width: int, stride: int):
            super().__init__()
            cout = width * expansion
            if bottleneck:
                convs = [(cin, width, 1, 1), (width, width, 3, stride), (width, cout, 1, 1)]
            else:
                convs = [(cin, width, 3, stride), (width, width, 3, 1)]
            body = []
            for i, (a, b, k, s) in enumerate(convs):
                body += [nn.Conv2d(a, b, k, s, k // 2, bias=False), nn.BatchNorm2d(b)]
                if i < len(convs) - 1:
                    body.append(nn.ReLU(inplace=True))
            self.body = nn.Sequential(*body)
            self.down = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x):
            return torch.relu(self.body(x) + self.down(x))

    width = module.width or (64 if imagenet else 16)
    layers = [
        nn.Conv2d(
            in_channels,
            width,
            7 if imagenet else 3,
            2 if imagenet else 1,
            3 if imagenet else 1,
            bias=False,
        ),
        nn.BatchNorm2d(width),
        nn.ReLU(),
    ]
    if imagenet:
        layers.append(nn.MaxPool2d(3, 2, 1))
    cin = width
    for i, n in enumerate(module.stage_sizes):
        for j in range(n):
            layers.append(Block(cin, width * 2**i, 2 if i > 0 and j == 0 else 1))
            cin = width * 2**i * expansion
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)]
    return nn.Sequential(*layers)


def torch_runners(
    case: Case, dtype: str = 'float32', compile_model: bool = True, seed: int = 0
) -> tuple[dict[str, Runner], dict[str, Any]]:
    """'torch_eager' (and 'torch_compile' when it works) runners of `case`'s train step."""
    torch = _torch()
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
    import jax
    import jax.numpy as jnp
    import numpy as np

    from cnn_jax import experiment

    case = CASES[name]
    model = experiment.build_model(case.config(), case.num_classes)
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
    torch = _torch()
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
        **{f'{k}_ms': _sig(v) for k, v in ms.items()},
    }
    if torch is not None:
        out['forward_speed_ratio'] = _sig(ms['torch_forward'] / ms['jax_forward'], 3)
        jax_bwd = ms['jax_forward_backward'] - ms['jax_forward']
        torch_bwd = ms['torch_forward_backward'] - ms['torch_forward']
        out['backward_speed_ratio'] = _sig(torch_bwd / jax_bwd, 3) if jax_bwd > 0 else None
    return out


# --- One model ------------------------------------------------------------------------


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
    if torch_mode != 'none':
        t_runners, t_info = torch_runners(case, dtype, compile_model='compile' in torch_mode)
        runners.update(t_runners)
        info.update(t_info)
    times, per_window = interleaved(runners, steps, windows, max(warmup, 1), settle_s, window_s)
    ips = {k: [case.batch_size * per_window[k] / t for t in v] for k, v in times.items()}
    med = {k: _median(v) for k, v in ips.items()}

    def paired(a: str, b: str) -> float | None:
        if a not in ips or b not in ips:
            return None
        return _median([x / y for x, y in zip(ips[a], ips[b], strict=True)])

    # Pipeline overhead: extra time per step of the real step over the pre-made batch.
    overhead = paired('jax_synthetic', 'jax_pipeline')
    flops = info.get('flops_per_step')
    pipe_ips = med['jax_pipeline']
    achieved = flops * pipe_ips / case.batch_size / 1e12 if flops and pipe_ips else None
    import jax

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
        'compile_s': _round(info['compile_s']),
        'jax_synthetic_ips': _round(med['jax_synthetic'], 1),
        'jax_pipeline_ips': _round(pipe_ips, 1),
        'pipeline_overhead_pct': _round((overhead - 1) * 100, 1) if overhead else None,
        'torch_eager_ips': _round(med.get('torch_eager'), 1),
        'torch_compile_ips': _round(med.get('torch_compile'), 1),
        'ratio_vs_torch_eager': _round(paired('jax_pipeline', 'torch_eager'), 3),
        'ratio_vs_torch_compile': _round(paired('jax_pipeline', 'torch_compile'), 3),
        'synthetic_ratio_vs_torch_eager': _round(paired('jax_synthetic', 'torch_eager'), 3),
        'gflop_per_step': _sig(flops / 1e9) if flops else None,
        'model_gflop_per_step': _sig(info['model_flops_per_step'] / 1e9)
        if info.get('model_flops_per_step')
        else None,
        'achieved_tflops': _sig(achieved),
        'peak_tflops': peak,
        'pct_of_peak': _round(100 * achieved / peak, 1) if achieved and peak else None,
        'torch_compile_s': _round(info.get('torch_compile_s')),
        'torch_compile_error': info.get('torch_compile_error'),
        'torch_device': info.get('torch_device'),
        'steps_per_window': per_window,
        'window_images_per_s': {k: [round(x, 1) for x in v] for k, v in ips.items()},
    }


# --- Table ----------------------------------------------------------------------------

COLUMNS = (
    ('model', 'model'),
    ('input', 'input'),
    ('batch', 'batch'),
    ('compile_s', 'compile_s'),
    ('jax_synthetic_ips', 'jax img/s (synthetic)'),
    ('jax_pipeline_ips', 'jax img/s (pipeline)'),
    ('pipeline_overhead_pct', 'pipeline overhead %'),
    ('torch_eager_ips', 'torch eager img/s'),
    ('torch_compile_ips', 'torch.compile img/s'),
    ('ratio_vs_torch_eager', 'ratio jax/torch'),
    ('ratio_vs_torch_compile', 'ratio jax/torch.compile'),
    ('gflop_per_step', 'GFLOP/step'),
    ('achieved_tflops', 'achieved TFLOP/s'),
    ('pct_of_peak', '% of peak'),
)


def _cell(v: Any) -> str:
    if v is None:
        return 'n/a'
    if isinstance(v, float):
        return f'{v:.4g}' if abs(v) < 1000 else f'{v:,.0f}'
    return str(v)


def format_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]] = COLUMNS
) -> str:
    """The benchmark rows as a Markdown table: (key, header) `columns`."""
    lines = ['| ' + ' | '.join(h for _, h in columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(_cell(r.get(k)) for k, _ in columns) + ' |' for r in rows]
    return '\n'.join(lines)


def describe(result: dict[str, Any]) -> str:
    """The table with a header naming the device and the settings, as Markdown."""
    d, s = result['device'], result['settings']
    lines = [
        f'# cnn_jax training throughput on {d["device_kind"]} ({d["platform"]}, '
        f'{d["num_devices"]} device(s), {d["cpu_count"]} CPU cores)',
        '',
        f'jax {d["jax"]}, torch {d["torch"]} ({d["torch_threads"]} threads); dtype '
        f'{s["dtype"]}; median of {s["windows"]} interleaved windows of {s["steps"]} steps '
        f'after {s["warmup"]} warm-up steps; XLA_FLAGS={d["xla_flags"]!r}; load average at '
        f'start {d["load_average"]}.',
        '',
        'ratio = jax img/s through the real input pipeline (gather + augment + normalise on '
        'the device) / torch img/s on a pre-made batch, median of per-window ratios.',
        '',
        format_table(result['results']),
    ]
    errors = [
        f'- {r["model"]}: torch.compile failed: {r["torch_compile_error"]}'
        for r in result['results']
        if r.get('torch_compile_error')
    ]
    if errors:
        lines += ['', *errors]
    return '\n'.join(lines) + '\n'


# --- Entry points ---------------------------------------------------------------------


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
    log: Callable[[str], None] = _log,
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


def compare_xla_flags(
    models: Sequence[str],
    variants: Sequence[str],
    *,
    steps: int,
    windows: int,
    repeats: int = 2,
    log: Callable[[str], None] = _log,
) -> dict[str, Any]:
    """Each XLA_FLAGS variant in a fresh process (A, B, ..., A, B, ...), torch eager alongside.

    XLA reads its flags once per process, so variants cannot share one. The jax/torch ratio
    of each process normalises away the machine's load at the time it ran.
    """
    import tempfile

    runs = []
    for rep in range(repeats):
        for flags in variants:
            with tempfile.TemporaryDirectory() as tmp:
                out = pathlib.Path(tmp) / 'b.json'
                cmd = [
                    sys.executable,
                    '-m',
                    'cnn_jax.benchmark',
                    '--models',
                    ','.join(models),
                    '--steps',
                    str(steps),
                    '--windows',
                    str(windows),
                    '--torch',
                    'eager',
                    '--json',
                    str(out),
                    '--markdown',
                    '',
                    f'--xla-flags={flags}',  # '=': the value starts with '--'.
                ]
                env = {**os.environ, 'XLA_FLAGS': ''}
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    log(f'xla flags {flags!r}: failed\n{proc.stderr[-2000:]}')
                    continue
                rows = json.loads(out.read_text())['results']
            for r in rows:
                runs.append(
                    {
                        'flags': flags,
                        'repeat': rep,
                        'model': r['model'],
                        'jax_synthetic_ips': r['jax_synthetic_ips'],
                        'jax_pipeline_ips': r['jax_pipeline_ips'],
                        'torch_eager_ips': r['torch_eager_ips'],
                        'ratio_vs_torch_eager': r['ratio_vs_torch_eager'],
                        'compile_s': r['compile_s'],
                    }
                )
                log(
                    f'{flags or "(none)"!s:60} {r["model"]:10} jax {r["jax_pipeline_ips"]} '
                    f'img/s, torch {r["torch_eager_ips"]}, ratio {r["ratio_vs_torch_eager"]}, '
                    f'compile {r["compile_s"]} s'
                )
    return {'device': device_info(), 'variants': list(variants), 'runs': runs}


def format_flag_table(result: dict[str, Any]) -> str:
    lines = [
        '| XLA_FLAGS | model | jax img/s (pipeline) | torch eager img/s | '
        'ratio jax/torch (median over repeats) | compile_s |',
        '|---|---|---|---|---|---|',
    ]
    for flags in result['variants']:
        models = dict.fromkeys(r['model'] for r in result['runs'] if r['flags'] == flags)
        for m in models:
            rs = [r for r in result['runs'] if r['flags'] == flags and r['model'] == m]
            cells = [
                f'`{flags}`' if flags else '(none)',
                m,
                ' / '.join(_cell(r['jax_pipeline_ips']) for r in rs),
                ' / '.join(_cell(r['torch_eager_ips']) for r in rs),
                _cell(_median([r['ratio_vs_torch_eager'] or math.nan for r in rs])),
                ' / '.join(_cell(r['compile_s']) for r in rs),
            ]
            lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines) + '\n'


# XLA CPU options tried by --compare-xla-flags (each in its own process).
FLAG_VARIANTS = (
    '',
    '--xla_cpu_experimental_ynn_fusion_type=',
    '--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_enable_fast_math=true',
    '--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_multi_thread_eigen=false',
    '--xla_cpu_use_onednn=true',
)


def _parse_batch_sizes(text: str) -> dict[str, int]:
    out = {}
    for item in filter(None, (t.strip() for t in text.split(','))):
        name, _, value = item.partition('=')
        out[name] = int(value)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog='python -m cnn_jax.benchmark',
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        '--models',
        default='',
        help='comma-separated, from: '
        + ', '.join(CASES)
        + "; default: the experiments' models (resnet50 on accelerators only)",
    )
    p.add_argument(
        '--batch-size',
        default='',
        help='overrides, e.g. resnet20=256,vgg16=32 (or one number for all)',
    )
    p.add_argument('--steps', type=int, default=5, help='steps per timed window')
    p.add_argument('--windows', type=int, default=5, help='timed windows per path')
    p.add_argument('--warmup', type=int, default=2, help='untimed steps per path first')
    p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'))
    p.add_argument('--torch', default='eager+compile', choices=('eager+compile', 'eager', 'none'))
    p.add_argument(
        '--settle',
        type=float,
        default=0.2,
        help='seconds of idle between paths (thread pools stop spinning)',
    )
    p.add_argument(
        '--json',
        default=None,
        help='JSON output path (default: results/benchmark/benchmark_<platform>.json; "" for none)',
    )
    p.add_argument(
        '--markdown',
        default=None,
        help='Markdown table path (default: the JSON path with .md; "" for none)',
    )
    p.add_argument(
        '--quick',
        action='store_true',
        help='a tiny model, 2 steps x 2 windows, eager torch only (smoke test)',
    )
    p.add_argument(
        '--xla-flags',
        default=None,
        help='XLA flags to add (default on CPU: RECOMMENDED_CPU_XLA_FLAGS; "" none)',
    )
    p.add_argument(
        '--compare-xla-flags',
        action='store_true',
        help='time each of FLAG_VARIANTS in its own process',
    )
    p.add_argument(
        '--split',
        action='store_true',
        help='forward vs forward + backward, JAX and torch (where a ratio comes from)',
    )
    p.add_argument(
        '--sweep',
        action='store_true',
        help='vectorised sweep: per-variant throughput for K variants vs K runs',
    )
    p.add_argument('--sweep-k', default='1,2,4,8')
    p.add_argument(
        '--sweep-groups',
        default='',
        help='also time K as vmapped groups of these sizes, e.g. 2,4 (see sweep.py)',
    )
    p.add_argument(
        '--window-s',
        type=float,
        default=1.0,
        help='each window runs at least --steps steps and at least this many seconds',
    )
    args = p.parse_args(argv)

    flags = RECOMMENDED_CPU_XLA_FLAGS if args.xla_flags is None else tuple(args.xla_flags.split())
    if not apply_xla_flags(flags):
        print('benchmark: JAX already started; XLA_FLAGS unchanged', file=sys.stderr)
    import jax

    platform_name = jax.devices()[0].platform
    if args.quick:
        models = args.models.split(',') if args.models else ['tiny']
        args.steps, args.windows, args.warmup, args.window_s = 2, 2, 1, 0.0
        if args.torch == 'eager+compile':
            args.torch = 'eager'
    elif args.models:
        models = args.models.split(',')
    else:
        models = list(DEFAULT_MODELS_CPU if platform_name == 'cpu' else DEFAULT_MODELS_ACCELERATOR)
    if args.batch_size.isdigit():
        batch_sizes = dict.fromkeys(models, int(args.batch_size))
    else:
        batch_sizes = _parse_batch_sizes(args.batch_size)

    stem = 'benchmark'
    if args.compare_xla_flags:
        result = compare_xla_flags(models, FLAG_VARIANTS, steps=args.steps, windows=args.windows)
        table, stem = format_flag_table(result), 'xla_flags'
    elif args.split:
        rows = [
            forward_backward_split(
                m, args.steps, args.windows, args.warmup, args.settle, args.window_s
            )
            for m in models
        ]
        result = {'device': device_info(), 'results': rows}
        table = format_table(rows, [(k, k) for k in rows[0]])
        stem = 'split'
    elif args.sweep:
        from cnn_jax import sweep

        ks = [int(k) for k in args.sweep_k.split(',')]
        name = models[0] if args.models or args.quick else 'simplenn'
        case = CASES[name]
        if name in batch_sizes:
            case = dataclasses.replace(case, batch_size=batch_sizes[name])
        result = sweep.benchmark_vectorized(
            case.config(args.dtype),
            case.input_shape,
            case.num_classes,
            ks,
            steps=args.steps,
            windows=args.windows,
            warmup=args.warmup,
            settle_s=args.settle,
            window_s=args.window_s,
            group_sizes=[None] + [int(g) for g in args.sweep_groups.split(',') if g],
        )
        result['device'] = device_info(args.dtype)
        table, stem = sweep.format_benchmark(result), 'sweep'
    else:
        result = run_benchmark(
            models,
            steps=args.steps,
            windows=args.windows,
            warmup=args.warmup,
            dtype=args.dtype,
            torch_mode=args.torch,
            batch_sizes=batch_sizes,
            settle_s=args.settle,
            window_s=args.window_s,
        )
        table = describe(result)
    print()
    print(table)
    json_path = args.json
    if json_path is None:
        json_path = str(RESULTS_DIR / f'{stem}_{platform_name}.json')
    if json_path:
        path = pathlib.Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + '\n')
        print(f'wrote {path}')
    md_path = args.markdown
    if md_path is None and json_path:
        md_path = str(pathlib.Path(json_path).with_suffix('.md'))
    if md_path:
        pathlib.Path(md_path).write_text(table)
        print(f'wrote {md_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

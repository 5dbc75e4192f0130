"""Host input pipeline against training: does decoding feed the model, and how many cores would?

    python -m benchmarks.input_pipeline --cifar folder:PATH/cifar10-jpeg.tar.gz [--quick]

Measures `cnn_jax.data.stream.FolderStream`'s host pipeline (JPEG decode, resize, batch;
no device transfer, no training) in images/s with 1 and 2 decode threads for
(i) the CIFAR-10 JPEG folder at 32 px and (ii) a 224 px JPEG folder generated from it
(CIFAR images upscaled with Pillow bicubic, written as JPEG quality 90, into --cache), and
the training images/s of this CPU (device-resident input, on-device augmentation) for a
small CIFAR model at 32 px and ResNet-50 at 224 px. From these: images/s per core, the
host cores that keep one H100 training ResNet-50 at 3,000 images/s fed (3000 / per-core
rate), and whether the pipeline or the model limits a run on this CPU, and by how much.
Writes --out/input_pipeline.md and .json. Measure on an idle machine: the figures of a
busy one say little. --quick is a smoke run (a few hundred images, a step or two).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import numpy as np

H100_RESNET50_IMAGES_PER_S = 3000.0


def pipeline_rate(stream, batch_size: int, images: int, workers: int) -> float:
    """Images/s of decode + resize + batch over the first `images` examples of `stream`."""
    stream.workers = workers
    steps = max(1, images // batch_size)
    order = np.arange(steps * batch_size).reshape(steps, batch_size) % len(stream)
    next(iter(stream.train(order[:1])))  # Warm-up: thread pool, first file reads.
    t0 = time.perf_counter()
    count = sum(len(b.labels) for b in stream.train(order))
    return count / (time.perf_counter() - t0)


def make_upscaled_folder(source, target: pathlib.Path, size: int, per_split: int) -> None:
    """`per_split` images of each split of the stream pair `source`, upscaled, as JPEGs."""
    from PIL import Image

    if (target / '.complete').exists():
        return
    for split, s in zip(('train', 'test'), source, strict=True):
        n = min(per_split, len(s))
        pixels = s.examples(np.arange(n))
        for i in range(n):
            folder = target / split / s.class_names[s.labels[i]]
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(pixels[i]).resize((size, size), Image.BICUBIC)
            image.save(folder / f'{i:05d}.jpg', quality=90)
    (target / '.complete').touch()


def training_rate(model: str, size: int, batch_size: int, steps: int, **options) -> float:
    """Training images/s of `model` on this CPU's devices: random uint8 data held on the
    devices, flips and crops on the device (as a CIFAR or ImageNet run augments)."""
    import jax

    from cnn_jax import parallel
    from cnn_jax import steps as steps_lib
    from cnn_jax.data.augment import AugmentConfig
    from cnn_jax.models import build_model
    from configs import default

    config = default.get_config()
    config.update(model=model, batch_size=batch_size, optimizer='momentum')
    config.model_options.update(options)
    mesh = parallel.make_mesh(jax.devices()[:1])  # One CPU device uses every core.
    n = batch_size * 2
    images = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), np.uint8)
    spec = steps_lib.InputSpec(
        (0.5,) * 3, (0.25,) * 3, augment=AugmentConfig(flip=True, crop_padding=4)
    )
    steps_ = steps_lib.plain_steps(
        [config], build_model(config, 10), (size, size, 3), spec, mesh, n, 2
    )
    state, acc = jax.device_put((steps_.state, steps_.zero_metrics()), parallel.replicated(mesh))
    x, y = (parallel.put_replicated(a, mesh) for a in (images, np.arange(n) % 10))
    perm = steps_.permutation(0)

    def run(k: int):
        nonlocal state, acc
        for s in range(k):
            state, acc = steps_.train(state, acc, x, y, perm, np.int32(s % 2), steps_.rng, None)
        jax.block_until_ready(acc)

    run(1)  # Compilation.
    t0 = time.perf_counter()
    run(steps)
    return steps * batch_size / (time.perf_counter() - t0)


def measure(args: argparse.Namespace) -> dict:
    from cnn_jax.data.resolve import parse_source

    quick = args.quick
    n_images = 256 if quick else args.images
    cifar = [parse_source(args.cifar).stream(split, process_count=1) for split in ('train', 'test')]
    big_root = pathlib.Path(args.cache).expanduser() / f'cifar{args.size}-jpeg-{n_images}'
    make_upscaled_folder(cifar, big_root, args.size, n_images)
    big = parse_source(f'folder:{big_root}').stream('train', process_count=1)
    folders = {'cifar10_32px': (cifar[0], 32), f'cifar10_upscaled_{args.size}px': (big, args.size)}
    out: dict = {
        'machine': {
            'cpu_count': os.cpu_count(),
            'processor': platform.processor() or platform.machine(),
            'python': platform.python_version(),
        },
        'quick': quick,
        'pipeline': {},
        'training': {},
    }
    for name, (s, _) in folders.items():
        rates = {w: pipeline_rate(s, args.batch_size, n_images, w) for w in (1, 2)}
        out['pipeline'][name] = {
            'images': n_images,
            'images_per_s_1_thread': round(rates[1], 1),
            'images_per_s_2_threads': round(rates[2], 1),
            'images_per_s_per_core': round(rates[1], 1),
        }
    steps = 2 if quick else args.steps
    out['training']['cifar_cnn4_32px'] = round(
        training_rate('cifar_cnn4', 32, args.batch_size, steps * 5), 1
    )
    big_batch = 4 if quick else args.resnet_batch
    out['training'][f'resnet50_{args.size}px'] = round(
        training_rate('resnet50', args.size, big_batch, steps), 1
    )
    per_core = out['pipeline'][f'cifar10_upscaled_{args.size}px']['images_per_s_per_core']
    out['h100_resnet50'] = {
        'images_per_s': H100_RESNET50_IMAGES_PER_S,
        'host_cores_needed': round(H100_RESNET50_IMAGES_PER_S / per_core, 1),
    }
    out['limits'] = {}
    for (name, _), model in zip(folders.items(), out['training'], strict=True):
        fed = out['pipeline'][name]['images_per_s_2_threads']
        trained = out['training'][model]
        out['limits'][model] = {
            'pipeline_images_per_s': fed,
            'training_images_per_s': trained,
            'limited_by': 'pipeline' if fed < trained else 'model',
            'factor': round(max(fed, trained) / min(fed, trained), 2),
        }
    return out


def markdown(out: dict) -> str:
    lines = [
        '# Host input pipeline against training (benchmarks/input_pipeline.py)',
        '',
        f'Machine: {out["machine"]["cpu_count"]} CPU cores ({out["machine"]["processor"]}), '
        f'Python {out["machine"]["python"]}.'
        + (' QUICK SMOKE RUN: not a measurement.' if out['quick'] else ''),
        '',
        'Host pipeline (FolderStream: JPEG decode, resize, batch; no device transfer):',
        '',
        '| folder | images | 1 thread img/s | 2 threads img/s | img/s per core |',
        '|---|---|---|---|---|',
    ]
    for name, p in out['pipeline'].items():
        lines.append(
            f'| {name} | {p["images"]} | {p["images_per_s_1_thread"]} | '
            f'{p["images_per_s_2_threads"]} | {p["images_per_s_per_core"]} |'
        )
    h = out['h100_resnet50']
    lines += [
        '',
        f'One H100 training ResNet-50 at {h["images_per_s"]:.0f} images/s needs '
        f'**{h["host_cores_needed"]} host cores** of this pipeline (3000 / per-core rate).',
        '',
        'This CPU (2 decode threads feeding, training on the CPU devices):',
        '',
        '| model | pipeline img/s | training img/s | limited by | factor |',
        '|---|---|---|---|---|',
    ]
    for model, v in out['limits'].items():
        lines.append(
            f'| {model} | {v["pipeline_images_per_s"]} | {v["training_images_per_s"]} | '
            f'{v["limited_by"]} | {v["factor"]}x |'
        )
    return '\n'.join(lines) + '\n'


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--cifar', required=True, help='folder:PATH of the CIFAR-10 JPEGs')
    parser.add_argument('--cache', default='~/.cache/cnn_jax/benchmarks')
    parser.add_argument('--out', default='results/benchmark')
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--images', type=int, default=4096, help='per folder and split')
    parser.add_argument('--batch_size', type=int, default=128)
    parser.add_argument('--resnet_batch', type=int, default=16)
    parser.add_argument('--steps', type=int, default=5, help='timed ResNet-50 steps')
    parser.add_argument('--quick', action='store_true', help='a smoke run, not a measurement')
    args = parser.parse_args(argv)
    if not args.cifar.startswith('folder:'):
        parser.error('--cifar takes folder:PATH (a folder or .tar.gz of train/ and test/)')
    out = measure(args)
    target = pathlib.Path(args.out)
    target.mkdir(parents=True, exist_ok=True)
    (target / 'input_pipeline.json').write_text(json.dumps(out, indent=2) + '\n')
    (target / 'input_pipeline.md').write_text(markdown(out))
    print(markdown(out))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

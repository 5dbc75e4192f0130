"""What JPEG costs: E3's CNN on lossless Fashion-MNIST against the same images JPEG'd.

Our CIFAR-10 is a JPEG copy (quality 75, 4:2:0 chroma), while the reports trained on the
lossless release. Fashion-MNIST's lossless original is at hand, so this measures the
penalty under control: the IDX files, and the same files with every image round-tripped
through JPEG at the same quality. The data path, model, recipe (configs/mnist_cnn.py,
10 epochs) and seeds are the same; only the pixels differ. Greyscale JPEG has no chroma
to subsample, so the figure is a lower bound for CIFAR-10's penalty.

    python -m reproduce.jpeg_cost --idx DIR              # DIR: the four IDX files
    python -m reproduce.jpeg_cost --idx DIR --override num_epochs=1 --root /tmp/jc  # quick

Writes ROOT/summary.md and summary.json (default ROOT results/reproduction/jpeg_cost);
each run is a workdir of its own, so an interrupted call resumes.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import pathlib
import shlex
import subprocess
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cnn_jax.data.sources import IDX_FILES, idx_file, read_idx_file
from reproduce.workdirs import ROOT

DEFAULT_ROOT = pathlib.Path('results/reproduction/jpeg_cost')
CONFIG = 'configs/mnist_cnn.py'


def jpeg_round_trip(images: np.ndarray, quality: int) -> np.ndarray:
    """Each uint8 (N, H, W) greyscale image encoded as JPEG at `quality`, then decoded."""
    out = np.empty_like(images)
    for i, image in enumerate(images):
        buffer = io.BytesIO()
        Image.fromarray(image, mode='L').save(buffer, format='JPEG', quality=quality)
        out[i] = np.asarray(Image.open(buffer))
    return out


def write_idx(path: pathlib.Path, array: np.ndarray) -> None:
    """A gzipped uint8 IDX file: magic (0, 0, 0x08, ndim), big-endian dims, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, '>u4').tobytes()
    with gzip.open(path, 'wb') as f:
        f.write(header + np.ascontiguousarray(array, np.uint8).tobytes())


def make_jpeg_copy(idx_dir: pathlib.Path, out: pathlib.Path, quality: int) -> float:
    """Writes `idx_dir`'s IDX files to `out` with images JPEG'd; returns mean |error| (0-255)."""
    out.mkdir(parents=True, exist_ok=True)
    error_sum, pixels = 0, 0
    for key, stem in IDX_FILES.items():
        array = read_idx_file(idx_file(idx_dir, key))
        if key.endswith('images'):
            lossy = jpeg_round_trip(array, quality)
            error_sum += int(np.abs(lossy.astype(np.int16) - array).sum())
            pixels += array.size
            array = lossy
        write_idx(out / f'{stem}.gz', array)
    return error_sum / pixels


def run(dataset: str, seed: int, workdir: pathlib.Path, overrides: Sequence[str]) -> dict:
    cmd = [
        sys.executable, 'launch.py', f'--config={CONFIG}', f'--workdir={workdir}',
        f'--config.dataset={dataset}', f'--config.seed={seed}',
        *[f'--config.{kv}' for kv in overrides],
    ]  # fmt: skip
    subprocess.run(cmd, cwd=ROOT, check=True)
    summary = json.loads((workdir / 'summary.json').read_text())
    return {'seed': seed, 'test_accuracy': summary['test_accuracy']}


def render(result: dict) -> str:
    lines = [
        f'# What JPEG costs: Fashion-MNIST, lossless against JPEG quality {result["quality"]}',
        '',
        f"E3's CNN ({CONFIG}), same recipe and seeds; mean |pixel error| of the JPEG copy: "
        f'{result["mean_abs_pixel_error"]:.2f} / 255.',
        '',
        '| data | test accuracy per seed | mean ± std |',
        '|---|---|---|',
    ]
    for name, runs in result['runs'].items():
        accs = [r['test_accuracy'] for r in runs]
        per_seed = ', '.join(f'{a:.4f}' for a in accs)
        lines.append(f'| {name} | {per_seed} | {np.mean(accs):.4f} ± {np.std(accs, ddof=1):.4f} |')
    lines += [
        '',
        f'Penalty (lossless - JPEG): {result["penalty"]:+.4f}',
        '',
        f'Command (DIR: the four Fashion-MNIST IDX files): `{result["command"]}`',
    ]
    return '\n'.join(lines) + '\n'


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m reproduce.jpeg_cost', description=__doc__)
    p.add_argument('--idx', required=True, help='folder of the four Fashion-MNIST IDX files')
    p.add_argument('--root', default=str(DEFAULT_ROOT))
    p.add_argument('--quality', type=int, default=75)
    p.add_argument('--seeds', default='0,1,2')
    p.add_argument('--override', action='append', default=[], metavar='KEY=VALUE')
    args = p.parse_args(argv)
    root = pathlib.Path(args.root)
    root = root if root.is_absolute() else ROOT / root
    jpeg_dir = root / f'fashion-mnist-jpeg{args.quality}'
    error = make_jpeg_copy(pathlib.Path(args.idx), jpeg_dir, args.quality)
    seeds = [int(s) for s in args.seeds.split(',')]
    sources = {'lossless': f'idx:{args.idx}', f'jpeg{args.quality}': f'idx:{jpeg_dir}'}
    runs = {
        name: [run(data, s, root / name / f'seed_{s}', args.override) for s in seeds]
        for name, data in sources.items()
    }
    shown = ['python', '-m', 'reproduce.jpeg_cost', '--idx', 'DIR', '--quality', str(args.quality)]
    shown += ['--seeds', args.seeds, *[f'--override={kv}' for kv in args.override]]
    means = [np.mean([r['test_accuracy'] for r in rs]) for rs in runs.values()]
    result = {
        'command': shlex.join(shown),
        'quality': args.quality,
        'mean_abs_pixel_error': error,
        'runs': runs,
        'penalty': float(means[0] - means[1]),
    }
    (root / 'summary.json').write_text(json.dumps(result, indent=2) + '\n')
    (root / 'summary.md').write_text(render(result))
    print((root / 'summary.md').read_text(), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

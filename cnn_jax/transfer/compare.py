"""Per-class test accuracy of a study's variants side by side (E5b: fine-tuned vs scratch).

    python -m cnn_jax.transfer.compare results/transfer_finetune_vs_scratch

reads each variant's summary.json (workdir/<variant>/ or, with several seeds, the mean
over workdir/<variant>/seed_<s>/) and writes per_class_accuracy.md and
per_class_accuracy.png in the study's workdir.
"""

import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from cnn_jax import report
from cnn_jax.errors import ConfigError
from cnn_jax.records import read_summary


def _summaries(variant_dir: pathlib.Path) -> list[dict]:
    """The finished runs of a variant (its workdir, or one per seed) with per-class numbers."""
    runs = [read_summary(p) for p in [variant_dir, *sorted(variant_dir.glob('seed_*'))]]
    return [s for s in runs if s and s.get('per_class_accuracy') and s.get('class_names')]


def collect(
    study_dir: str | pathlib.Path, variants: Sequence[str] | None = None
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Class names and each variant's per-class accuracy (mean over its seeds)."""
    root = pathlib.Path(study_dir)
    names = variants or sorted(p.name for p in root.iterdir() if p.is_dir())
    classes: list[str] | None = None
    result = {}
    for v in names:
        runs = _summaries(root / v)
        if not runs:
            continue
        if classes is None:
            classes = list(runs[0]['class_names'])
        for s in runs:
            if list(s['class_names']) != classes:
                raise ConfigError(
                    f'{root / v}: classes {s["class_names"]} differ from {classes}; '
                    'per-class accuracy compares runs on the same data only'
                )
        result[v] = np.mean([s['per_class_accuracy'] for s in runs], axis=0)
    if not result:
        raise ConfigError(f'no finished runs with per-class accuracy under {root}')
    return classes, result


def plot_per_class(classes: list[str], acc: dict[str, np.ndarray], path: pathlib.Path) -> None:
    fig = report.new_figure(max(6.0, 0.9 * len(classes) + 2), 4)
    ax = fig.subplots()
    width = 0.8 / len(acc)
    x = np.arange(len(classes))
    for i, (v, a) in enumerate(acc.items()):
        ax.bar(x + (i - (len(acc) - 1) / 2) * width, a, width, label=v)
    ax.set_xticks(x, classes, rotation=30, ha='right')
    ax.set(ylim=(0, 1), ylabel='test accuracy', title='per-class test accuracy')
    ax.grid(axis='y', alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_comparison(study_dir: str | pathlib.Path, variants: Sequence[str] | None = None) -> str:
    """Writes per_class_accuracy.md/.png in `study_dir`; returns the markdown."""
    root = pathlib.Path(study_dir)
    classes, acc = collect(root, variants)
    header = ['class', *acc]
    rows = [[c, *(float(a[i]) for a in acc.values())] for i, c in enumerate(classes)]
    if len(acc) == 2:
        first, second = acc
        header.append(f'{first} - {second}')
        for row, d in zip(rows, acc[first] - acc[second], strict=True):
            row.append(float(d))
    ranges = [
        f'- {v}: {100 * a.min():.1f}-{100 * a.max():.1f}% (mean {100 * a.mean():.1f}%)'
        for v, a in acc.items()
    ]
    text = '\n'.join(
        [
            f'# Per-class test accuracy: {root.name}',
            '',
            report.markdown_table(header, rows),
            '',
            'Range over classes:',
            '',
            *ranges,
            '',
            '![per-class accuracy](per_class_accuracy.png)',
            '',
        ]
    )
    (root / 'per_class_accuracy.md').write_text(text)
    plot_per_class(classes, acc, root / 'per_class_accuracy.png')
    return text


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print('usage: python -m cnn_jax.transfer.compare STUDY_DIR [VARIANT ...]', file=sys.stderr)
        return 2
    try:
        print(write_comparison(argv[1], argv[2:] or None))
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv))

"""A cnn_jax run and its PyTorch twin, epoch by epoch: validation accuracy and learning rate.

    python -m reproduce.twin_curves --workdir results/reproduction/E8/resnet20 \
        --torch results/reproduction/E8/torch_recipe.json \
        --out results/reproduction/E8/twin_curves.png

The workdir's metrics.jsonl (cnn_jax's launch) against the history that
`python -m reproduce.torch_recipe` writes (after every epoch, so a twin still running or
stopped for time plots as far as it got). Two panels side by side: validation accuracy,
and the learning rate each epoch started with (log scale).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence

from cnn_jax.errors import ConfigError

Curves = dict[str, list[tuple[int, float]]]


def read_curves(rows: Sequence[dict]) -> Curves:
    """(epoch, value) of val_accuracy and learning_rate, from rows that have them."""
    return {
        key: [(int(r['epoch']), float(r[key])) for r in rows if r.get(key) is not None]
        for key in ('val_accuracy', 'learning_rate')
    }


def cnn_jax_rows(workdir: pathlib.Path) -> list[dict]:
    path = workdir / 'metrics.jsonl'
    if not path.exists():
        raise ConfigError(f'{path}: no such file (a cnn_jax workdir has metrics.jsonl)')
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(curves: dict[str, Curves], out: pathlib.Path) -> None:
    """One line per run ({label: curves}) in each panel."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    panels = (('val_accuracy', 'validation accuracy'), ('learning_rate', 'learning rate'))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for label, run in curves.items():
            if run[key]:
                epochs, values = zip(*run[key], strict=True)
                ax.plot(epochs, values, label=label)
        ax.set_xlabel('epoch')
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    axes[1].set_yscale('log')
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog='python -m reproduce.twin_curves', description=__doc__)
    p.add_argument('--workdir', required=True, help="the cnn_jax run's workdir")
    p.add_argument('--torch', required=True, help="torch_recipe's --out JSON")
    p.add_argument('--out', required=True, help='PNG file')
    args = p.parse_args(argv)
    twin = pathlib.Path(args.torch)
    try:
        if not twin.exists():
            raise ConfigError(f'{twin}: no such file (python -m reproduce.torch_recipe --out)')
        curves = {
            'cnn_jax': read_curves(cnn_jax_rows(pathlib.Path(args.workdir))),
            'PyTorch twin': read_curves(json.loads(twin.read_text())['history']),
        }
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    plot(curves, pathlib.Path(args.out))
    print(f'Curves: {args.out}')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

"""Run reports: classification metrics, curves.png, confusion_matrix.png, report.md.

matplotlib is imported inside the plotting functions (Figure objects, no pyplot), so
training never pays for it.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """cm[i, j] = number of examples of class i predicted as j."""
    cm = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int
) -> dict[str, Any]:
    """Accuracy, macro precision/recall/F1, per-class accuracy and the confusion matrix."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    predicted, actual = cm.sum(axis=0), cm.sum(axis=1)
    with np.errstate(divide='ignore', invalid='ignore'):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    present = actual > 0  # Macro averages over the classes that occur, like sklearn's labels=.
    return {
        'accuracy': float(tp.sum() / max(cm.sum(), 1)),
        'precision': float(precision[present].mean()) if present.any() else 0.0,
        'recall': float(recall[present].mean()) if present.any() else 0.0,
        'f1': float(f1[present].mean()) if present.any() else 0.0,
        'per_class_accuracy': [float(r) for r in recall],
        'confusion_matrix': cm.tolist(),
    }


def new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure of its own (no pyplot: no global figure list or GUI backend)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def epoch_axis(ax: Any) -> None:
    """An x axis of whole epochs (min_n_ticks=1 keeps a one-epoch run from 0.995) and a grid."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel('epoch')
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)


def plot_curves(
    history: Sequence[dict[str, Any]], path: str | pathlib.Path, title: str = ''
) -> None:
    """Loss and accuracy per epoch, train and validation (and test when recorded)."""
    fig = new_figure(11, 4)
    epochs = [r['epoch'] for r in history]
    for ax, metric in zip(fig.subplots(1, 2), ('loss', 'accuracy'), strict=True):
        for split, style in (('train', '-o'), ('val', '-s'), ('test', '-^')):
            key = f'{split}_{metric}'
            if history and key in history[0]:
                ax.plot(epochs, [r[key] for r in history], style, label=split, markersize=3)
        epoch_axis(ax)
        ax.set(ylabel=metric, title=metric)
        if history:
            ax.legend()
        else:
            ax.text(0.5, 0.5, 'no completed epoch', ha='center', transform=ax.transAxes)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_confusion_matrix(
    cm: Sequence[Sequence[int]],
    class_names: Sequence[str],
    path: str | pathlib.Path,
    title: str = 'confusion matrix',
) -> None:
    cm = np.asarray(cm)
    k = len(class_names)
    size = min(12, 2.5 + 0.6 * k)
    fig = new_figure(size, size * 0.85)
    ax = fig.subplots()
    fig.colorbar(ax.imshow(cm, cmap='Blues'), ax=ax, fraction=0.046)
    ax.set_xticks(range(k), class_names, rotation=45, ha='right')
    ax.set_yticks(range(k), class_names)
    ax.set(xlabel='predicted', ylabel='true', title=title)
    if k <= 20:
        threshold = cm.max() / 2 if cm.size else 0
        for i in range(k):
            for j in range(k):
                color = 'white' if cm[i, j] > threshold else 'black'
                ax.text(j, i, str(cm[i, j]), ha='center', va='center', fontsize=8, color=color)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v):
        return f'{v:.4f}' if isinstance(v, float) else str(v)

    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(fmt(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def class_sections(
    class_names: Sequence[str],
    per_class_accuracy: Sequence[float],
    cm: Sequence[Sequence[int]],
    image: str = 'confusion_matrix.png',
) -> list[str]:
    """report.md's per-class accuracy and confusion matrix sections (lines); `image` is
    the confusion matrix's plot, beside the report."""
    return [
        '## Per-class accuracy',
        '',
        markdown_table(
            ('class', 'accuracy'), list(zip(class_names, per_class_accuracy, strict=True))
        ),
        '',
        '## Confusion matrix (rows: true, columns: predicted)',
        '',
        markdown_table(
            ['true \\ pred', *class_names],
            [[name, *row] for name, row in zip(class_names, cm, strict=True)],
        ),
        '',
        f'![confusion matrix]({image})',
        '',
    ]


def code_section(title: str, text: str) -> list[str]:
    """A report.md section holding `text` verbatim (lines)."""
    return [f'## {title}', '', '```', text.strip(), '```', '']


def write_report(
    workdir: str | pathlib.Path, summary: dict[str, Any], config_text: str, layer_table: str
) -> None:
    """report.md: config, parameter table, results, per-class accuracy, confusion matrix."""
    s = summary
    parts = [f'# {s.get("name", "run")}: {s["status"]}', '']
    if s['status'] == 'diverged':
        parts += [f'**Diverged at step {s["diverged_at_step"]}** (loss became NaN/inf).', '']
    results = [
        (split, s.get(f'{split}_accuracy'), s.get(f'{split}_loss'))
        for split in ('train', 'val', 'test')
        if s.get(f'{split}_accuracy') is not None
    ]
    raw = s.get('test_raw_accuracy')
    if raw is not None:  # cnn_jax.ema: the averaged weights were evaluated.
        results.append(('test, raw weights', raw, s.get('test_raw_loss')))
    parts += [
        '## Results',
        '',
        markdown_table(('split', 'accuracy', 'loss'), results),
        '',
        *(
            [
                'Evaluated with the moving average of the weights (ema_decay); the last row is '
                'the raw weights.',
                '',
            ]
            if raw is not None
            else []
        ),
        f'Macro precision {s["precision"]:.4f}, recall {s["recall"]:.4f}, F1 {s["f1"]:.4f}.',
        '',
        f'{s["epochs_run"]} epochs, best epoch {s.get("best_epoch")}'
        f'{" (stopped early)" if s.get("stopped_early") else ""}; '
        f'{s["wall_time_s"]:.1f} s wall time, {s["train_steps_per_s"]:.1f} steps/s on '
        f'{s["num_devices"]} device(s) ({s.get("platform", "?")}'
        f'{", convolutions by oneDNN" if s.get("onednn_convolutions") else ""}).',
        '',
        '![curves](curves.png)',
        '',
    ]
    parts += class_sections(s['class_names'], s['per_class_accuracy'], s['confusion_matrix'])
    parts += code_section('Sanity checks', json.dumps(s['sanity'], indent=2))
    parts += code_section('Model', layer_table)
    parts += code_section('Config', config_text)
    (pathlib.Path(workdir) / 'report.md').write_text('\n'.join(parts))

"""A report's recipe trained in PyTorch on cnn_jax's arrays: is a gap ours or the data's?

    python -m reproduce.torch_recipe --config=cifar_cnn3.py \
        --data cifar10=folder:DIR --out results/reproduction/E10/torch_recipe.json
    python -m reproduce.torch_recipe --config=ablations/cifar_cnn6_optimizers.py --variant=sgd \
        --data cifar10=folder:DIR --out results/reproduction/E4/torch_recipe_sgd.json

Same data (cnn_jax.data.load_dataset: the same split and normalisation), the PyTorch twin
of the config's model (benchmarks.torch_models.twin, PyTorch's default initialisation),
the config's optimiser, batch size, epochs and early stopping; plain cross-entropy, flip
and crop augmentation only. If PyTorch reaches the reported figure here and cnn_jax does
not, the gap is cnn_jax's; if neither does, it is the data's or the recipe's.
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from cnn_jax import study
from cnn_jax.data import load_dataset
from cnn_jax.models import build_model
from reproduce.reported import load_config


def _batches(images, labels, order, batch_size):
    for i in range(0, len(order) - batch_size + 1, batch_size):
        idx = order[i : i + batch_size]
        yield images[idx], labels[idx]


def train_recipe(config, seed: int = 0, log=print) -> dict:
    """Trains config's model and recipe in PyTorch; returns per-epoch rows and test figures."""
    import torch
    import torch.nn.functional as F

    from benchmarks.torch_models import twin

    if config.loss != 'cross_entropy' or config.schedule != 'constant':
        raise SystemExit('torch_recipe: only cross-entropy with a constant learning rate')
    torch.manual_seed(seed)
    data = load_dataset(config)
    shape = data.image_shape
    model = twin(build_model(config, data.num_classes), shape, data.num_classes)
    mean = torch.tensor(data.mean).view(1, -1, 1, 1)
    std = torch.tensor(data.std).view(1, -1, 1, 1)

    def tensor(images):  # uint8 NHWC -> normalised float NCHW
        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        return (x - mean) / std

    params = model.parameters()
    opt = {
        'sgd': lambda: torch.optim.SGD(
            params, config.learning_rate, weight_decay=config.weight_decay
        ),
        'momentum': lambda: torch.optim.SGD(
            params, config.learning_rate, momentum=config.momentum, weight_decay=config.weight_decay
        ),
        'adam': lambda: torch.optim.Adam(
            params, config.learning_rate, (config.b1, config.b2), config.eps, config.weight_decay
        ),
    }[config.optimizer]()
    rng = np.random.default_rng(seed)

    def evaluate(split):
        model.eval()
        loss = correct = 0.0
        with torch.no_grad():
            for i in range(0, len(split), 1000):
                x, y = (
                    tensor(split.images[i : i + 1000]),
                    torch.from_numpy(split.labels[i : i + 1000]).long(),
                )
                out = model(x)
                loss += float(F.cross_entropy(out, y, reduction='sum'))
                correct += float((out.argmax(1) == y).sum())
        return loss / len(split), correct / len(split)

    es = config.early_stopping
    best, best_state, bad, rows = None, None, 0, []
    for epoch in range(1, config.num_epochs + 1):
        model.train()
        t0 = time.time()
        order = rng.permutation(len(data.train))
        seen = correct = total_loss = 0.0
        for xb, yb in _batches(data.train.images, data.train.labels, order, config.batch_size):
            if config.augment.flip:
                flip = rng.random(len(xb)) < 0.5
                xb = np.where(flip[:, None, None, None], xb[:, :, ::-1], xb)
            if config.augment.crop_padding:
                p = config.augment.crop_padding
                padded = np.pad(xb, ((0, 0), (p, p), (p, p), (0, 0)))
                dy, dx = rng.integers(0, 2 * p + 1, (2, len(xb)))
                h, w = xb.shape[1:3]
                xb = np.stack(
                    [
                        padded[i, a : a + h, b : b + w]
                        for i, (a, b) in enumerate(zip(dy, dx, strict=True))
                    ]
                )
            x, y = tensor(xb), torch.from_numpy(yb).long()
            out = model(x)
            loss = F.cross_entropy(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            seen += len(y)
            total_loss += float(loss) * len(y)
            correct += float((out.argmax(1) == y).sum())
        row = {'epoch': epoch, 'train_loss': total_loss / seen, 'train_accuracy': correct / seen}
        if data.val is not None:
            row['val_loss'], row['val_accuracy'] = evaluate(data.val)
        if config.eval_test_each_epoch:
            row['test_loss'], row['test_accuracy'] = evaluate(data.test)
        row['seconds'] = round(time.time() - t0, 1)
        rows.append(row)
        log(json.dumps(row))
        monitor = row.get(es.monitor, row['train_loss'])
        better = best is None or (
            monitor < best - es.min_delta
            if es.monitor.endswith('loss')
            else monitor > best + es.min_delta
        )
        if better:
            best, bad, best_epoch = monitor, 0, epoch
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
        if es.patience > 0 and bad >= es.patience:
            break
    if es.patience > 0 and best_state is not None:
        model.load_state_dict(best_state)
    test_loss, test_acc = evaluate(data.test)
    train_loss, train_acc = evaluate(data.train)
    out = {
        'epochs_run': len(rows),
        'best_epoch': best_epoch if es.patience > 0 else len(rows),
        'train_accuracy': train_acc,
        'test_accuracy': test_acc,
        'test_loss': test_loss,
        'torch_version': torch.__version__,
        'history': rows,
    }
    if data.val is not None:
        out['val_loss'], out['val_accuracy'] = evaluate(data.val)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog='python -m reproduce.torch_recipe', description=__doc__.split('\n')[0]
    )
    p.add_argument('--config', required=True, help='a config under configs/, e.g. cifar_cnn3.py')
    p.add_argument('--variant', default='', help="a study config's variant, e.g. adam")
    p.add_argument('--data', action='append', default=[], metavar='NAME=VALUE')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: its default)')
    p.add_argument('--out', required=True, help='JSON file for the result')
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_config(args.config)
    if 'study' in config:
        if not args.variant:
            raise SystemExit(f'error: {args.config} is a study: name one of its --variant')
        config = study.variant_config(config, args.variant)
    swaps = dict(item.split('=', 1) for item in args.data)
    if config.dataset in swaps:
        config.dataset = swaps[config.dataset]
    result = {
        'config': args.config,
        'variant': args.variant,
        'dataset': config.dataset,
        'seed': args.seed,
    }
    result.update(train_recipe(config, args.seed))
    path = pathlib.Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + '\n')
    print(
        f'test accuracy {result["test_accuracy"]:.4f} after {result["epochs_run"]} epochs: {path}'
    )
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

"""A report's recipe trained in PyTorch on cnn_jax's arrays: is a gap ours or the data's?

    python -m reproduce.torch_recipe --config=cifar_cnn3.py \
        --data cifar10=folder:DIR --out results/reproduction/E10/torch_recipe.json
    python -m reproduce.torch_recipe --config=ablations/cifar_cnn6_optimizers.py --variant=sgd \
        --data cifar10=folder:DIR --out results/reproduction/E4/torch_recipe_sgd.json

Same data (cnn_jax.data.load_dataset: the same split and normalisation), the PyTorch twin
of the config's model (benchmarks.torch_models.twin, PyTorch's default initialisation),
the config's optimiser, batch size, epochs, constant or step schedule and early stopping;
plain cross-entropy, flip and crop augmentation only. --out is rewritten after every
epoch; with --checkpoint FILE a rerun of the same command resumes a long recipe (E8's
182 epochs) where it stopped:

    python -m reproduce.torch_recipe --config=resnet20.py --data cifar10=folder:DIR \
        --out results/reproduction/E8/torch_recipe.json --checkpoint /tmp/e8_twin.pt
 If PyTorch reaches the reported figure here and cnn_jax does
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


def _optimizer(config, params):
    import torch

    return {
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


def _scheduler(config, opt, steps_per_epoch: int):
    """Per-step learning rate as cnn_jax.optim.build_schedule's 'constant' and 'step'."""
    import torch

    milestones = []
    if config.schedule == 'step':
        milestones = [int(e * steps_per_epoch) for e in config.step_epochs]
    return torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=config.step_factor)


def _augment(xb, config, rng):
    """cnn_jax's flip and zero-padded random crop, on a uint8 NHWC batch."""
    if config.augment.flip:
        flip = rng.random(len(xb)) < 0.5
        xb = np.where(flip[:, None, None, None], xb[:, :, ::-1], xb)
    if config.augment.crop_padding:
        p = config.augment.crop_padding
        padded = np.pad(xb, ((0, 0), (p, p), (p, p), (0, 0)))
        dy, dx = rng.integers(0, 2 * p + 1, (2, len(xb)))
        h, w = xb.shape[1:3]
        xb = np.stack(
            [padded[i, a : a + h, b : b + w] for i, (a, b) in enumerate(zip(dy, dx, strict=True))]
        )
    return xb


class _Recipe:
    """The twin model, its optimiser and schedule, and the epoch loop's state; saved to
    and restored from a checkpoint file after each epoch when one is given."""

    def __init__(self, config, seed: int, checkpoint: pathlib.Path | None):
        import torch

        from benchmarks.torch_models import twin

        if config.loss != 'cross_entropy' or config.schedule not in ('constant', 'step'):
            raise SystemExit('torch_recipe: only cross-entropy with a constant or step schedule')
        torch.manual_seed(seed)
        self.config, self.checkpoint = config, checkpoint
        self.data = load_dataset(config)
        shape, classes = self.data.image_shape, self.data.num_classes
        self.model = twin(build_model(config, classes), shape, classes)
        self.mean = torch.tensor(self.data.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(self.data.std).view(1, -1, 1, 1)
        self.opt = _optimizer(config, self.model.parameters())
        steps_per_epoch = len(self.data.train) // config.batch_size
        self.schedule = _scheduler(config, self.opt, steps_per_epoch)
        self.rng = np.random.default_rng(seed)
        self.rows, self.best, self.best_epoch, self.bad, self.best_state = [], None, 0, 0, None
        if checkpoint is not None and checkpoint.exists():
            self._restore(torch.load(checkpoint, weights_only=False))

    def _restore(self, saved: dict) -> None:
        import torch

        self.model.load_state_dict(saved['model'])
        self.opt.load_state_dict(saved['opt'])
        self.schedule.load_state_dict(saved['schedule'])
        self.rng.bit_generator.state = saved['numpy_rng']
        torch.set_rng_state(saved['torch_rng'])
        for key in ('rows', 'best', 'best_epoch', 'bad', 'best_state'):
            setattr(self, key, saved[key])

    def save(self) -> None:
        import torch

        if self.checkpoint is None:
            return
        saved = {
            'model': self.model.state_dict(),
            'opt': self.opt.state_dict(),
            'schedule': self.schedule.state_dict(),
            'numpy_rng': self.rng.bit_generator.state,
            'torch_rng': torch.get_rng_state(),
            **{k: getattr(self, k) for k in ('rows', 'best', 'best_epoch', 'bad', 'best_state')},
        }
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        partial = self.checkpoint.with_suffix('.partial')
        torch.save(saved, partial)
        partial.replace(self.checkpoint)  # A kill mid-write keeps the last whole one.

    def tensor(self, images):  # uint8 NHWC -> normalised float NCHW
        import torch

        x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
        return (x - self.mean) / self.std

    def evaluate(self, split) -> tuple[float, float]:
        import torch
        import torch.nn.functional as F

        self.model.eval()
        loss = correct = 0.0
        with torch.no_grad():
            for i in range(0, len(split), 1000):
                x = self.tensor(split.images[i : i + 1000])
                y = torch.from_numpy(split.labels[i : i + 1000]).long()
                out = self.model(x)
                loss += float(F.cross_entropy(out, y, reduction='sum'))
                correct += float((out.argmax(1) == y).sum())
        return loss / len(split), correct / len(split)

    def train_epoch(self, epoch: int) -> dict:
        import torch
        import torch.nn.functional as F

        self.model.train()
        t0, train = time.time(), self.data.train
        learning_rate = self.opt.param_groups[0]['lr']
        order = self.rng.permutation(len(train))
        seen = correct = total_loss = 0.0
        for xb, yb in _batches(train.images, train.labels, order, self.config.batch_size):
            x = self.tensor(_augment(xb, self.config, self.rng))
            y = torch.from_numpy(yb).long()
            out = self.model(x)
            loss = F.cross_entropy(out, y)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.schedule.step()
            seen += len(y)
            total_loss += float(loss.detach()) * len(y)
            correct += float((out.argmax(1) == y).sum())
        row = {'epoch': epoch, 'train_loss': total_loss / seen, 'train_accuracy': correct / seen}
        row['learning_rate'] = learning_rate  # At the epoch's first step, as in metrics.jsonl.
        if self.data.val is not None:
            row['val_loss'], row['val_accuracy'] = self.evaluate(self.data.val)
        if self.config.eval_test_each_epoch:
            row['test_loss'], row['test_accuracy'] = self.evaluate(self.data.test)
        row['seconds'] = round(time.time() - t0, 1)
        return row

    def stop_early(self, row: dict) -> bool:
        """Tracks the best monitored value (its weights kept); whether patience ran out."""
        es = self.config.early_stopping
        monitor = row.get(es.monitor, row['train_loss'])
        if es.monitor.endswith('loss'):
            better = self.best is None or monitor < self.best - es.min_delta
        else:
            better = self.best is None or monitor > self.best + es.min_delta
        if better:
            self.best, self.bad, self.best_epoch = monitor, 0, row['epoch']
            if es.patience > 0:
                self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad += 1
        return es.patience > 0 and self.bad >= es.patience

    def result(self) -> dict:
        import torch

        es = self.config.early_stopping
        if es.patience > 0 and self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        test_loss, test_acc = self.evaluate(self.data.test)
        train_loss, train_acc = self.evaluate(self.data.train)
        out = {
            'epochs_run': len(self.rows),
            'best_epoch': self.best_epoch if es.patience > 0 else len(self.rows),
            'train_accuracy': train_acc,
            'test_accuracy': test_acc,
            'test_loss': test_loss,
            'torch_version': torch.__version__,
            'history': self.rows,
        }
        if self.data.val is not None:
            out['val_loss'], out['val_accuracy'] = self.evaluate(self.data.val)
        return out


def train_recipe(
    config,
    seed: int = 0,
    log=print,
    checkpoint: pathlib.Path | None = None,
    on_epoch=lambda rows: None,
) -> dict:
    """Trains config's model and recipe in PyTorch; returns per-epoch rows and test figures.

    With `checkpoint`, the state is saved there after every epoch and a rerun resumes
    from it; `on_epoch(rows)` sees the history after each epoch."""
    recipe = _Recipe(config, seed, checkpoint)
    patience = config.early_stopping.patience
    stopped = patience > 0 and recipe.bad >= patience  # A resumed run that had stopped.
    for epoch in range(len(recipe.rows) + 1, config.num_epochs + 1):
        if stopped:
            break
        row = recipe.train_epoch(epoch)
        recipe.rows.append(row)
        log(json.dumps(row))
        stopped = recipe.stop_early(row)
        recipe.save()
        on_epoch(recipe.rows)
    return recipe.result()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog='python -m reproduce.torch_recipe', description=__doc__.split('\n')[0]
    )
    p.add_argument('--config', required=True, help='a config under configs/, e.g. cifar_cnn3.py')
    p.add_argument('--variant', default='', help="a study config's variant, e.g. adam")
    p.add_argument('--data', action='append', default=[], metavar='NAME=VALUE')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--threads', type=int, default=0, help='torch threads (0: its default)')
    p.add_argument('--out', required=True, help='JSON file for the result (after each epoch too)')
    p.add_argument(
        '--checkpoint',
        default='',
        help='file for the state after each epoch; a rerun resumes from it (not in results/)',
    )
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
    path = pathlib.Path(args.out)

    def write(payload: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + '\n')

    def on_epoch(rows: list) -> None:  # A run stopped for time still leaves its curve.
        write({**result, 'status': 'running', 'epochs_run': len(rows), 'history': rows})

    checkpoint = pathlib.Path(args.checkpoint) if args.checkpoint else None
    result.update(train_recipe(config, args.seed, checkpoint=checkpoint, on_epoch=on_epoch))
    result['status'] = 'completed'
    write(result)
    print(
        f'test accuracy {result["test_accuracy"]:.4f} after {result["epochs_run"]} epochs: {path}'
    )
    return 0


if __name__ == '__main__':
    raise SystemExit(main())

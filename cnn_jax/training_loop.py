"""The training loop: epochs of compiled steps, evaluation, checkpoints, early stopping.

`train_and_evaluate` resumes from the workdir's latest checkpoint, stops cleanly on
Ctrl-C/SIGTERM (saving first), detects divergence, and returns the state to test with
(the best one when early stopping is on) and the per-epoch history.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import pathlib
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from cnn_jax import parallel, train
from cnn_jax.checkpoints import Checkpoints
from cnn_jax.data import Dataset
from cnn_jax.data.augment import AugmentConfig
from cnn_jax.errors import ConfigError, Interrupted
from cnn_jax.records import MetricsLog, Progress

Hook = Callable[[int], bool | None]  # Called after each step; True asks the loop to stop.


@dataclasses.dataclass
class TrainResult:
    state: train.TrainState
    history: list[dict[str, Any]]
    status: str  # 'completed' | 'diverged'
    diverged_at_step: int | None
    stopped_early: bool
    best_epoch: int | None
    steps_per_epoch: int
    train_steps_per_s: float
    compile_s: float
    resumed_from_step: int | None
    device_data: dict[str, tuple[jax.Array, jax.Array]]
    steps: train.CompiledSteps
    mesh: Mesh


class StopRequest:
    """Turns the first Ctrl-C / SIGTERM into a request the loop honours between steps."""

    def __init__(self):
        self.requested = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return

        def handler(signum, frame):
            if self.requested:  # A second Ctrl-C aborts at once.
                raise KeyboardInterrupt
            self.requested = True
            logging.warning('Stop requested: saving a checkpoint after this step ...')

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def monitor_mode(metric: str) -> str:
    return 'min' if metric.endswith('loss') else 'max'


def improved(value: float, best: float | None, mode: str, min_delta: float = 0.0) -> bool:
    if best is None:
        return math.isfinite(value)
    return value < best - min_delta if mode == 'min' else value > best + min_delta


def epoch_plan(config: ml_collections.ConfigDict, dataset: Dataset) -> tuple[int, str, str]:
    """(steps per epoch, the metric the best checkpoint tracks, 'min' or 'max')."""
    num_train = len(dataset.train)
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f'batch_size={config.batch_size} is larger than the {num_train} training examples'
        )
    if config.get('steps_per_epoch'):
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    es = config.early_stopping
    monitor = es.monitor if es.patience > 0 else config.get('best_metric', 'val_accuracy')
    if monitor.startswith('val_') and dataset.val is None:
        if es.patience > 0:
            raise ConfigError(f'early stopping monitors {monitor} but val_fraction is 0')
        monitor = 'train_' + monitor[4:]
    return steps_per_epoch, monitor, monitor_mode(monitor)


def input_spec(config: ml_collections.ConfigDict, dataset: Dataset) -> train.InputSpec:
    return train.InputSpec(
        mean=tuple(float(v) for v in dataset.mean),
        std=tuple(float(v) for v in dataset.std),
        image_size=config.get('image_size') or None,  # 0 or None: no resize.
        augment=AugmentConfig.from_config(config.get('augment')),
    )


def model_input_shape(config: ml_collections.ConfigDict, dataset: Dataset) -> tuple[int, ...]:
    h, w, c = dataset.image_shape
    size = config.get('image_size')
    return (size, size, c) if size else (h, w, c)


def _epoch_row(
    epoch: int,
    step: int,
    acc: dict[str, float],
    lr: float,
    elapsed: float,
    evals: dict[str, dict[str, float]],
) -> dict[str, Any]:
    count = max(acc['count'], 1.0)
    row = {
        'epoch': epoch,
        'step': step,
        'train_loss': acc['loss'] / count,
        'train_accuracy': acc['correct'] / count,
    }
    for split, m in evals.items():
        row[f'{split}_loss'] = m['loss']
        row[f'{split}_accuracy'] = m['accuracy']
    row['learning_rate'] = lr
    row['elapsed_s'] = round(elapsed, 3)
    return row


def agreed_stop(wanted: bool, sync_point: bool) -> bool:
    """Whether the loop stops after this step, the same answer on every process.

    One process stops at once. In a multi-process job all must stop at the same step (the
    checkpoint save is collective), so a request made on any of them (a signal, a hook)
    waits for the next log point or epoch end, where one tiny all-gather agrees on it:
    nothing is added to the steps in between.
    """
    if jax.process_count() == 1:
        return wanted
    return sync_point and parallel.any_process(wanted)


def agreed_improvement(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """`improved(...)` as process 0 decides it, on every process (the best checkpoint's
    save is collective, and the early stop follows from the count of epochs without one)."""
    better = improved(value, best, mode, min_delta)
    return better if jax.process_count() == 1 else bool(parallel.from_main(better))


def _host_acc(acc: dict[str, jax.Array]) -> dict[str, float]:
    return {k: float(v) for k, v in jax.device_get(acc).items()}


def device_splits(dataset: Any, mesh: Any) -> dict[str, tuple[jax.Array, jax.Array]]:
    """{'train'|'val'|'test': (images, labels)} of `dataset`, replicated on every device."""
    return {
        name: (
            parallel.put_replicated(split.images, mesh),
            parallel.put_replicated(split.labels, mesh),
        )
        for name, split in (('train', dataset.train), ('val', dataset.val), ('test', dataset.test))
        if split is not None
    }


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    dataset: Dataset,
    model: nn.Module,
    mesh: Mesh | None = None,
    hooks: Sequence[Hook] = (),
) -> TrainResult:
    """Trains `model` on `dataset` as `config` says, resuming from `workdir` if possible."""
    workdir = pathlib.Path(workdir)
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
    num_train = len(dataset.train)
    steps_per_epoch, monitor, mode = epoch_plan(config, dataset)
    es = config.early_stopping

    rng = jax.random.key(config.seed)
    init_rng, train_rng, data_rng = jax.random.split(rng, 3)
    spec = input_spec(config, dataset)
    state = train.create_train_state(
        config, model, model_input_shape(config, dataset), init_rng, steps_per_epoch
    )
    state = jax.device_put(state, parallel.replicated(mesh))
    device_data = device_splits(dataset, mesh)
    steps = train.compile_steps(config, mesh, spec, num_train, steps_per_epoch)
    ckpt = Checkpoints(workdir, keep=config.get('keep_checkpoints', 2), best_mode=mode)
    log = MetricsLog(workdir, enabled=jax.process_index() == 0)

    acc = train.zero_metrics()
    start_epoch = start_step = 0
    resumed_from = None
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, loop = restored
        start_epoch, start_step = loop['epoch'], loop['step_in_epoch']
        acc = jax.device_put(
            {k: jnp.float32(v) for k, v in loop['acc'].items()}, parallel.replicated(mesh)
        )
        resumed_from = int(state.step)
        logging.info(
            'Resuming from step %d (epoch %d, step %d of it) in %s',
            resumed_from,
            start_epoch + 1,
            start_step,
            workdir,
        )
        print(
            f'Resuming from checkpoint at step {resumed_from} '
            f'(epoch {start_epoch + 1}, step {start_step} of {steps_per_epoch}).',
            flush=True,
        )
    # Process 0 reads (and truncates) metrics.jsonl; the others get its rows.
    history = parallel.main_computes(lambda: log.truncate(start_epoch))

    best_value, best_epoch, bad_epochs = None, None, 0
    for row in history:  # Rebuild early-stopping state from the epochs already run.
        if monitor in row and improved(row[monitor], best_value, mode, es.min_delta):
            best_value, best_epoch, bad_epochs = row[monitor], row['epoch'], 0
        else:
            bad_epochs += 1
    stopped_early = es.patience > 0 and bad_epochs >= es.patience

    train_images, train_labels = device_data['train']
    total_steps = config.num_epochs * steps_per_epoch
    progress = Progress(total_steps, enabled=jax.process_index() == 0)
    log_every = max(1, config.get('log_every_steps', 50))
    status, diverged_at = 'completed', None
    compile_s, timed_steps, timed_s = 0.0, 0, 0.0
    t_start = time.perf_counter()
    stop, stop_wanted = StopRequest(), False
    with stop.installed():
        for epoch in range(start_epoch, config.num_epochs):
            if stopped_early or status == 'diverged':
                break
            perm = steps.permutation(data_rng, epoch)
            first_step = start_step if epoch == start_epoch else 0
            t_epoch = None
            for s in range(first_step, steps_per_epoch):
                state, acc = steps.train(
                    state, acc, train_images, train_labels, perm, np.int32(s), train_rng
                )
                gstep = epoch * steps_per_epoch + s + 1
                if t_epoch is None:  # First step of this process: includes compilation.
                    jax.block_until_ready(acc)
                    if compile_s == 0.0:
                        compile_s = time.perf_counter() - t_start
                    progress.start(gstep)
                    t_epoch, first_timed = time.perf_counter(), gstep
                log_point = gstep % log_every == 0 or s == steps_per_epoch - 1
                if log_point:
                    host = _host_acc(acc)  # The only host sync inside an epoch.
                    loss = host['loss'] / max(host['count'], 1.0)
                    if not math.isfinite(loss):
                        status, diverged_at = 'diverged', gstep
                        logging.warning('Diverged: training loss %s at step %d', loss, gstep)
                        print(f'\nDiverged at step {gstep}: training loss is {loss}.', flush=True)
                        break
                    progress.update(
                        gstep,
                        epoch + 1,
                        config.num_epochs,
                        loss=loss,
                        accuracy=host['correct'] / max(host['count'], 1.0),
                    )
                    log.write_step(gstep, {'train_loss_running': loss})
                hook_stop = any([bool(h(gstep)) for h in hooks])
                stop_wanted = stop_wanted or stop.requested or hook_stop
                if agreed_stop(stop_wanted, log_point):
                    jax.block_until_ready(state)
                    ckpt.save_latest(
                        gstep,
                        state,
                        {'epoch': epoch, 'step_in_epoch': s + 1, 'acc': _host_acc(acc)},
                    )
                    ckpt.wait()
                    progress.end_line()
                    raise Interrupted(gstep, str(workdir))
            if status == 'diverged':
                break
            jax.block_until_ready(state)
            if t_epoch is not None:
                timed_steps += gstep - first_timed
                timed_s += time.perf_counter() - t_epoch
            progress.end_line()
            evals = {}
            for split in ('val', 'test'):
                if split in device_data and (split == 'val' or config.get('eval_test_each_epoch')):
                    evals[split], _ = train.evaluate_split(
                        steps, state, *device_data[split], config.eval_batch_size, mesh
                    )
            lr = train.optax_learning_rate(state, config, steps_per_epoch)
            row = _epoch_row(
                epoch + 1, int(state.step), _host_acc(acc), lr, time.perf_counter() - t_start, evals
            )
            history.append(row)
            log.write_epoch(row)
            logging.info('epoch %d: %s', epoch + 1, row)
            print(
                'epoch {epoch}: '.format(**row)
                + '  '.join(
                    f'{k} {v:.4f}' for k, v in row.items() if k.endswith(('loss', 'accuracy'))
                ),
                flush=True,
            )
            if agreed_improvement(row[monitor], best_value, mode, es.min_delta):
                best_value, best_epoch, bad_epochs = row[monitor], epoch + 1, 0
                ckpt.save_best(int(state.step), state, best_value)
            else:
                bad_epochs += 1
            acc = jax.device_put(train.zero_metrics(), parallel.replicated(mesh))
            last = epoch + 1 == config.num_epochs
            if (epoch + 1) % max(1, config.get('checkpoint_every_epochs', 1)) == 0 or last:
                ckpt.save_latest(
                    int(state.step),
                    state,
                    {'epoch': epoch + 1, 'step_in_epoch': 0, 'acc': _host_acc(acc)},
                )
            if es.patience > 0 and bad_epochs >= es.patience:
                stopped_early = True
                print(
                    f'Early stopping after epoch {epoch + 1}: {monitor} has not improved for '
                    f'{bad_epochs} epochs (best {best_value:.4f} at epoch {best_epoch}).'
                )
    ckpt.wait()
    if es.patience > 0 and status == 'completed':
        best = ckpt.restore_best(state)  # Keras' restore_best_weights.
        if best is not None:
            state = best
    ckpt.close()
    log.close()
    return TrainResult(
        state=state,
        history=history,
        status=status,
        diverged_at_step=diverged_at,
        stopped_early=stopped_early,
        best_epoch=best_epoch,
        steps_per_epoch=steps_per_epoch,
        train_steps_per_s=timed_steps / timed_s if timed_s > 0 else float('nan'),
        compile_s=compile_s,
        resumed_from_step=resumed_from,
        device_data=device_data,
        steps=steps,
        mesh=mesh,
    )

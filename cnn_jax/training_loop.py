"""The training loop: epochs of compiled steps, evaluation, checkpoints, early stopping.

`train_and_evaluate` resumes from the workdir's latest checkpoint, stops cleanly on
Ctrl-C/SIGTERM (saving first), detects divergence, and returns the state to test with
(the best one when early stopping is on) and the per-epoch history. `train_variants` is
the same loop over K variants trained in step (cnn_jax.sweep stacks them), each with
the records, checkpoints and early stopping of a run of its own; a plain run is K = 1.
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
from cnn_jax.data import Dataset, stream
from cnn_jax.data.augment import AugmentConfig
from cnn_jax.data.metadata import model_input_shape
from cnn_jax.errors import ConfigError, Interrupted
from cnn_jax.records import MetricsLog, Progress

Hook = Callable[[int], bool | None]  # Called after each step; True asks the loop to stop.


@dataclasses.dataclass
class TrainResult:
    """One run's (one variant's) outcome; the fields from steps_per_epoch on are shared."""

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
    device_data: dict[str, Any]  # device_splits': arrays on the devices, or streams
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


def epoch_plan(config: ml_collections.ConfigDict, dataset: Dataset) -> tuple[int, str, str]:
    """(steps per epoch, the metric the best checkpoint tracks, 'min' or 'max')."""
    num_train = len(dataset.train)
    steps_per_epoch = num_train // config.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f'batch_size={config.batch_size} is larger than the {num_train} training examples'
        )
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    es = config.early_stopping
    monitor = es.monitor if es.patience > 0 else config.best_metric
    if monitor.startswith('val_') and dataset.val is None:
        if es.patience > 0:
            raise ConfigError(f'early stopping monitors {monitor} but val_fraction is 0')
        monitor = 'train_' + monitor[4:]
    return steps_per_epoch, monitor, 'min' if monitor.endswith('loss') else 'max'


def input_spec(config: ml_collections.ConfigDict, dataset: Dataset) -> train.InputSpec:
    return train.InputSpec(
        mean=tuple(float(v) for v in dataset.mean),
        std=tuple(float(v) for v in dataset.std),
        image_size=config.image_size or None,  # 0 or None: no resize.
        augment=AugmentConfig.from_config(config.augment),
    )


def _epoch_row(
    epoch: int,
    step: int,
    acc: dict[str, float],
    lr: float,
    elapsed: float,
    evals: dict[str, dict[str, float]],
) -> dict[str, Any]:
    count = max(acc['count'], 1.0)
    row = {'epoch': epoch, 'step': step}
    row.update(train_loss=acc['loss'] / count, train_accuracy=acc['correct'] / count)
    for split, m in evals.items():
        row.update({f'{split}_loss': m['loss'], f'{split}_accuracy': m['accuracy']})
    return {**row, 'learning_rate': lr, 'elapsed_s': round(elapsed, 3)}


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
    """Whether `value` beats `best` by more than `min_delta` (any finite value beats None),
    as process 0 decides it, on every process (the best checkpoint's save is collective,
    and the early stop follows from the count of epochs without one)."""
    if best is None:
        better = math.isfinite(value)
    else:
        better = value < best - min_delta if mode == 'min' else value > best + min_delta
    return better if jax.process_count() == 1 else bool(parallel.from_main(better))


def device_splits(dataset: Any, mesh: Any) -> dict[str, Any]:
    """{'train'|'val'|'test': (images, labels) replicated on every device, or a stream}."""
    return {
        name: split
        if isinstance(split, stream.Stream)
        else (
            parallel.put_replicated(split.images, mesh),
            parallel.put_replicated(split.labels, mesh),
        )
        for name, split in (('train', dataset.train), ('val', dataset.val), ('test', dataset.test))
        if split is not None
    }


def _train_inputs(data: Any, perm: jax.Array, first_step: int, mesh: Mesh) -> Iterator[tuple]:
    """(images, labels, perm, step_in_epoch) of each step from `first_step` on.

    A stream follows `perm` on the host (the device path's order: the same batches) and
    its batches go to the devices a step ahead, each device's rows where the step uses
    them (perm None: no gather).
    """
    if not isinstance(data, stream.Stream):
        yield from ((*data, perm, np.int32(s)) for s in range(first_step, perm.shape[-2]))
        return
    if perm.ndim != 2:
        raise ConfigError('a stream serves one order: a sweep over seed cannot stream')
    arrays = (stream.to_device(b, mesh) for b in data.train(parallel.to_host(perm), first_step))
    for a in stream.prefetch(arrays, 1):
        yield a['image'], a['label'], None, np.int32(0)


# --- The K variants one loop trains ------------------------------------------------------


@dataclasses.dataclass
class _Variant:
    """One variant's records and early-stopping state (a plain run has one)."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    log: MetricsLog
    ckpt: Checkpoints
    tag: str  # Prefix of its printed lines ('' for a plain run).
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    status: str = 'completed'  # 'completed' | 'diverged'
    diverged_at: int | None = None
    stopped_early: bool = False
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0

    @property
    def active(self) -> bool:
        return self.status == 'completed' and not self.stopped_early

    def observe(self, row: dict[str, Any], monitor: str, mode: str, es: Any) -> bool:
        """Updates early stopping with an epoch's row; whether it is the best so far."""
        better = monitor in row and agreed_improvement(
            row[monitor], self.best_value, mode, es.min_delta
        )
        if better:
            self.best_value, self.best_epoch, self.bad_epochs = row[monitor], row['epoch'], 0
        else:
            self.bad_epochs += 1
        self.stopped_early = es.patience > 0 and self.bad_epochs >= es.patience
        return better


def _host_acc(acc: train.Metrics) -> list[dict[str, float]]:
    """Each variant's running metric sums, on the host."""
    host = {name: np.atleast_1d(v) for name, v in jax.device_get(acc).items()}
    return [{name: float(v[k]) for name, v in host.items()} for k in range(len(host['loss']))]


def _save_latest(
    runs: Sequence[_Variant],
    steps: train.VariantSteps,
    state: train.TrainState,
    acc: train.Metrics,
    step: int,
    epoch: int,
    step_in_epoch: int,
) -> None:
    """Each variant's state at `step`, with where the loop was and its running sums."""
    for k, (r, a) in enumerate(zip(runs, _host_acc(acc), strict=True)):
        loop = {'epoch': epoch, 'step_in_epoch': step_in_epoch, 'acc': a}
        if r.diverged_at is not None:  # Only a stack saves after a variant diverged.
            loop['diverged_at_step'] = r.diverged_at
        r.ckpt.save_latest(step, steps.variant(state, k), loop)


def _restore_latest(
    runs: Sequence[_Variant], steps: train.VariantSteps, state: train.TrainState
) -> tuple[train.TrainState, list[dict]] | None:
    """(state, each variant's loop record) at the newest step all variants saved, or None.

    Each variant has its own checkpoints (a plain run can resume a stack's variant and the
    other way round); after a kill between their saves they resume from a shared step.
    """
    limit = None
    while True:
        found = [r.ckpt.restore_latest(steps.variant(state, k), limit) for k, r in enumerate(runs)]
        if any(f is None for f in found):
            return None
        at = {int(s.step) for s, _ in found}
        if len(at) == 1:
            return steps.stack([s for s, _ in found]), [loop for _, loop in found]
        limit = min(at)


def train_and_evaluate(
    config: ml_collections.ConfigDict,
    workdir: str | pathlib.Path,
    dataset: Dataset,
    model: nn.Module,
    mesh: Mesh | None = None,
    hooks: Sequence[Hook] = (),
) -> TrainResult:
    """Trains `model` on `dataset` as `config` says, resuming from `workdir` if possible."""
    return train_variants([config], [workdir], dataset, model, mesh, hooks)[0]


def train_variants(
    configs: Sequence[ml_collections.ConfigDict],
    workdirs: Sequence[str | pathlib.Path],
    dataset: Dataset,
    model: nn.Module,
    mesh: Mesh | None = None,
    hooks: Sequence[Hook] = (),
    make_steps: train.MakeSteps = train.plain_steps,
) -> list[TrainResult]:
    """Trains K variants of one experiment in step, each as its own run in its workdir.

    The configs differ only in numbers `make_steps` can hold per variant (cnn_jax.sweep);
    `plain_steps` and one config is a plain run. Each variant resumes, logs, checkpoints
    (latest and best in its workdir), diverges and stops early on its own; one that stops
    keeps its state while the others train on. Returns each variant's TrainResult.
    """
    if len(configs) != len(workdirs):
        raise ConfigError(f'{len(configs)} variants but {len(workdirs)} workdirs')
    config = configs[0]  # Everything the variants share.
    mesh = mesh or parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
    repl = parallel.replicated(mesh)
    num_train = len(dataset.train)
    steps_per_epoch, monitor, mode = epoch_plan(config, dataset)
    es = config.early_stopping

    shape, spec = model_input_shape(config, dataset), input_spec(config, dataset)
    steps = make_steps(configs, model, shape, spec, mesh, num_train, steps_per_epoch)
    state = jax.device_put(steps.state, repl)
    device_data = device_splits(dataset, mesh)
    writer = jax.process_index() == 0
    keep = config.keep_checkpoints
    runs = [
        _Variant(
            config=c,
            workdir=pathlib.Path(w),
            log=MetricsLog(w, enabled=writer),
            ckpt=Checkpoints(w, keep=keep, best_mode=mode),
            tag='' if len(configs) == 1 else f' [{c.get("name", None) or k}]',
        )
        for k, (c, w) in enumerate(zip(configs, workdirs, strict=True))
    ]

    # Placed on the mesh like the step's output, so the second step does not recompile.
    acc = jax.device_put(steps.zero_metrics(), repl)
    start_epoch = start_step = 0
    resumed_from = None
    restored = _restore_latest(runs, steps, state)
    if restored is not None:
        state, loops = restored
        state = jax.device_put(state, repl)
        start_epoch, start_step = loops[0]['epoch'], loops[0]['step_in_epoch']
        acc = jax.tree.map(
            lambda zero, *vs: jnp.asarray(vs, jnp.float32).reshape(zero.shape),
            acc,
            *[loop['acc'] for loop in loops],
        )
        acc = jax.device_put(acc, repl)
        for r, loop in zip(runs, loops, strict=True):
            if loop.get('diverged_at_step') is not None:
                r.status, r.diverged_at = 'diverged', loop['diverged_at_step']
        resumed_from = int(state.step)
        logging.info('Resuming from step %d in %s', resumed_from, [str(r.workdir) for r in runs])
        print(
            f'Resuming from checkpoint at step {resumed_from} '
            f'(epoch {start_epoch + 1}, step {start_step} of {steps_per_epoch}).',
            flush=True,
        )
    for r in runs:
        # Process 0 reads (and truncates) metrics.jsonl; the others get its rows.
        rows = r.log.truncate(start_epoch) if parallel.is_main_process() else None
        r.history = parallel.from_main(rows)
        for row in r.history:  # Rebuild early-stopping state from the epochs already run.
            r.observe(row, monitor, mode, es)

    def mask() -> jax.Array:
        return jax.device_put(np.array([r.active for r in runs]), repl)

    active = mask()
    total_steps = config.num_epochs * steps_per_epoch
    progress = Progress(total_steps, enabled=writer)
    log_every = max(1, config.log_every_steps)
    compile_s, timed_steps, timed_s = 0.0, 0, 0.0
    t_start = time.perf_counter()
    stop, stop_wanted = StopRequest(), False
    with stop.installed():
        for epoch in range(start_epoch, config.num_epochs):
            if not any(r.active for r in runs):
                break
            first_step = start_step if epoch == start_epoch else 0
            t_epoch = None
            inputs = _train_inputs(device_data['train'], steps.permutation(epoch), first_step, mesh)
            for s, args in zip(range(first_step, steps_per_epoch), inputs, strict=False):
                state, acc = steps.train(state, acc, *args, steps.rng, active)
                gstep = epoch * steps_per_epoch + s + 1
                if t_epoch is None:  # First step of this process: includes compilation.
                    jax.block_until_ready(acc)
                    if compile_s == 0.0:
                        compile_s = time.perf_counter() - t_start
                    progress.start(gstep)
                    t_epoch, first_timed = time.perf_counter(), gstep
                log_point = gstep % log_every == 0 or s == steps_per_epoch - 1
                if log_point:
                    live = []  # The only host sync inside an epoch.
                    for r, a in zip(runs, _host_acc(acc), strict=True):
                        loss = a['loss'] / max(a['count'], 1.0)
                        if r.active and not math.isfinite(loss):
                            r.status, r.diverged_at = 'diverged', gstep
                            message = f'Diverged{r.tag} at step {gstep}: training loss is {loss}.'
                            logging.warning(message)
                            print('\n' + message, flush=True)
                            active = mask()
                        elif r.active:
                            live.append((loss, a['correct'] / max(a['count'], 1.0)))
                            r.log.write_step(gstep, {'train_loss_running': loss})
                    if not live:
                        break
                    progress.update(
                        gstep,
                        epoch + 1,
                        config.num_epochs,
                        loss=float(np.mean([x[0] for x in live])),
                        accuracy=float(np.mean([x[1] for x in live])),
                    )
                hook_stop = any([bool(h(gstep)) for h in hooks])
                stop_wanted = stop_wanted or stop.requested or hook_stop
                if agreed_stop(stop_wanted, log_point):
                    jax.block_until_ready(state)
                    _save_latest(runs, steps, state, acc, gstep, epoch, s + 1)
                    for r in runs:
                        r.ckpt.wait()
                    progress.end_line()
                    inputs.close()  # Stops a stream's decoding threads.
                    raise Interrupted(gstep, ', '.join(str(r.workdir) for r in runs))
            inputs.close()
            if not any(r.active for r in runs):
                break  # Every variant diverged.
            jax.block_until_ready(state)
            if t_epoch is not None:
                timed_steps += gstep - first_timed
                timed_s += time.perf_counter() - t_epoch
            progress.end_line()
            stopping = []
            for k, (r, a) in enumerate(zip(runs, _host_acc(acc), strict=True)):
                if not r.active:
                    continue
                state_k = steps.variant(state, k)
                evals = {
                    split: train.evaluate(
                        steps.evaluation, state_k, device_data[split], config.eval_batch_size, mesh
                    )[0]
                    for split in ('val', 'test')
                    if split in device_data and (split == 'val' or config.eval_test_each_epoch)
                }
                lr = train.optax_learning_rate(state_k, r.config, steps_per_epoch)
                elapsed = time.perf_counter() - t_start
                row = _epoch_row(epoch + 1, int(state.step), a, lr, elapsed, evals)
                r.history.append(row)
                r.log.write_epoch(row)
                logging.info('epoch %d%s: %s', epoch + 1, r.tag, row)
                shown = [f'{n} {v:.4f}' for n, v in row.items() if n.endswith(('loss', 'accuracy'))]
                print(f'epoch {epoch + 1}{r.tag}: ' + '  '.join(shown), flush=True)
                if r.observe(row, monitor, mode, es):
                    r.ckpt.save_best(int(state.step), state_k, r.best_value)
                if r.stopped_early:
                    stopping.append(r)
            acc = jax.device_put(steps.zero_metrics(), repl)
            last = epoch + 1 == config.num_epochs
            if (epoch + 1) % max(1, config.checkpoint_every_epochs) == 0 or last:
                _save_latest(runs, steps, state, acc, int(state.step), epoch + 1, 0)
            for r in stopping:
                print(
                    f'Early stopping{r.tag} after epoch {epoch + 1}: {monitor} has not improved '
                    f'for {r.bad_epochs} epochs (best {r.best_value:.4f} at epoch {r.best_epoch}).'
                )
            if stopping:
                active = mask()
    steps_per_s = timed_steps / timed_s if timed_s > 0 else float('nan')
    results = []
    for k, r in enumerate(runs):
        r.ckpt.wait()
        state_k = steps.variant(state, k)
        if es.patience > 0 and r.status == 'completed':
            best = r.ckpt.restore_best(state_k)  # Keras' restore_best_weights.
            if best is not None:
                state_k = best
        r.ckpt.close()
        r.log.close()
        results.append(
            TrainResult(
                state=state_k,
                history=r.history,
                status=r.status,
                diverged_at_step=r.diverged_at,
                stopped_early=r.stopped_early,
                best_epoch=r.best_epoch,
                steps_per_epoch=steps_per_epoch,
                train_steps_per_s=steps_per_s,
                compile_s=compile_s,
                resumed_from_step=resumed_from,
                device_data=device_data,
                steps=steps.evaluation,
                mesh=mesh,
            )
        )
    return results

"""The training loop: epochs of compiled steps, evaluation, checkpoints, early stopping.

`train_and_evaluate` trains one run, `train_variants` K variants in step (cnn_jax.sweep).
The loop resumes from the workdir's latest checkpoint, stops cleanly on Ctrl-C/SIGTERM
(saving first) and detects divergence. Its phases are `_Loop`'s methods: open (__init__),
resume, run_epoch (config.evals_per_epoch - 1 evaluations inside), end_epoch (the last
one, checkpoint) and results (the state to test, the best one when early stopping is on,
and its final evaluation). An evaluation (`evaluate_point`) makes a row of metrics, a best
checkpoint and an early-stopping check.
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

from cnn_jax import accumulate, ema, parallel, steps
from cnn_jax.checkpoints import Checkpoints
from cnn_jax.data import Dataset
from cnn_jax.data.augment import AugmentConfig
from cnn_jax.data.metadata import model_input_shape
from cnn_jax.errors import ConfigError, Interrupted
from cnn_jax.records import Progress, Reporter, StepProfile

Hook = Callable[[int], bool | None]  # Called after each step; True asks the loop to stop.


@dataclasses.dataclass
class TrainResult:
    """One run's (one variant's) outcome; the fields from steps_per_epoch on are shared."""

    state: steps.TrainState  # The one tested: the best one when early stopping is on.
    history: list[dict[str, Any]]
    status: str  # 'completed' | 'diverged'
    diverged_at_step: int | None
    stopped_early: bool
    best_epoch: int | None
    # Final {'train'|'val'|'test': {loss, accuracy}}, and 'test_raw' with an EMA (cnn_jax.ema).
    evals: dict[str, dict[str, float]]
    test_predictions: np.ndarray
    steps_per_epoch: int
    train_steps_per_s: float
    compile_s: float
    resumed_from_step: int | None
    num_devices: int


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
    num_train, batch = len(dataset.train), accumulate.optimizer_batch(config)
    steps_per_epoch = num_train // batch  # Optimiser steps (grad_accum_steps micro-batches).
    if steps_per_epoch == 0:
        accum = (
            f' x grad_accum_steps={config.grad_accum_steps}' if batch != config.batch_size else ''
        )
        raise ConfigError(
            f'batch_size={config.batch_size}{accum} is larger than the {num_train} training '
            'examples'
        )
    if config.steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.steps_per_epoch)
    if config.evals_per_epoch > steps_per_epoch:
        raise ConfigError(
            f'evals_per_epoch={config.evals_per_epoch} is more than the {steps_per_epoch} '
            'steps of an epoch'
        )
    es = config.early_stopping
    monitor = es.monitor if es.patience > 0 else config.best_metric
    if monitor.startswith('val_') and dataset.val is None:
        if es.patience > 0:
            raise ConfigError(f'early stopping monitors {monitor} but val_fraction is 0')
        monitor = 'train_' + monitor[4:]
    return steps_per_epoch, monitor, 'min' if monitor.endswith('loss') else 'max'


def eval_points(steps_per_epoch: int, evals_per_epoch: int) -> list[int]:
    """The steps of an epoch (counted from 1) after which the loop evaluates: evenly
    spaced, the last at the epoch's end. 702 steps, 2 evaluations: [351, 702]."""
    n = evals_per_epoch
    return sorted({round(steps_per_epoch * i / n) for i in range(1, n + 1)})


def input_spec(config: ml_collections.ConfigDict, dataset: Dataset) -> steps.InputSpec:
    return steps.InputSpec(
        mean=tuple(float(v) for v in dataset.mean),
        std=tuple(float(v) for v in dataset.std),
        image_size=config.image_size or None,  # 0 or None: no resize.
        augment=AugmentConfig.from_config(config.augment),
        num_classes=dataset.num_classes,
    )


def agreed_stop(wanted: bool, sync_point: bool) -> bool:
    """Whether the loop stops after this step, the same answer on every process.

    One process stops at once. In a multi-process job all must stop at the same step (the
    checkpoint save is collective), so a request made on any of them (a signal, a hook)
    waits for the next log point or epoch end, where one tiny all-gather agrees on it:
    nothing is added to the steps in between.
    """
    return wanted if jax.process_count() == 1 else sync_point and parallel.any_process(wanted)


def agreed_improvement(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    """Whether `value` beats `best` by more than `min_delta` (any finite value beats None),
    as process 0 decides it, on every process (the best checkpoint's save is collective,
    and the early stop follows from the count of epochs without one)."""
    if best is None:
        better = math.isfinite(value)
    else:
        better = value < best - min_delta if mode == 'min' else value > best + min_delta
    return better if jax.process_count() == 1 else bool(parallel.from_main(better))


# --- The K variants one loop trains ------------------------------------------------------


@dataclasses.dataclass
class _Variant:
    """One variant's records and early-stopping state (a plain run has one)."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    report: Reporter  # Its console lines (tagged, K > 1) and metrics.
    ckpt: Checkpoints
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


def _host_acc(acc: steps.Metrics) -> list[dict[str, float]]:
    """Each variant's running metric sums, on the host."""
    host = {name: np.atleast_1d(v) for name, v in jax.device_get(acc).items()}
    return [{name: float(v[k]) for name, v in host.items()} for k in range(len(host['loss']))]


def _restore_latest(
    runs: Sequence[_Variant], made: steps.VariantSteps, state: steps.TrainState
) -> tuple[steps.TrainState, list[dict]] | None:
    """(state, each variant's loop record) at the newest step all variants saved, or None.

    Each variant has its own checkpoints (a plain run can resume a stack's variant and the
    other way round); after a kill between their saves they resume from a shared step.
    """
    limit = None
    while True:
        found = [r.ckpt.restore_latest(made.variant(state, k), limit) for k, r in enumerate(runs)]
        if any(f is None for f in found):
            return None
        at = {int(s.step) for s, _ in found}
        if len(at) == 1:
            return made.stack([s for s, _ in found]), [loop for _, loop in found]
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
    make_steps: steps.MakeSteps = steps.plain_steps,
) -> list[TrainResult]:
    """Trains K variants of one experiment in step, each as its own run in its workdir.

    The configs differ only in numbers `make_steps` can hold per variant (cnn_jax.sweep);
    `plain_steps` and one config is a plain run. Each variant resumes, logs, checkpoints
    (latest and best in its workdir), diverges and stops early on its own; one that stops
    keeps its state while the others train on. Returns each variant's TrainResult, with
    its final evaluation.
    """
    loop = _Loop(configs, workdirs, dataset, model, mesh or parallel.make_mesh(), hooks, make_steps)
    loop.resume()
    with loop.stop.installed():
        for epoch in range(loop.start_epoch, loop.config.num_epochs):
            first_step = loop.start_step if epoch == loop.start_epoch else 0
            if not loop.any_active() or not loop.run_epoch(epoch, first_step):
                break  # Every variant diverged or stopped early.
            loop.end_epoch(epoch)
    return loop.results()


class _Loop:
    """The state the phases of `train_variants` share (the module doc lists them)."""

    def __init__(self, configs, workdirs, dataset, model, mesh, hooks, make_steps):
        """Opens the variants' runs: checks, compiled steps, data on the devices, records."""
        if len(configs) != len(workdirs):
            raise ConfigError(f'{len(configs)} variants but {len(workdirs)} workdirs')
        self.config = config = configs[0]  # What the variants share.
        parallel.check_batch_size(config.batch_size, mesh)
        parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
        self.steps_per_epoch, self.monitor, self.mode = epoch_plan(config, dataset)
        self.eval_points = eval_points(self.steps_per_epoch, config.evals_per_epoch)
        shape, spec = model_input_shape(config, dataset), input_spec(config, dataset)
        self.steps = make_steps(
            configs, model, shape, spec, mesh, len(dataset.train), self.steps_per_epoch
        )
        self.runs = [
            _Variant(
                config=c,
                workdir=pathlib.Path(w),
                report=Reporter(w, '' if len(configs) == 1 else f' [{c.get("name", None) or k}]'),
                ckpt=Checkpoints(w, keep=config.keep_checkpoints, best_mode=self.mode),
            )
            for k, (c, w) in enumerate(zip(configs, workdirs, strict=True))
        ]
        self.mesh, self.hooks = mesh, hooks
        self.splits = {n: s.on_devices(mesh) for n, s in dataset.splits().items()}
        repl = parallel.replicated(mesh)
        self.state = jax.device_put(self.steps.state, repl)
        # Placed on the mesh like the step's output, so the second step does not recompile.
        self.acc = jax.device_put(self.steps.zero_metrics(), repl)
        self.progress = Progress(config.num_epochs * self.steps_per_epoch)
        self.profile = StepProfile(workdirs[0], config.profile_steps)
        self.stop, self.stop_wanted, self.active = StopRequest(), False, None
        self.start_epoch, self.start_step, self.resumed_from = 0, 0, None
        self.t_start, self.compile_s, self.timed_steps, self.timed_s = 0.0, 0.0, 0, 0.0

    def any_active(self) -> bool:
        return any(r.active for r in self.runs)

    def _mask(self) -> None:
        """Which variants the step trains (the others keep their states)."""
        self.active = jax.device_put(
            np.array([r.active for r in self.runs]), parallel.replicated(self.mesh)
        )

    def resume(self) -> None:
        """Restores the newest checkpoint all variants saved (if any), with the loop's
        position and running sums, and each variant's history and early-stopping state."""
        restored = _restore_latest(self.runs, self.steps, self.state)
        if restored is not None:
            repl = parallel.replicated(self.mesh)
            state, loops = restored
            self.state = jax.device_put(state, repl)
            self.start_epoch, self.start_step = loops[0]['epoch'], loops[0]['step_in_epoch']
            acc = jax.tree.map(
                lambda zero, *vs: jnp.asarray(vs, jnp.float32).reshape(zero.shape),
                self.acc,
                *[loop['acc'] for loop in loops],
            )
            self.acc = jax.device_put(acc, repl)
            for r, loop in zip(self.runs, loops, strict=True):
                if loop.get('diverged_at_step') is not None:
                    r.status, r.diverged_at = 'diverged', loop['diverged_at_step']
            self.resumed_from = int(self.state.step)
            self.runs[0].report.line(
                f'Resuming from checkpoint at step {self.resumed_from} (epoch '
                f'{self.start_epoch + 1}, step {self.start_step} of {self.steps_per_epoch}).'
            )
        es, done = self.config.early_stopping, self.start_epoch * self.steps_per_epoch
        for r in self.runs:
            r.history = r.report.resume(done + self.start_step)
            for row in r.history:  # Rebuild early-stopping state from the epochs already run.
                r.observe(row, self.monitor, self.mode, es)
        self._mask()
        self.t_start = time.perf_counter()  # Compilation and elapsed_s count from here.

    def run_epoch(self, epoch: int, first_step: int) -> bool:
        """The steps of `epoch` from `first_step`; False when every variant has diverged.

        Raises Interrupted, after saving, when a signal or a hook asks the loop to stop.
        """
        spe = self.steps_per_epoch
        inputs = self.splits['train'].train_inputs(self.steps.permutation(epoch), first_step)
        t_epoch = first_timed = None
        try:
            for s, args in zip(range(first_step, spe), inputs, strict=False):
                self.state, self.acc = self.steps.train(
                    self.state, self.acc, *args, self.steps.rng, self.active
                )
                gstep = epoch * spe + s + 1
                if t_epoch is None:  # First step of this process: includes compilation.
                    jax.block_until_ready(self.acc)
                    self.compile_s = self.compile_s or time.perf_counter() - self.t_start
                    self.progress.start(gstep)
                    t_epoch, first_timed = time.perf_counter(), gstep
                self.profile.step(self.state)
                log_point = gstep % max(1, self.config.log_every_steps) == 0 or s == spe - 1
                if log_point and not self._log_point(gstep, epoch):
                    break
                if s + 1 in self.eval_points[:-1]:
                    self.evaluate_point(epoch, s + 1)
                    if not self.any_active():  # Every variant stopped early.
                        self._save_latest(gstep, epoch, s + 1)
                        break
                hook_stop = any([bool(h(gstep)) for h in self.hooks])
                self.stop_wanted = self.stop_wanted or self.stop.requested or hook_stop
                if agreed_stop(self.stop_wanted, log_point):
                    self._save_and_stop(gstep, epoch, s + 1)
        finally:
            inputs.close()  # Stops a stream's decoding threads.
            self.profile.stop(self.state)
        if not self.any_active():
            return False
        jax.block_until_ready(self.state)
        if t_epoch is not None:
            self.timed_steps += gstep - first_timed
            self.timed_s += time.perf_counter() - t_epoch
        self.progress.end_line()
        return True

    def _log_point(self, gstep: int, epoch: int) -> bool:
        """The running losses (the only host sync inside an epoch): divergence, the
        progress line; whether any variant still trains."""
        live = []
        for r, a in zip(self.runs, _host_acc(self.acc), strict=True):
            loss = a['loss'] / max(a['count'], 1.0)
            if r.active and not math.isfinite(loss):
                r.status, r.diverged_at = 'diverged', gstep
                r.report.line(f'\nDiverged{r.report.tag} at step {gstep}: training loss is {loss}.')
                self._mask()
            elif r.active:
                live.append((loss, a['correct'] / max(a['count'], 1.0)))
                r.report.scalars(gstep, {'train_loss_running': loss})
        if live:
            loss, accuracy = np.mean(live, axis=0)
            self.progress.update(
                gstep, epoch + 1, self.config.num_epochs, loss=float(loss), accuracy=float(accuracy)
            )
        return bool(live)

    def _save_latest(self, step: int, epoch: int, step_in_epoch: int) -> None:
        """Each variant's state at `step`, with where the loop was and its running sums."""
        for k, (r, a) in enumerate(zip(self.runs, _host_acc(self.acc), strict=True)):
            loop = {'epoch': epoch, 'step_in_epoch': step_in_epoch, 'acc': a}
            if r.diverged_at is not None:  # Only a stack saves after a variant diverged.
                loop['diverged_at_step'] = r.diverged_at
            r.ckpt.save_latest(step, self.steps.variant(self.state, k), loop)

    def _save_and_stop(self, gstep: int, epoch: int, step_in_epoch: int) -> None:
        jax.block_until_ready(self.state)
        self._save_latest(gstep, epoch, step_in_epoch)
        for r in self.runs:
            r.ckpt.wait()
        self.progress.end_line()
        raise Interrupted(gstep, ', '.join(str(r.workdir) for r in self.runs))

    def end_epoch(self, epoch: int) -> None:
        """The epoch's last evaluation, then the latest checkpoints."""
        self.evaluate_point(epoch, self.steps_per_epoch)
        every = max(1, self.config.checkpoint_every_epochs)
        if (epoch + 1) % every == 0 or epoch + 1 == self.config.num_epochs:
            self._save_latest(int(self.state.step), epoch + 1, 0)

    def evaluate_point(self, epoch: int, step_in_epoch: int) -> None:
        """Each active variant's evaluation after `step_in_epoch` steps of `epoch`: its row
        (train metrics since the last evaluation), best checkpoint and early-stopping check."""
        config, step, n = self.config, int(self.state.step), self.config.evals_per_epoch
        # Whole epochs with one evaluation per epoch; otherwise evaluation i of n in epoch e
        # is e + i/n: 0.5, 1.0, 1.5 ... (the row's step says where exactly).
        i = self.eval_points.index(step_in_epoch) + 1
        label = epoch + 1 if n == 1 else round(epoch + i / n, 4)
        stopping = []
        for k, (r, a) in enumerate(zip(self.runs, _host_acc(self.acc), strict=True)):
            if not r.active:
                continue
            state_k, count = self.steps.variant(self.state, k), max(a['count'], 1.0)
            row = {'epoch': label, 'step': step, 'train_loss': a['loss'] / count}
            row['train_accuracy'] = a['correct'] / count
            for split in ('val', 'test'):
                if split in self.splits and (split == 'val' or config.eval_test_each_epoch):
                    m = self._evaluate(state_k, split)[0]
                    row.update({f'{split}_loss': m['loss'], f'{split}_accuracy': m['accuracy']})
            lr = steps.optax_learning_rate(state_k, r.config, self.steps_per_epoch)
            row.update(learning_rate=lr, elapsed_s=round(time.perf_counter() - self.t_start, 3))
            r.history.append(row)
            r.report.epoch(row)
            if r.observe(row, self.monitor, self.mode, config.early_stopping):
                r.ckpt.save_best(step, state_k, r.best_value)
            if r.stopped_early:
                stopping.append(r)
        self.acc = jax.device_put(self.steps.zero_metrics(), parallel.replicated(self.mesh))
        unit = 'epochs' if config.evals_per_epoch == 1 else 'evaluations'
        for r in stopping:
            r.report.line(
                f'Early stopping{r.report.tag} after epoch {label}: {self.monitor} has not '
                f'improved for {r.bad_epochs} {unit} (best {r.best_value:.4f} at epoch '
                f'{r.best_epoch}).'
            )
        if stopping:
            self._mask()

    def _evaluate(self, state: steps.TrainState, split: str, predictions: bool = False):
        """`split`'s metrics of the state's moving average when it keeps one (cnn_jax.ema)."""
        state = ema.weights_to_evaluate(state)
        data = self.splits[split]
        if split == 'train':  # Val and test were capped when they were loaded.
            data = data.strided(self.config.max_eval_examples)
        return steps.evaluate(
            self.steps.evaluation, state, data, self.config.eval_batch_size, predictions
        )

    def results(self) -> list[TrainResult]:
        """Each variant's state to test (its best when early stopping is on, as Keras'
        restore_best_weights), evaluated on every split, and its records closed."""
        steps_per_s = self.timed_steps / self.timed_s if self.timed_s > 0 else float('nan')
        results = []
        for k, r in enumerate(self.runs):
            r.ckpt.wait()
            state = self.steps.variant(self.state, k)
            if self.config.early_stopping.patience > 0 and r.status == 'completed':
                best = r.ckpt.restore_best(state)
                state = state if best is None else best
            evals = {split: self._evaluate(state, split, split == 'test') for split in self.splits}
            if state.ema is not None:  # The report gives the raw weights' accuracy too.
                evals['test_raw'] = self._evaluate(ema.raw_weights(state), 'test')
            r.ckpt.close()
            r.report.close()
            results.append(
                TrainResult(
                    state=state,
                    history=r.history,
                    status=r.status,
                    diverged_at_step=r.diverged_at,
                    stopped_early=r.stopped_early,
                    best_epoch=r.best_epoch,
                    evals={split: m for split, (m, _) in evals.items()},
                    test_predictions=evals['test'][1],
                    steps_per_epoch=self.steps_per_epoch,
                    train_steps_per_s=steps_per_s,
                    compile_s=self.compile_s,
                    resumed_from_step=self.resumed_from,
                    num_devices=int(self.mesh.devices.size),
                )
            )
        return results

"""Orbax checkpoints: the latest N for resuming, and the best by a validation metric.

Each checkpoint holds the train state plus a small JSON record of where the loop was
(epoch, step within the epoch, the epoch's running train metrics), so a run stopped
mid-epoch resumes at the next step with nothing lost.

A run can stop or die anywhere and be re-run: a re-run replays the steps after the
checkpoint it resumed from, so a save at a step already on disk (written before the stop
or kill) is skipped, and an unreadable newest checkpoint (a truncated or missing file, a
half-written step) gives way to the one before it, with a warning.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from cnn_jax.errors import CheckpointError
from cnn_jax.records import Reporter


class Checkpoints:
    """Two Orbax CheckpointManagers under workdir/checkpoints/{latest,best}."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 2, best_mode: str = 'max'):
        root = pathlib.Path(workdir).absolute() / 'checkpoints'
        self.latest = _manager(root / 'latest', max_to_keep=max(1, keep))
        self.best = _manager(
            root / 'best', max_to_keep=1, best_fn=lambda m: m['value'], best_mode=best_mode
        )

    def save_latest(self, step: int, state: Any, loop: dict) -> None:
        _save(self.latest, step, state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop))

    def save_best(self, step: int, state: Any, value: float) -> None:
        _save(self.best, step, metrics={'value': float(value)}, state=ocp.args.StandardSave(state))

    def restore_latest(self, template: Any, max_step: int | None = None) -> tuple[Any, dict] | None:
        """(state, loop record) of the newest readable checkpoint, laid out like `template`.

        `max_step` ignores newer steps (the variants of a stack resume from a shared step).

        Newer checkpoints that cannot be read are deleted (so the re-run can save those
        steps again) once an older one restores; if none restores, nothing is deleted and
        CheckpointError says why (a changed config fails on every step, not just one).
        """
        failed: list[tuple[int, Exception]] = []
        for step in sorted(self.latest.all_steps(), reverse=True):
            if max_step is not None and step > max_step:
                continue
            try:
                restored = _restore(self.latest, step, template, loop=ocp.args.JsonRestore())
            except Exception as e:  # Orbax and TensorStore raise many types for bad files.
                failed.append((step, e))
                continue
            for bad, error in failed:
                Reporter().warn(
                    f'checkpoint step {bad} in {self.latest.directory} could not be restored '
                    f'({brief(error)}); deleting it and resuming from step {step}.'
                )
                self.latest.delete(bad)
            return restored['state'], restored['loop']
        if failed:
            raise CheckpointError(
                f'none of the checkpoints at steps {[s for s, _ in failed]} in '
                f'{self.latest.directory} could be restored (step {failed[0][0]}: '
                f'{brief(failed[0][1])}). A run with a changed config needs a new workdir.'
            ) from failed[0][1]
        return None

    def restore_best(self, template: Any) -> Any | None:
        """The best checkpoint's state; None if there is none or it cannot be read (with a
        warning): the caller keeps its latest state."""
        step = self.best.best_step()
        if step is None:
            return None
        try:
            restored = _restore(self.best, step, template)
        except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types.
            Reporter().warn(
                f'the best checkpoint (step {step}) in {self.best.directory} could not be '
                f'restored ({brief(e)}); keeping the latest state instead.'
            )
            return None
        return restored['state']

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def restore_read_only(
    workdir: str | pathlib.Path, which: str, template: Any
) -> tuple[Any, int] | None:
    """(state, step) of the newest checkpoint in workdir/checkpoints/`which` ('latest', or
    'best', which keeps one), laid out like `template`, or None if there is none. Read
    only: nothing is created, cleaned up or deleted (evaluation-only runs), so a run
    training there meanwhile keeps its files."""
    directory = pathlib.Path(workdir).absolute() / 'checkpoints' / which
    if not directory.is_dir():
        return None
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    manager = ocp.CheckpointManager(directory, options=options)
    try:
        step = manager.latest_step()
        return None if step is None else (_restore(manager, step, template)['state'], step)
    finally:
        manager.close()


def _manager(directory: pathlib.Path, **options: Any) -> ocp.CheckpointManager:
    """A manager of `directory`; a save cut short by a kill leaves a temporary directory,
    which it cleans up.

    Multi-process saves synchronise at barriers named by the step: the two managers save
    the same step at an epoch's end, concurrently (async), so their names must differ.
    """
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(
            create=True,
            cleanup_tmp_directories=True,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix=directory.name
            ),
            **options,
        ),
    )


def _save(
    manager: ocp.CheckpointManager, step: int, metrics: dict | None = None, **items: Any
) -> None:
    """Saves `items` (Orbax save args by name) as `step` unless it is on disk already (module
    doc; Orbax refuses a step twice). The run is deterministic, so that step holds the same
    state (a stop on an epoch's last step records 'all its steps done' where the epoch's end
    records 'epoch done'; resuming from either redoes the same end-of-epoch work)."""
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def brief(error: Exception) -> str:
    """The error's type and first line (TensorStore's messages run to pages)."""
    lines = str(error).strip().splitlines()
    return f'{type(error).__name__}: {lines[0][:200] if lines else ""}'


def _restore(manager: ocp.CheckpointManager, step: int, template: Any, **items: Any) -> dict:
    """`step`'s state (and `items`, Orbax restore args by name), the state laid out like
    `template`: its shapes, dtypes and shardings, so it lands where the template lives."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return np.asarray(x)

    target = jax.tree.map(leaf, template)
    try:
        return _restore_as(manager, step, target, **items)
    except ValueError as e:
        absent = _none_fields(target)
        if not absent or 'tree structures do not match' not in str(e):
            raise
    # Saved before a field was added whose value here is None (TrainState.ema, issue 21): the
    # same tree without it, by field name, as Orbax stores a dataclass.
    fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)}
    kept = {k: v for k, v in fields.items() if k not in absent and _is_data(target, k)}
    restored = _restore_as(manager, step, kept, **items)
    return {**restored, 'state': template.replace(**restored['state'])}


def _restore_as(manager: ocp.CheckpointManager, step: int, target: Any, **items: Any) -> dict:
    state = ocp.args.StandardRestore(target)
    return manager.restore(step, args=ocp.args.Composite(state=state, **items))


def _is_data(obj: Any, name: str) -> bool:
    """Whether a flax.struct field is a pytree node (saved), not static (apply_fn, tx)."""
    field = next(f for f in dataclasses.fields(obj) if f.name == name)
    return field.metadata.get('pytree_node', True)


def _none_fields(target: Any) -> set[str]:
    """The data fields of a flax.struct dataclass that are None (empty), if it is one."""
    if not dataclasses.is_dataclass(target):
        return set()
    names = (f.name for f in dataclasses.fields(target))
    return {n for n in names if getattr(target, n) is None and _is_data(target, n)}

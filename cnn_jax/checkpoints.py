"""Orbax checkpoints: the latest N for resuming, and the best by a validation metric.

Each checkpoint holds the train state plus a small JSON record of where the loop was
(epoch, step within the epoch, the epoch's running train metrics), so a run stopped
mid-epoch resumes at the next step with nothing lost.
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpoints:
    """Two Orbax CheckpointManagers under workdir/checkpoints/{latest,best}."""

    def __init__(self, workdir: str | pathlib.Path, keep: int = 2, best_mode: str = 'max'):
        root = pathlib.Path(workdir).absolute() / 'checkpoints'
        self.latest = ocp.CheckpointManager(
            root / 'latest',
            options=ocp.CheckpointManagerOptions(max_to_keep=max(1, keep), create=True),
        )
        self.best = ocp.CheckpointManager(
            root / 'best',
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1,
                create=True,
                best_fn=lambda m: m['value'],
                best_mode=best_mode,
            ),
        )

    def save_latest(self, step: int, state: Any, loop: dict) -> None:
        self.latest.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), loop=ocp.args.JsonSave(loop)
            ),
            force=True,
        )

    def save_best(self, step: int, state: Any, value: float) -> None:
        self.best.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state)),
            metrics={'value': float(value)},
            force=True,
        )

    def restore_latest(self, template: Any) -> tuple[Any, dict] | None:
        """(state, loop record) of the latest checkpoint, laid out like `template`."""
        step = self.latest.latest_step()
        if step is None:
            return None
        restored = self.latest.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract(template)), loop=ocp.args.JsonRestore()
            ),
        )
        return restored['state'], restored['loop']

    def restore_best(self, template: Any) -> Any | None:
        step = self.best.best_step()
        if step is None:
            return None
        restored = self.best.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(_abstract(template)))
        )
        return restored['state']

    def wait(self) -> None:
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.latest.close()
        self.best.close()


def _abstract(tree: Any) -> Any:
    """Shape/dtype/sharding skeleton, so the restore lands where the template lives."""

    def leaf(x):
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        return np.asarray(x)

    return jax.tree.map(leaf, tree)

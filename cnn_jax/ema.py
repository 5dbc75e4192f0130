"""Exponential moving average of the weights (config.ema_decay; timm's --model-ema).

The average lives in the train state (`TrainState.ema`, None when off), so it is
replicated, donated, checkpointed, restored on resume and stacked in vmapped sweeps
exactly as the weights are. After each optimiser step n (0 for the first)

    ema <- d * ema + (1 - d) * weights,  d = ema_decay, or with ema_warmup
    d = min(ema_decay, (1 + n) / (10 + n))

the warmup of tf.train.ExponentialMovingAverage's `num_updates` (not timm ModelEmaV3's
1 - (1 + n / gamma) ** -power): early averages are not dominated by the random start.

BatchNorm statistics are averaged with the same decay, not recomputed. That is what timm's
ModelEmaV2/V3 do (they average every buffer of the state dict); recomputing would take a
pass over training data at every evaluation, and averaged statistics track averaged
weights closely once the decay is near 1, where EMA is used.

Evaluation, the best checkpoint's metric and the report use the average
(`weights_to_evaluate`); the report adds the raw weights' final test accuracy.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

Ema = dict[str, Any]  # {'params': ..., 'batch_stats': ...}, the averages.


def init(params: Any, batch_stats: Any) -> Ema:
    """The average at step 0: copies of the initial weights (own buffers, so donating
    the state never donates one buffer twice)."""
    return jax.tree.map(jnp.copy, {'params': params, 'batch_stats': batch_stats})


def decay_at(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
    """The decay applied after optimiser step `step` (0-based; module doc)."""
    if not warmup:
        return jnp.float32(decay)
    n = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + n) / (10.0 + n))


def update(ema: Ema, params: Any, batch_stats: Any, decay: jax.Array) -> Ema:
    """One averaging step towards the new weights and statistics."""
    new = {'params': params, 'batch_stats': batch_stats}
    return jax.tree.map(lambda e, w: decay * e + (1.0 - decay) * w, ema, new)


def weights_to_evaluate(state: Any) -> Any:
    """`state` with its averaged weights and statistics in place of the raw ones (itself
    when it keeps no average); either way without the average, so evaluation compiles
    one program for both."""
    if state.ema is None:
        return state
    return state.replace(params=state.ema['params'], batch_stats=state.ema['batch_stats'], ema=None)


def raw_weights(state: Any) -> Any:
    """`state` without its average: what evaluating the raw weights needs."""
    return state.replace(ema=None)

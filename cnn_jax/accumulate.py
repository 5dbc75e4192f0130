"""Gradient accumulation (config.grad_accum_steps; timm's --grad-accum-steps).

The optimiser sees batches of batch_size x grad_accum_steps examples (`optimizer_batch`):
the data pipeline delivers that many per step and the schedules count optimiser steps.
Inside the one compiled step `accumulated` runs the forward and backward passes of
grad_accum_steps micro-batches of batch_size in a `lax.scan`, so memory holds one
micro-batch's activations (plus the step's input batch), and averages their gradients:
the mean loss over the whole batch, as one big batch gives. BatchNorm normalises each
micro-batch by its own statistics and updates the running ones once per micro-batch, in
order, as PyTorch (timm) does when it accumulates.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections


def optimizer_batch(config: ml_collections.ConfigDict) -> int:
    """The examples per optimiser step: batch_size x grad_accum_steps."""
    return config.batch_size * config.grad_accum_steps


def micro_batches(batch: dict[str, jax.Array], k: int) -> dict[str, jax.Array]:
    """Each (k * B, ...) leaf as (k, B, ...); micro-batch a holds rows a, a + k, a + 2k ...

    Taking every k-th row keeps each device's rows on it: a device holding a contiguous
    block of the big batch holds its share of every micro-batch.
    """

    def split(x):
        return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


# (batch_stats, micro-batch, dropout key) -> (grads, batch_stats, per-example loss, logits)
GradFn = Callable[[Any, dict[str, jax.Array], jax.Array], tuple[Any, Any, jax.Array, jax.Array]]


def accumulated(
    grad_fn: GradFn,
    params: Any,
    batch_stats: Any,
    batch: dict[str, jax.Array],
    dropout_rng: jax.Array,
    k: int,
) -> tuple[Any, Any, jax.Array, jax.Array, jax.Array]:
    """(mean gradient, batch_stats, per-example loss, logits, labels) over `batch` in k
    micro-batches; the last three flattened in the same order. Micro-batch a's dropout
    key is `dropout_rng` folded with a."""

    def body(carry, xs):
        grad_sum, stats = carry
        micro, a = xs
        grads, stats, per_example, logits = grad_fn(
            stats, micro, jax.random.fold_in(dropout_rng, a)
        )
        return (jax.tree.map(jnp.add, grad_sum, grads), stats), (per_example, logits)

    micro = micro_batches(batch, k)
    zeros = jax.tree.map(jnp.zeros_like, params)
    (grad_sum, batch_stats), (per_example, logits) = jax.lax.scan(
        body, (zeros, batch_stats), (micro, jnp.arange(k))
    )
    grads = jax.tree.map(lambda g: g / k, grad_sum)
    flat = micro['label'].reshape(-1, *micro['label'].shape[2:])  # Soft targets too.
    return grads, batch_stats, per_example.reshape(-1), logits.reshape(-1, logits.shape[-1]), flat

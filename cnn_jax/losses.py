"""Per-example classification losses, chosen by `config.loss`.

'mse' and 'l1' compare softmax outputs with one-hot targets and average over classes,
so a batch mean equals PyTorch's `MSELoss()` / `L1Loss()` on the same tensors.

Every loss here takes soft targets too (rows of probabilities: mixup's and CutMix's,
cnn_jax.data.augment.mix), so none refuses them: cross-entropy against a distribution is
timm's SoftTargetCrossEntropy, and 'mse' and 'l1' compare probabilities with
probabilities. Label smoothing (cross-entropy only) applies to them as to one-hot targets,
after the mixing, as timm's `mixup_target` does.
"""

import jax
import jax.numpy as jnp
import optax

from cnn_jax.errors import ConfigError

LOSSES = ('cross_entropy', 'mse', 'l1')


def check_loss(name: str, label_smoothing: float = 0.0) -> None:
    if name not in LOSSES:
        raise ConfigError(f'unknown loss {name!r}; known losses: {", ".join(LOSSES)}')
    if not 0.0 <= label_smoothing < 1.0:
        raise ConfigError(f'label_smoothing must be in [0, 1), got {label_smoothing}')


def per_example_loss(
    logits: jnp.ndarray,
    labels: jnp.ndarray,
    name: str = 'cross_entropy',
    label_smoothing: float | jax.Array = 0.0,
) -> jnp.ndarray:
    """Loss of each example: logits (N, C) float, labels (N,) int or soft targets (N, C)
    float -> (N,).

    `label_smoothing` may be a traced scalar (one per variant of a vectorised sweep).
    """
    traced = not isinstance(label_smoothing, int | float)
    check_loss(name, 0.0 if traced else label_smoothing)
    logits = logits.astype(jnp.float32)
    if labels.ndim == logits.ndim:  # Soft targets.
        one_hot = labels.astype(jnp.float32)
    else:
        one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    if name == 'cross_entropy':
        if traced or label_smoothing:
            one_hot = optax.smooth_labels(one_hot, label_smoothing)
        return optax.softmax_cross_entropy(logits, one_hot)
    probs = jax.nn.softmax(logits)
    if name == 'mse':
        return jnp.mean((probs - one_hot) ** 2, axis=-1)
    return jnp.mean(jnp.abs(probs - one_hot), axis=-1)

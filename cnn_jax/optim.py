"""Optax optimisers and learning-rate schedules built from the config.

The numeric hyperparameters (learning_rate, weight_decay, momentum) are injected into
the optimiser state (`optax.inject_hyperparams`), so a vectorised sweep can give each
stacked copy of the state its own values.
"""

from collections.abc import Callable, Sequence
from typing import Any

import ml_collections
import optax
from flax import traverse_util

from cnn_jax.errors import ConfigError

OPTIMIZERS = ('sgd', 'momentum', 'nesterov', 'adam', 'adamw')
SCHEDULES = ('constant', 'step', 'cosine', 'warmup_cosine')
WEIGHT_DECAY_MODES = ('coupled', 'decoupled')


def build_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
    """The learning-rate multiplier per step (1.0 at peak); the peak is config.learning_rate."""
    total = max(1, int(config.num_epochs * steps_per_epoch))
    name = config.schedule
    if name == 'constant':
        return optax.constant_schedule(1.0)
    if name == 'step':
        bounds = {int(e * steps_per_epoch): config.step_factor for e in config.step_epochs}
        return optax.piecewise_constant_schedule(1.0, bounds)
    if name == 'cosine':
        return optax.cosine_decay_schedule(1.0, total)
    if name == 'warmup_cosine':
        warmup = int(config.warmup_epochs * steps_per_epoch)
        return optax.warmup_cosine_decay_schedule(0.0, 1.0, max(1, warmup), max(total, warmup + 1))
    raise ConfigError(f'unknown schedule {name!r}; known schedules: {", ".join(SCHEDULES)}')


def _chain(
    learning_rate: float,
    weight_decay: float,
    momentum: float,
    config: ml_collections.ConfigDict,
    schedule: optax.Schedule,
) -> optax.GradientTransformation:
    """config.optimizer's transformation at the (injected) numbers given."""
    name = config.optimizer
    decoupled = config.weight_decay_mode == 'decoupled' or name == 'adamw'
    parts = []
    if config.grad_clip_norm:
        parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
    if not decoupled:  # PyTorch-style L2: grad += wd * param, before momentum/Adam.
        parts.append(optax.add_decayed_weights(weight_decay))
    if name in ('momentum', 'nesterov'):
        parts.append(optax.trace(decay=momentum, nesterov=name == 'nesterov'))
    elif name in ('adam', 'adamw'):
        parts.append(optax.scale_by_adam(b1=config.b1, b2=config.b2, eps=config.eps))
    if decoupled:  # AdamW-style: update += wd * param, scaled by the learning rate below.
        parts.append(optax.add_decayed_weights(weight_decay))
    parts.append(optax.scale_by_schedule(schedule))
    parts.append(optax.scale(-learning_rate))
    return optax.chain(*parts)


def is_frozen(name: str, freeze: Sequence[str], head: str) -> bool:
    """Whether config.freeze freezes the top-level module `name` (the head never is)."""
    if name == head:
        return False
    return 'backbone' in freeze or any(name == f or name.startswith(f) for f in freeze)


def param_labels(params: Any, freeze: tuple[str, ...], head: str, backbone_factor: float) -> Any:
    """'frozen' / 'backbone' / 'head' per parameter, by its top-level module name."""
    top = list(params.keys())
    if 'backbone' in freeze and head not in top:
        raise ConfigError(f"freeze=('backbone',) needs a head named {head!r}; the model has {top}")
    for f in freeze:
        if f != 'backbone' and not any(k == f or k.startswith(f) for k in top):
            raise ConfigError(f'freeze names {f!r}, which matches no parameters; known: {top}')

    def label(path: tuple[str, ...]) -> str:
        name = path[0]
        if name == head:
            return 'head'
        if is_frozen(name, freeze, head):
            return 'frozen'
        return 'backbone' if backbone_factor != 1.0 else 'head'

    return traverse_util.unflatten_dict({k: label(k) for k in traverse_util.flatten_dict(params)})


def build_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int, params: Any = None
) -> optax.GradientTransformation:
    """The optax transformation for config.optimizer, schedule, decay, clipping, freezing."""
    name = config.optimizer
    if name not in OPTIMIZERS:
        raise ConfigError(f'unknown optimizer {name!r}; known optimizers: {", ".join(OPTIMIZERS)}')
    mode = config.weight_decay_mode
    if mode not in WEIGHT_DECAY_MODES:
        raise ConfigError(f"weight_decay_mode must be 'coupled' or 'decoupled', got {mode!r}")
    if config.learning_rate <= 0:
        raise ConfigError(f'learning_rate must be positive, got {config.learning_rate}')
    schedule = build_schedule(config, steps_per_epoch)
    factory: Callable[..., optax.GradientTransformation] = optax.inject_hyperparams(
        lambda learning_rate, weight_decay, momentum: _chain(
            learning_rate, weight_decay, momentum, config, schedule
        )
    )

    def make(lr_factor: float = 1.0) -> optax.GradientTransformation:
        return factory(
            learning_rate=config.learning_rate * lr_factor,
            weight_decay=config.weight_decay,
            momentum=config.momentum,
        )

    freeze = tuple(config.freeze)
    factor = float(config.backbone_lr_factor)
    if not freeze and factor == 1.0:
        return make()
    if params is None:
        raise ConfigError('freezing or backbone_lr_factor needs the parameters to label')
    labels = param_labels(params, freeze, config.head_name, factor)
    return optax.multi_transform(
        {'head': make(), 'backbone': make(factor), 'frozen': optax.set_to_zero()}, labels
    )

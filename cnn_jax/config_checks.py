"""The values of an experiment config, checked up front against what they can mean, and
overrides of them (`apply_overrides`: a study's variants, a sweep's).

`check_config(config)` raises a ConfigError naming the first bad key, before any data is
read or anything compiled: a negative batch size or a validation fraction of 1 would
otherwise fail deep inside JAX, or silently train nothing. It covers the keys of
configs/default.py; keys a config does not have are not checked (the config's type
checks and the modules that read a key cover the rest).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import ml_collections

from cnn_jax.data.stream import INPUT_MODES
from cnn_jax.errors import ConfigError
from cnn_jax.losses import LOSSES
from cnn_jax.models import DTYPES, MODELS
from cnn_jax.models.torch_init import INITS
from cnn_jax.optim import OPTIMIZERS, SCHEDULES, WEIGHT_DECAY_MODES

Check = Callable[[Any], bool]


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _whole(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _at_least(low: float, whole: bool = False) -> Check:
    kind = _whole if whole else _number
    return lambda x: kind(x) and x >= low


def _above(low: float) -> Check:
    return lambda x: _number(x) and x > low


def _fraction(x: Any) -> bool:
    return _number(x) and 0 <= x < 1


def _probability(x: Any) -> bool:
    return _number(x) and 0 <= x <= 1


def _optional(check: Check) -> Check:
    return lambda x: x is None or check(x)


def _numbers_above_zero(x: Any) -> bool:
    return isinstance(x, Sequence) and all(_above(0)(e) for e in x)


# (dotted key, check, what the value must be).
RULES: tuple[tuple[str, Check, str], ...] = (
    ('val_fraction', _fraction, 'in [0, 1)'),
    ('data_seed', _at_least(0, whole=True), 'a whole number >= 0'),
    ('image_size', _optional(_at_least(0, whole=True)), 'a size in pixels (0 or None: as stored)'),
    ('max_train_examples', _optional(_at_least(1, whole=True)), 'a whole number >= 1 or None'),
    ('max_eval_examples', _optional(_at_least(1, whole=True)), 'a whole number >= 1 or None'),
    ('device_memory_budget_gb', _at_least(0), '>= 0 (0: from the device)'),
    ('augment.crop_padding', _at_least(0, whole=True), 'a whole number of pixels >= 0'),
    ('augment.rotation_degrees', _at_least(0), '>= 0'),
    ('augment.scale', _fraction, 'in [0, 1)'),
    ('augment.mixup_alpha', _at_least(0), '>= 0 (0: off)'),
    ('augment.cutmix_alpha', _at_least(0), '>= 0 (0: off)'),
    ('augment.mix_prob', _probability, 'a probability in [0, 1]'),
    ('augment.switch_prob', _probability, 'a probability in [0, 1]'),
    ('num_epochs', _at_least(1, whole=True), 'a whole number >= 1'),
    ('batch_size', _at_least(1, whole=True), 'a whole number >= 1'),
    ('eval_batch_size', _at_least(1, whole=True), 'a whole number >= 1'),
    ('learning_rate', _above(0), '> 0'),
    ('momentum', _fraction, 'in [0, 1)'),
    ('b1', _fraction, 'in [0, 1)'),
    ('b2', _fraction, 'in [0, 1)'),
    ('eps', _above(0), '> 0'),
    ('weight_decay', _at_least(0), '>= 0'),
    ('warmup_epochs', _at_least(0), '>= 0'),
    ('step_epochs', _numbers_above_zero, 'a tuple of epochs > 0'),
    ('step_factor', _above(0), '> 0'),
    ('grad_clip_norm', _optional(_above(0)), '> 0 or None'),
    ('grad_accum_steps', _at_least(1, whole=True), 'a whole number >= 1 (1: off)'),
    ('ema_decay', _fraction, 'in [0, 1) (0: off)'),
    ('backbone_lr_factor', _at_least(0), '>= 0'),
    ('label_smoothing', _fraction, 'in [0, 1)'),
    ('sanity_loss_tolerance', _above(0), '> 0'),
    ('early_stopping.patience', _at_least(0, whole=True), 'a whole number of evaluations >= 0'),
    ('evals_per_epoch', _at_least(1, whole=True), 'a whole number >= 1'),
    ('early_stopping.min_delta', _at_least(0), '>= 0'),
    ('seed', _at_least(0, whole=True), 'a whole number >= 0'),
    ('log_every_steps', _at_least(1, whole=True), 'a whole number >= 1'),
    ('checkpoint_every_epochs', _at_least(1, whole=True), 'a whole number >= 1'),
    ('keep_checkpoints', _at_least(1, whole=True), 'a whole number >= 1'),
    ('steps_per_epoch', _optional(_at_least(1, whole=True)), 'a whole number >= 1 or None'),
    ('profile_steps', _at_least(0, whole=True), 'a whole number of steps >= 0 (0: off)'),
)

# (key, plural, the known values): the names the modules that read these keys accept.
CHOICES: tuple[tuple[str, str, Sequence[str]], ...] = (
    ('input_mode', 'input_modes', INPUT_MODES),
    ('model', 'models', sorted(MODELS)),
    ('dtype', 'dtypes', tuple(DTYPES)),
    ('init', 'inits', INITS),
    ('optimizer', 'optimizers', OPTIMIZERS),
    ('schedule', 'schedules', SCHEDULES),
    ('weight_decay_mode', 'weight_decay_modes', WEIGHT_DECAY_MODES),
    ('loss', 'losses', LOSSES),
)

_MISSING = object()


def _lookup(config: ml_collections.ConfigDict, key: str) -> Any:
    node: Any = config
    for part in key.split('.'):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def config_value(config: ml_collections.ConfigDict, key: str, variant: str = '') -> Any:
    """The value at dotted `key`; ConfigError if the config (of `variant`) has none."""
    value = _lookup(config, key)
    if value is _MISSING:
        raise ConfigError(f'the config of variant {variant!r} has no key {key!r}')
    return value


def _model_fields(config: ml_collections.ConfigDict) -> set[str] | None:
    """Names of the fields of config.model (the keys model_options may hold), or None."""
    cls = MODELS.get(config.model)
    while hasattr(cls, 'func'):  # functools.partial alias
        cls = cls.func
    if cls is None or not dataclasses.is_dataclass(cls):
        return None
    return {f.name for f in dataclasses.fields(cls)} - {'parent', 'name', 'num_classes'}


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: dict[str, Any], variant: str = ''
) -> ml_collections.ConfigDict:
    """Returns a copy of `config` with dotted-path `overrides` set.

    Raises ConfigError naming the key and variant when a key is not in the config (under
    `model_options`, a field of the model is accepted) or a value has the wrong type.
    """
    config = copy.deepcopy(config)
    where = f' of variant {variant!r}' if variant else ''
    # Set 'model' first: model_options keys are checked against the variant's model.
    keys = sorted(overrides, key=lambda k: k != 'model')
    with config.unlocked():
        for key in keys:
            value = overrides[key]
            *parents, leaf = key.split('.')
            node = config
            for i, part in enumerate(parents):
                if not isinstance(node, ml_collections.ConfigDict) or part not in node:
                    raise ConfigError(
                        f'override {key!r}{where}: the config has no {".".join(parents[: i + 1])!r}'
                    )
                node = node[part]
            if not isinstance(node, ml_collections.ConfigDict):
                raise ConfigError(f'override {key!r}{where}: {".".join(parents)!r} is not a group')
            if leaf not in node:
                fields = _model_fields(config) if parents == ['model_options'] else None
                if fields is None or leaf not in fields:
                    known = sorted(fields) if fields else sorted(node.keys())
                    raise ConfigError(
                        f'override {key!r}{where}: the config has no such key; '
                        f'keys there: {", ".join(known)}'
                    )
            try:
                node[leaf] = value
            except (TypeError, ValueError) as e:
                raise ConfigError(f'override {key!r}{where}: {e}') from None
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError naming the first key of RULES or CHOICES whose value is nonsense."""
    for key, ok, must in RULES:
        value = _lookup(config, key)
        if value is not _MISSING and not ok(value):
            raise ConfigError(f'config.{key} must be {must}, got {value!r}')
    for key, plural, known in CHOICES:
        value = _lookup(config, key)
        if value is not _MISSING and value not in known:
            raise ConfigError(f'unknown {key} {value!r}; known {plural}: {", ".join(known)}')

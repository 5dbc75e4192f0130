"""Train state, the pure train and eval steps, and their compiled, sharded forms.

`train_step` and `eval_step` are plain functions of arrays (testable on their own).
`compile_steps` wraps them with the on-device input pipeline (gather, augment, normalise)
into functions compiled once with `jax.jit` over the 'data' mesh, the state donated;
`plain_steps` packs them for the training loop (a plain run: K = 1 variant). `evaluate`
runs the eval step over a whole split, resident or streamed.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.training import train_state
from jax.sharding import Mesh

from cnn_jax import accumulate, losses, optim, parallel
from cnn_jax import ema as ema_lib
from cnn_jax.data import augment as augment_lib
from cnn_jax.models import torch_init

Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """Flax TrainState plus the BatchNorm statistics (empty dict for models without BN)
    and the weights' moving average (cnn_jax.ema; None when config.ema_decay is 0)."""

    batch_stats: Any = None
    ema: Any = None


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """The train step's levers, jit constants; the defaults change nothing."""

    ema_decay: float = 0.0  # cnn_jax.ema
    ema_warmup: bool = False
    grad_accum_steps: int = 1  # cnn_jax.accumulate

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> StepOptions:
        return cls(float(config.ema_decay), bool(config.ema_warmup), config.grad_accum_steps)


# XLA:CPU compiles the initialiser's random draws slowly at its default LLVM optimisation
# level; level 1 gives the same bits 2.3-6x sooner (idle, 2 cores: SimpleNN 3.0 -> 0.5 s,
# ResNet-20 4.1 -> 1.3 s; `python -m benchmarks.init_compile`; tests/test_steps.py checks the
# bits against the default compile). Level 0 changes the bits: not used.
INIT_CPU_COMPILER_OPTIONS = {'xla_backend_optimization_level': 1}


def init_variables(
    model: nn.Module, input_shape: tuple[int, ...], rng: jax.Array, init: str = 'module'
) -> dict:
    """Initialises the model's variables on one dummy example of `input_shape` (H, W, C).

    `init` is config.init: 'module' keeps each layer's initialiser, 'torch' re-draws conv
    and dense layers as PyTorch's defaults do (cnn_jax.models.torch_init).
    """
    params_rng, dropout_rng = jax.random.split(rng)
    x = jnp.zeros((1, *input_shape), jnp.float32)
    options = INIT_CPU_COMPILER_OPTIONS if jax.default_backend() == 'cpu' else None
    variables = jax.jit(functools.partial(model.init, train=False), compiler_options=options)(
        {'params': params_rng, 'dropout': dropout_rng}, x
    )
    return torch_init.apply_init(variables, init, jax.random.fold_in(params_rng, 1))


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    input_shape: tuple[int, ...],
    rng: jax.Array,
    steps_per_epoch: int,
) -> TrainState:
    """Fresh variables (or pretrained ones from config.pretrained) and the optimiser.

    With config.freeze, the frozen groups' BatchNorm layers keep their running statistics
    in training too (`frozen_norm_apply`).
    """
    variables = init_variables(model, input_shape, rng, config.init)
    if config.pretrained:
        from cnn_jax.transfer.weights import load_torchvision  # torch/safetensors: lazy.

        variables = load_torchvision(config.pretrained, variables, arch=config.model)
    params = variables['params']
    tx = optim.build_optimizer(config, steps_per_epoch, params)  # Checks config.freeze too.
    apply_fn = model.apply
    if config.freeze:
        freeze, head = tuple(config.freeze), config.head_name
        apply_fn = frozen_norm_apply(model, lambda name: optim.is_frozen(name, freeze, head))
    batch_stats = variables.get('batch_stats', {})
    ema = ema_lib.init(params, batch_stats) if config.ema_decay > 0 else None
    return TrainState.create(
        apply_fn=apply_fn, params=params, tx=tx, batch_stats=batch_stats, ema=ema
    )


def frozen_norm_apply(model: nn.Module, frozen: Callable[[str], bool]) -> Callable[..., Any]:
    """`model.apply` in which BatchNorm layers of frozen groups keep their running statistics.

    `frozen(name)` says whether the top-level module `name` is frozen (config.freeze). In
    training mode a frozen group's BatchNorm normalises with its running mean and variance
    and leaves them as they are, as in evaluation: the optimiser keeps its scale and bias,
    and this keeps the statistics (ImageNet's, after an import) and the features they give.
    Other BatchNorm layers, and every layer in evaluation mode, run as before.
    """

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (
            isinstance(module, nn.BatchNorm)
            and context.method_name == '__call__'
            and module.use_running_average is False
            and module.path
            and frozen(module.path[0])
        ):
            # The same layer bound to the same variables, in evaluation mode.
            return module.clone(parent=module.scope, use_running_average=True)(*args, **kwargs)
        return next_fun(*args, **kwargs)

    def apply(*args: Any, **kwargs: Any) -> Any:
        with nn.intercept_methods(interceptor):
            return model.apply(*args, **kwargs)

    return apply


def _sums(
    loss: jnp.ndarray, logits: jnp.ndarray, labels: jnp.ndarray, weight: jnp.ndarray
) -> Metrics:
    if labels.ndim == 2:  # Mixed soft targets: accuracy against the dominant label.
        labels = jnp.argmax(labels, -1)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return {
        'loss': jnp.sum(loss * weight),
        'correct': jnp.sum(correct * weight),
        'count': jnp.sum(weight),
    }


def train_step(
    state: TrainState,
    batch: dict[str, jnp.ndarray],
    rng: jax.Array,
    *,
    loss: str = 'cross_entropy',
    label_smoothing: float | jax.Array = 0.0,
    options: StepOptions = StepOptions(),
) -> tuple[TrainState, Metrics]:
    """One optimiser step on `batch`; returns the new state and the batch's metric sums.

    The dropout key is `rng` folded with the step number, so a resumed run draws the
    same masks as an uninterrupted one. With options.grad_accum_steps = k > 1 the batch
    is k micro-batches (cnn_jax.accumulate).
    """
    dropout_rng = jax.random.fold_in(rng, state.step)

    def grad_fn(batch_stats, batch, dropout_rng):
        def loss_fn(params):
            variables = {'params': params, 'batch_stats': batch_stats}
            logits, updates = state.apply_fn(
                variables,
                batch['image'],
                train=True,
                rngs={'dropout': dropout_rng},
                mutable=['batch_stats'],
            )
            per_example = losses.per_example_loss(logits, batch['label'], loss, label_smoothing)
            return jnp.mean(per_example), (per_example, logits, updates)

        grads, (per_example, logits, updates) = jax.grad(loss_fn, has_aux=True)(state.params)
        return grads, updates.get('batch_stats', batch_stats), per_example, logits

    k, labels = options.grad_accum_steps, batch['label']
    if k == 1:
        grads, batch_stats, per_example, logits = grad_fn(state.batch_stats, batch, dropout_rng)
    else:
        grads, batch_stats, per_example, logits, labels = accumulate.accumulated(
            grad_fn, state.params, state.batch_stats, batch, dropout_rng, k
        )
    new_state = apply_update(state, grads, batch_stats, options)
    return new_state, _sums(per_example, logits, labels, jnp.ones_like(per_example))


def apply_update(
    state: TrainState, grads: Any, batch_stats: Any, options: StepOptions = StepOptions()
) -> TrainState:
    """The optimiser's step with `grads`, the new BatchNorm statistics, then the moving
    average's step when the state keeps one."""
    new = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if new.ema is None:
        return new
    decay = ema_lib.decay_at(state.step, options.ema_decay, options.ema_warmup)
    return new.replace(ema=ema_lib.update(new.ema, new.params, new.batch_stats, decay))


def eval_step(
    state: TrainState, batch: dict[str, jnp.ndarray], *, loss: str = 'cross_entropy'
) -> tuple[Metrics, jnp.ndarray]:
    """Metric sums over the examples with batch['mask'] == 1, and every prediction."""
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    logits = state.apply_fn(variables, batch['image'], train=False)
    per_example = losses.per_example_loss(logits, batch['label'], loss)
    mask = batch.get('mask', jnp.ones_like(per_example))
    return _sums(per_example, logits, batch['label'], mask), jnp.argmax(logits, -1)


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """How batches are made from the uint8 dataset on the device (a jit constant)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int | None = None
    augment: augment_lib.AugmentConfig = augment_lib.AugmentConfig()
    num_classes: int | None = None  # For mixup's and CutMix's soft targets.

    def make_batch(
        self,
        images: jax.Array,
        labels: jax.Array,
        indices: jax.Array | None,
        rng: jax.Array | None = None,
    ) -> dict[str, jax.Array]:
        """Gathers `indices` (None: the images are the batch), converts, augments when
        `rng` is given, normalises, then mixes (mixup, CutMix) when augment.mixes: the
        labels are then soft targets (N, C)."""
        x = images if indices is None else images[indices]
        labels = labels if indices is None else labels[indices]
        resized = self.image_size is not None and x.shape[1:3] != (self.image_size,) * 2
        # Crop and flip give the same values before the float conversion as after, and on
        # uint8 they move a quarter of the bytes: on 2 CPU cores this took SimpleNN's
        # input pipeline from 7% of its step to within noise of 0 (results/benchmark).
        early = rng is not None and self.augment.moves_pixels_only and not resized
        if early:
            x = augment_lib.augment(rng, x, self.augment)
        x = augment_lib.to_unit_range(x, self.image_size)
        if rng is not None and not early:
            x = augment_lib.augment(rng, x, self.augment)
        x = augment_lib.normalize(x, np.asarray(self.mean), np.asarray(self.std))
        if rng is not None and self.augment.mixes:  # Off: no key drawn, the step as before.
            mix_rng = jax.random.fold_in(rng, 1)
            x, labels, _ = augment_lib.mix(mix_rng, x, labels, self.num_classes, self.augment)
        return {'image': x, 'label': labels}


def zero_metrics(k: int | None = None) -> Metrics:
    """Zero metric sums: scalars, or one per variant of K stacked ones."""
    shape = () if k is None else (k,)
    return {name: jnp.zeros(shape, jnp.float32) for name in ('loss', 'correct', 'count')}


def epoch_permutation(
    rng: jax.Array, epoch: int | jax.Array, num_examples: int, steps: int, batch_size: int
) -> jax.Array:
    """(steps, batch_size) example indices for `epoch`: a fresh shuffle, remainder dropped."""
    perm = jax.random.permutation(jax.random.fold_in(rng, epoch), num_examples)
    return perm[: steps * batch_size].reshape(steps, batch_size)


def input_train_step(
    spec: InputSpec,
    shard: jax.sharding.NamedSharding,
    loss: str,
    options: StepOptions = StepOptions(),
) -> Callable[..., tuple[TrainState, Metrics]]:
    """`train_step` with the input pipeline folded in, for `compile_steps` and cnn_jax.sweep.

    f(state, acc, images, labels, perm, step_in_epoch, rng, label_smoothing) -> (state, acc):
    the batch indices perm[step_in_epoch] are taken inside, so one compiled program serves
    every step, and the step's metric sums are added to `acc`. perm=None: `images` is the
    batch itself, sharded where it lies (a stream's), so no device gathers another's rows.
    """

    def train(state, acc, images, labels, perm, step_in_epoch, rng, label_smoothing):
        indices = None if perm is None else perm[step_in_epoch]
        indices = indices if indices is None else jax.lax.with_sharding_constraint(indices, shard)
        aug_rng = jax.random.fold_in(jax.random.fold_in(rng, 1), state.step)
        batch = spec.make_batch(images, labels, indices, aug_rng)
        state, metrics = train_step(
            state,
            batch,
            jax.random.fold_in(rng, 0),
            loss=loss,
            label_smoothing=label_smoothing,
            options=options,
        )
        return state, jax.tree.map(jnp.add, acc, metrics)

    return train


@dataclasses.dataclass(frozen=True)
class CompiledSteps:
    """The jitted, sharded functions the training loop calls."""

    train: Callable[..., tuple[TrainState, Metrics]]
    evaluate: Callable[..., tuple[Metrics, jax.Array]]
    permutation: Callable[..., jax.Array]


def compile_steps(
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    spec: InputSpec,
    num_train: int,
    steps_per_epoch: int,
) -> CompiledSteps:
    """jit-compiles the train and eval steps with the input pipeline folded in.

    train(state, acc, images, labels, perm, step_in_epoch, rng) -> (state, acc) is
    `input_train_step` at config.label_smoothing: nothing leaves the device between
    logging points.
    """
    repl, shard = parallel.replicated(mesh), parallel.data_sharding(mesh)
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'data'))
    options = StepOptions.from_config(config)
    train = functools.partial(
        input_train_step(spec, shard, config.loss, options), label_smoothing=config.label_smoothing
    )

    def evaluate(state, images, labels, indices, mask):
        batch = spec.make_batch(images, labels, indices)
        batch['mask'] = mask
        return eval_step(state, batch, loss=config.loss)

    def permutation(rng, epoch):
        batch = accumulate.optimizer_batch(config)
        return epoch_permutation(rng, epoch, num_train, steps_per_epoch, batch)

    return CompiledSteps(
        train=jax.jit(train, donate_argnums=(0, 1), out_shardings=(repl, repl)),
        evaluate=jax.jit(evaluate, out_shardings=(repl, shard)),
        permutation=jax.jit(permutation, out_shardings=batch_sharding),
    )


@dataclasses.dataclass(frozen=True)
class VariantSteps:
    """What the loop runs for its K variants: `plain_steps` (K=1) or cnn_jax.sweep's stack.

    `train(state, acc, images, labels, perm, step_in_epoch, rng, active)` is one step of
    every variant; `active` (K,) bool says which still train: the others' states stay as
    they are. `variant(state, k)` is variant k as an ordinary train state (what its
    checkpoints and evaluation see) and `stack` joins K of those back into `state`'s form.
    """

    state: TrainState  # Fresh, on the host or any device.
    train: Callable[..., tuple[TrainState, Metrics]]
    permutation: Callable[[int], jax.Array]  # epoch -> batch indices.
    rng: jax.Array  # The `rng` argument of `train`.
    zero_metrics: Callable[[], Metrics]
    variant: Callable[[TrainState, int], TrainState]
    stack: Callable[[Sequence[TrainState]], TrainState]
    evaluation: CompiledSteps  # Its `evaluate` takes `variant(state, k)`.


# (configs, model, input_shape, spec, mesh, num_train, steps_per_epoch) -> VariantSteps
MakeSteps = Callable[..., VariantSteps]


def plain_steps(
    configs: Sequence[ml_collections.ConfigDict],
    model: nn.Module,
    input_shape: tuple[int, ...],
    spec: InputSpec,
    mesh: Mesh,
    num_train: int,
    steps_per_epoch: int,
) -> VariantSteps:
    """One ordinary train state and cnn_jax.steps' compiled steps: a plain run (K=1)."""
    (config,) = configs  # A plain run trains one config.
    init_rng, train_rng, data_rng = jax.random.split(jax.random.key(config.seed), 3)
    state = create_train_state(config, model, input_shape, init_rng, steps_per_epoch)
    compiled = compile_steps(config, mesh, spec, num_train, steps_per_epoch)

    def step(state, acc, images, labels, perm, step_in_epoch, rng, active):
        del active  # One variant: the loop ends when it stops.
        return compiled.train(state, acc, images, labels, perm, step_in_epoch, rng)

    return VariantSteps(
        state=state,
        train=step,
        permutation=lambda epoch: compiled.permutation(data_rng, epoch),
        rng=train_rng,
        zero_metrics=zero_metrics,
        variant=lambda state, k: state,
        stack=lambda states: states[0],
        evaluation=compiled,
    )


def evaluate(
    steps: CompiledSteps,
    state: TrainState,
    split: Any,
    batch_size: int,
    with_predictions: bool = False,
) -> tuple[dict[str, float], np.ndarray | None]:
    """Mean loss and accuracy over a split on the devices (`eval_inputs`: a ResidentSplit
    or a placed stream, padding masked), and every prediction when asked."""
    total, preds = zero_metrics(), []
    for args in split.eval_inputs(batch_size):
        m, p = steps.evaluate(state, *args)
        total = jax.tree.map(jnp.add, total, m)
        if with_predictions:
            preds.append(p)
    total = jax.device_get(total)
    count = max(float(total['count']), 1.0)
    result = {'loss': float(total['loss']) / count, 'accuracy': float(total['correct']) / count}
    # Sharded across devices and processes: gathered whole once, not a host sync per batch.
    n = len(split)
    return result, (np.concatenate([parallel.to_host(p) for p in preds])[:n] if preds else None)


def optax_learning_rate(
    state: TrainState, config: ml_collections.ConfigDict, steps_per_epoch: int
) -> float:
    """The learning rate in effect at the state's step (for the logs)."""
    schedule = optim.build_schedule(config, steps_per_epoch)
    return float(config.learning_rate * schedule(int(state.step)))

"""Vectorised sweeps: K variants of one experiment trained as one compiled program.

Hyperparameters that do not change any shape can differ between the variants of a sweep
and still share one XLA program: the K train states are stacked (a leading axis of size K
on every parameter, BatchNorm statistic and optimiser-state leaf) and the train step is
`jax.vmap`-ed over them. All variants see the same batches in the same order (when they
share the seed), so the input pipeline runs once per step for all of them.

Supported keys (SWEEPABLE): learning_rate, weight_decay and momentum (the optimiser reads
them from `opt_state.hyperparams`, see cnn_jax.optim), label_smoothing (a traced value in
the loss) and seed (initial weights, dropout masks, augmentation and the epoch shuffles:
per-variant batches then). Everything else, dropout rates included (the models check them
in Python and leave the layer out at 0), changes the program: ConfigError. The variants
share the levers of the base config (ema_decay, grad_accum_steps): each variant keeps its
own moving average and accumulates its own gradients, stacked like its weights.

The stacked variants train through the one training loop
(`cnn_jax.training_loop.train_variants` with `stacked_steps`), so each variant gives the
numbers of its sequential run (`cnn_jax.experiment.run` on the variant's config), up to
float rounding: same initial weights, batches and dropout masks, its own divergence, early
stopping and checkpoints (an interrupted group resumes), and the same files in its workdir.

    from cnn_jax import sweep
    summaries = sweep.run_vectorized(config, [{'learning_rate': 0.1}, {'learning_rate': 0.01}],
                                     ['results/lr_0.1', 'results/lr_0.01'])
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn_jax import accumulate, experiment, losses, parallel, steps, training_loop
from cnn_jax.config_checks import apply_overrides
from cnn_jax.errors import ConfigError

SWEEPABLE = ('learning_rate', 'weight_decay', 'momentum', 'label_smoothing', 'seed')


# --- Variants -------------------------------------------------------------------------


def check_variants(config: ml_collections.ConfigDict, variants: Sequence[dict[str, Any]]) -> None:
    """Raises ConfigError unless `variants` can train as one vectorised program. Each variant
    is a dict of overrides of `config` (keys as in a study: dotted paths); only the SWEEPABLE
    keys may appear."""
    if not variants:
        raise ConfigError('a vectorised sweep needs at least one variant')
    for i, overrides in enumerate(variants):
        bad = sorted(k for k in overrides if k not in SWEEPABLE)
        if bad:
            raise ConfigError(
                f'variant {i} sets {", ".join(map(repr, bad))}, which cannot be vectorised (they '
                f'change the compiled program); vectorisable keys: {", ".join(SWEEPABLE)}'
            )
    if config.task != 'train':
        raise ConfigError(f'task {config.task!r} cannot be vectorised')
    if jax.process_count() > 1:
        raise ConfigError('vectorised sweeps run on one host')


def can_vectorize(config: ml_collections.ConfigDict, variants: Sequence[dict[str, Any]]) -> bool:
    """Whether `check_variants` accepts these variants (for studies choosing automatically)."""
    try:
        check_variants(config, variants)
    except ConfigError:
        return False
    return True


def should_vectorize(config: ml_collections.ConfigDict, variants: Sequence[dict[str, Any]]) -> bool:
    """Whether to vectorise automatically: allowed, more than one variant, and an
    accelerator. On CPU (2 cores, results/benchmark/sweep_cpu.md) K vmapped SimpleNN variants
    ran at 1.11x (K=2), 1.19x (K=4) and 0.84x (K=8) the speed of K separate runs: one run
    already keeps both cores busy, so there is little to gain and, at K=8, a loss. vmap pays
    where one small model leaves an accelerator idle; `config.vectorize=true` forces it."""
    return len(variants) > 1 and jax.default_backend() != 'cpu' and can_vectorize(config, variants)


def variant_configs(
    config: ml_collections.ConfigDict, variants: Sequence[dict[str, Any]]
) -> list[ml_collections.ConfigDict]:
    """`config` with each variant's overrides set (checked by `check_variants`)."""
    check_variants(config, variants)
    out = [apply_overrides(config, overrides) for overrides in variants]
    for c in out:
        losses.check_loss(c.loss, c.label_smoothing)
    return out


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the overrides that change the program, the SWEEPABLE ones)."""
    fixed = {k: v for k, v in overrides.items() if k not in SWEEPABLE}
    return fixed, {k: v for k, v in overrides.items() if k in SWEEPABLE}


def vectorizable_groups(variants: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Indices of `variants` grouped so that each group can train as one program: variants
    whose non-SWEEPABLE overrides are equal share a group (in first-seen order)."""
    groups: dict[str, list[int]] = {}
    for i, overrides in enumerate(variants):
        fixed, _ = split_overrides(overrides)
        groups.setdefault(repr(sorted(fixed.items())), []).append(i)
    return list(groups.values())


# --- Stacked states -------------------------------------------------------------------


def map_states(fn: Callable[..., jax.Array], *states: steps.TrainState) -> steps.TrainState:
    """`fn` over the matching leaves of the states' params, opt_state, batch_stats and
    moving average (cnn_jax.ema); the rest (step counter, optimiser, apply function) is
    the first state's."""
    trees = [(s.params, s.opt_state, s.batch_stats, s.ema) for s in states]
    params, opt_state, batch_stats, ema = jax.tree.map(fn, *trees)
    return states[0].replace(params=params, opt_state=opt_state, batch_stats=batch_stats, ema=ema)


def stack_states(
    states: Sequence[steps.TrainState], join: Callable[..., jax.Array] = jnp.stack
) -> steps.TrainState:
    """K train states (same model and optimiser structure) as one stacked state. The step
    counter stays a scalar (all variants step together); the optimiser and apply function are
    those of the first state, which is right because the variants differ only in the numbers
    held in `opt_state` (inject_hyperparams). `join=jnp.concatenate` joins stacks into
    one."""
    structure = jax.tree.structure(states[0].opt_state)
    for i, s in enumerate(states[1:], 1):
        if jax.tree.structure(s.opt_state) != structure:
            raise ConfigError(f'variant {i} has a different optimiser state structure')
    return map_states(lambda *xs: join(xs), *states)


def unstack_state(state: steps.TrainState, k: int | slice) -> steps.TrainState:
    """Variant `k` of a stacked state, as an ordinary train state (a slice: a smaller stack)."""
    return map_states(lambda x: x[k], state)


@dataclasses.dataclass(frozen=True)
class VariantRngs:
    """Per-variant keys, split from each variant's seed exactly as the training loop does."""

    init: jax.Array  # (K,) keys
    train: jax.Array
    data: jax.Array
    shared: bool  # Every variant has the same seed: one key, unbatched.

    @classmethod
    def from_seeds(cls, seeds: Sequence[int]) -> VariantRngs:
        keys = [jax.random.split(jax.random.key(int(s)), 3) for s in seeds]
        init, train, data = (jnp.stack([k[i] for k in keys]) for i in range(3))
        return cls(init, train, data, shared=len(set(seeds)) == 1)


def create_stacked_state(
    configs: Sequence[ml_collections.ConfigDict],
    model: Any,
    input_shape: tuple[int, ...],
    rngs: VariantRngs,
    steps_per_epoch: int,
) -> steps.TrainState:
    """Each variant's own fresh state (its seed, its hyperparameters), stacked."""
    states = [
        steps.create_train_state(c, model, input_shape, rngs.init[k], steps_per_epoch)
        for k, c in enumerate(configs)
    ]
    return stack_states(states)


# --- The vectorised step --------------------------------------------------------------


def make_vectorized_train(
    configs: Sequence[ml_collections.ConfigDict],
    mesh: Mesh,
    spec: steps.InputSpec,
    state: steps.TrainState,
    rngs: VariantRngs,
    group_size: int | None = None,
) -> Callable[..., tuple[steps.TrainState, steps.Metrics]]:
    """The jitted vectorised counterpart of `steps.compile_steps(...).train`.

    train(state, acc, images, labels, perm, step_in_epoch, rng, active=None) -> (state, acc),
    with the stacked state and metric sums (K,); `perm` and `rng` carry a leading K axis
    unless the variants share their seed. `active`, (K,) bool, keeps the state of the
    variants it marks False.

    `group_size` g < K vmaps groups of g variants side by side in the one program (same
    numbers): a vmapped convolution with per-variant kernels is a grouped convolution,
    whose cost on XLA's CPU backend grows faster than K (benchmark_vectorized).
    """
    smoothings = [float(c.label_smoothing) for c in configs]
    shared_smoothing = len(set(smoothings)) == 1
    repl = parallel.replicated(mesh)
    smoothing_arr = jnp.asarray(smoothings, jnp.float32)
    # The levers are not SWEEPABLE: every variant has configs[0]'s.
    options = steps.StepOptions.from_config(configs[0])
    body = steps.input_train_step(spec, parallel.data_sharding(mesh), configs[0].loss, options)

    def one(state, acc, images, labels, perm, step_in_epoch, rng, smoothing, active):
        # A shared smoothing stays a Python number, as in the sequential run's program.
        smoothing = smoothings[0] if shared_smoothing else smoothing
        new, acc = body(state, acc, images, labels, perm, step_in_epoch, rng, smoothing)
        if active is not None:  # A stopped variant's numbers stay as they were.
            new = map_states(lambda x, y: jnp.where(active, x, y), new, state)
        return new, acc

    per_variant = 0 if not rngs.shared else None
    # Every leaf of a stacked state on axis 0, except the shared step counter.
    axes = jax.tree.map(lambda _: 0, state).replace(step=None)
    vmapped = jax.vmap(
        one, in_axes=(axes, 0, None, None, per_variant, None, per_variant, 0, 0), out_axes=(axes, 0)
    )

    k_total = len(configs)
    group = min(group_size or k_total, k_total)

    def step(state, acc, images, labels, perm, step_in_epoch, rng, active=None):
        if group == k_total:
            return vmapped(
                state, acc, images, labels, perm, step_in_epoch, rng, smoothing_arr, active
            )
        states, accs = [], []
        for start in range(0, k_total, group):
            part = slice(start, start + group)
            st = unstack_state(state, part)
            p, r = (perm[part], rng[part]) if per_variant == 0 else (perm, rng)
            ac = jax.tree.map(lambda x, part=part: x[part], acc)
            a = None if active is None else active[part]
            st, ac = vmapped(st, ac, images, labels, p, step_in_epoch, r, smoothing_arr[part], a)
            states.append(st)
            accs.append(ac)
        joined = stack_states(states, jnp.concatenate)
        return joined, jax.tree.map(lambda *xs: jnp.concatenate(xs), *accs)

    return jax.jit(step, donate_argnums=(0, 1), out_shardings=(repl, repl))


def permutations(
    rngs: VariantRngs, epoch: int, num_train: int, steps_per_epoch: int, batch_size: int, mesh: Mesh
) -> jax.Array:
    """Each variant's epoch shuffle as the training loop draws it ((K, ...) unless shared)."""

    def fn(key: jax.Array) -> jax.Array:
        return steps.epoch_permutation(key, epoch, num_train, steps_per_epoch, batch_size)

    if rngs.shared:
        perm, spec = fn(rngs.data[0]), PartitionSpec(None, parallel.DATA_AXIS)
    else:
        perm, spec = jax.vmap(fn)(rngs.data), PartitionSpec(None, None, parallel.DATA_AXIS)
    return jax.device_put(perm, NamedSharding(mesh, spec))


# --- Running studies ------------------------------------------------------------------


def stacked_steps(
    configs: Sequence[ml_collections.ConfigDict],
    model: Any,
    input_shape: tuple[int, ...],
    spec: steps.InputSpec,
    mesh: Mesh,
    num_train: int,
    steps_per_epoch: int,
) -> steps.VariantSteps:
    """The training loop's steps for K stacked variants (cnn_jax.training_loop.train_variants)."""
    rngs = VariantRngs.from_seeds([c.seed for c in configs])
    state = create_stacked_state(configs, model, input_shape, rngs, steps_per_epoch)
    batch_size = accumulate.optimizer_batch(configs[0])
    return steps.VariantSteps(
        state=state,
        train=make_vectorized_train(configs, mesh, spec, state, rngs),
        permutation=lambda epoch: permutations(
            rngs, epoch, num_train, steps_per_epoch, batch_size, mesh
        ),
        rng=rngs.train[0] if rngs.shared else rngs.train,
        zero_metrics=lambda: steps.zero_metrics(len(configs)),
        variant=unstack_state,
        stack=stack_states,
        evaluation=steps.compile_steps(configs[0], mesh, spec, num_train, steps_per_epoch),
    )


def run_vectorized(
    config: ml_collections.ConfigDict,
    variants: Sequence[dict[str, Any]],
    workdirs: Sequence[str | pathlib.Path],
    names: Sequence[str] | None = None,
    hooks: Sequence[training_loop.Hook] = (),
) -> list[dict[str, Any]]:
    """Trains every variant of `config` as one vectorised program; one summary per variant.

    Args:
      config: the base experiment config (no `study` field).
      variants: one dict of overrides per variant, keys from SWEEPABLE, e.g.
        [{'learning_rate': 0.1}, {'learning_rate': 0.01, 'seed': 1}].
      workdirs: one directory per variant, for what `cnn_jax.experiment.run` writes there.
      names: optional `name` of each variant's config (the title of its reports).
      hooks: called after each step, as in cnn_jax.training_loop.

    Returns:
      What each variant's summary.json holds, in order, plus `vectorized`: {'k', 'index'}.
    """
    configs = variant_configs(config, variants)
    if names is not None:
        if len(names) != len(configs):
            raise ConfigError(f'{len(configs)} variants but {len(names)} names')
        for c, name in zip(configs, names, strict=True):
            c.name = name
    t0 = time.perf_counter()
    workdirs = [pathlib.Path(w) for w in workdirs]
    for w in workdirs:
        w.mkdir(parents=True, exist_ok=True)
    vectorised = f'; {len(configs)} variants vectorised ({", ".join(str(v) for v in variants)})'
    dataset, model, layer_table, mesh = experiment.prepare(config, vectorised)
    sanity = {}  # The checks depend on the seed only.
    for c in configs:
        if c.seed not in sanity:
            sanity[c.seed] = experiment.sanity_checks(c, model, dataset)
    results = training_loop.train_variants(
        configs, workdirs, dataset, model, mesh, hooks, make_steps=stacked_steps
    )
    extras = [{'vectorized': {'k': len(configs), 'index': k}} for k in range(len(configs))]
    return [
        experiment.finish(c, w, result, dataset, sanity[c.seed], layer_table, t0, extra=extra)
        for c, w, result, extra in zip(configs, workdirs, results, extras, strict=True)
    ]

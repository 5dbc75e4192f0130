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
in Python and leave the layer out at 0), changes the program: ConfigError.

Each variant gives exactly the numbers of its sequential run (`cnn_jax.experiment.run` on
the variant's config), up to float rounding: same initial weights, same batches, same
dropout masks, same divergence and early-stopping decisions (per variant), and the same
files in its workdir: metrics.jsonl, summary.json, curves.png, confusion_matrix.png,
report.md. Unlike a sequential run it writes no checkpoints: an interrupted vectorised run
starts again from scratch.

    from cnn_jax import sweep
    summaries = sweep.run_vectorized(config, [{'learning_rate': 0.1}, {'learning_rate': 0.01}],
                                     ['results/lr_0.1', 'results/lr_0.01'])
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cnn_jax import losses, parallel, train
from cnn_jax.errors import ConfigError
from cnn_jax.models import build_model

SWEEPABLE = ('learning_rate', 'weight_decay', 'momentum', 'label_smoothing', 'seed')


# --- Variants -------------------------------------------------------------------------


def check_variants(config: ml_collections.ConfigDict, variants: Sequence[dict[str, Any]]) -> None:
    """Raises ConfigError unless `variants` can train as one vectorised program.

    Each variant is a dict of overrides of `config` (keys as in a study: dotted paths);
    only the SWEEPABLE keys may appear.
    """
    if not variants:
        raise ConfigError('a vectorised sweep needs at least one variant')
    for i, overrides in enumerate(variants):
        bad = sorted(k for k in overrides if k not in SWEEPABLE)
        if bad:
            raise ConfigError(
                f'variant {i} sets {", ".join(map(repr, bad))}, which cannot be vectorised (they '
                f'change the compiled program); vectorisable keys: {", ".join(SWEEPABLE)}'
            )
    if config.get('task', 'train') != 'train':
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
    """Whether to vectorise automatically: allowed, more than one variant, and an accelerator.

    On CPU (2 cores, results/benchmark/sweep_cpu.md) K vmapped SimpleNN variants ran at
    1.11x (K=2), 1.19x (K=4) and 0.84x (K=8) the speed of K separate runs: one run already
    keeps both cores busy, so there is little to gain and, at K=8, a loss. vmap pays where
    one small model leaves an accelerator idle; `config.vectorize=true` forces it.
    """
    return len(variants) > 1 and jax.default_backend() != 'cpu' and can_vectorize(config, variants)


def variant_configs(
    config: ml_collections.ConfigDict, variants: Sequence[dict[str, Any]]
) -> list[ml_collections.ConfigDict]:
    """`config` with each variant's overrides set (checked by `check_variants`).

    A `study` or `only` field of `config` is dropped, as cnn_jax.study.variant_config does.
    """
    check_variants(config, variants)
    base = copy.deepcopy(config)
    with base.unlocked():
        for key in ('study', 'only'):
            if key in base:
                del base[key]
    out = []
    for overrides in variants:
        c = copy.deepcopy(base)
        with c.unlocked():
            for key, value in overrides.items():
                try:
                    c[key] = value
                except (TypeError, ValueError) as e:
                    raise ConfigError(f'override {key!r}={value!r}: {e}') from None
        losses.check_loss(c.loss, c.get('label_smoothing', 0.0))
        out.append(c)
    return out


def split_overrides(overrides: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the overrides that change the program, the SWEEPABLE ones)."""
    fixed = {k: v for k, v in overrides.items() if k not in SWEEPABLE}
    return fixed, {k: v for k, v in overrides.items() if k in SWEEPABLE}


def vectorizable_groups(variants: Sequence[dict[str, Any]]) -> list[list[int]]:
    """Indices of `variants` grouped so that each group can train as one program.

    Variants whose non-SWEEPABLE overrides are equal share a group (in first-seen order);
    a group's base config is the study's config with those shared overrides applied, and
    `run_vectorized` takes the SWEEPABLE rest of each member.
    """
    groups: dict[str, list[int]] = {}
    for i, overrides in enumerate(variants):
        fixed, _ = split_overrides(overrides)
        groups.setdefault(repr(sorted(fixed.items())), []).append(i)
    return list(groups.values())


# --- Stacked states -------------------------------------------------------------------


def stack(trees: Sequence[Any]) -> Any:
    """One pytree whose leaves stack the corresponding leaves of `trees` on a new axis 0."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def state_axes(state: train.TrainState) -> train.TrainState:
    """vmap axes of a stacked state: every leaf on axis 0 except the shared step counter."""
    axes = jax.tree.map(lambda _: 0, state)
    return axes.replace(step=None)


def stack_states(states: Sequence[train.TrainState]) -> train.TrainState:
    """K train states (same model and optimiser structure) as one stacked state.

    The step counter stays a scalar (all variants step together); the optimiser and
    apply function are those of the first state, which is right because the variants differ
    only in the numbers held in `opt_state` (inject_hyperparams).
    """
    first = states[0]
    structure = jax.tree.structure(first.opt_state)
    for i, s in enumerate(states[1:], 1):
        if jax.tree.structure(s.opt_state) != structure:
            raise ConfigError(f'variant {i} has a different optimiser state structure')
    trees = [(s.params, s.opt_state, s.batch_stats) for s in states]
    params, opt_state, batch_stats = stack(trees)
    return first.replace(params=params, opt_state=opt_state, batch_stats=batch_stats)


def unstack_state(state: train.TrainState, k: int) -> train.TrainState:
    """Variant `k` of a stacked state, as an ordinary train state."""

    def take(x):
        return x[k]

    return state.replace(
        params=jax.tree.map(take, state.params),
        opt_state=jax.tree.map(take, state.opt_state),
        batch_stats=jax.tree.map(take, state.batch_stats),
    )


def hyperparams(state: train.TrainState) -> dict[str, np.ndarray]:
    """learning_rate, weight_decay, momentum of every variant (of the first inner optimiser)."""
    found = _inject_states(state.opt_state)
    return {k: np.asarray(v) for k, v in found[0].hyperparams.items()} if found else {}


def _inject_states(opt_state: Any) -> list[Any]:
    """The inject_hyperparams states inside `opt_state` (any optax version's class)."""

    def is_inject(x: Any) -> bool:
        return isinstance(getattr(x, 'hyperparams', None), dict)

    return [x for x in jax.tree.leaves(opt_state, is_leaf=is_inject) if is_inject(x)]


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
        init, train_, data = (jnp.stack([k[i] for k in keys]) for i in range(3))
        return cls(init, train_, data, shared=len(set(seeds)) == 1)


def create_stacked_state(
    configs: Sequence[ml_collections.ConfigDict],
    model: Any,
    input_shape: tuple[int, ...],
    rngs: VariantRngs,
    steps_per_epoch: int,
) -> train.TrainState:
    """Each variant's own fresh state (its seed, its hyperparameters), stacked."""
    states = [
        train.create_train_state(c, model, input_shape, rngs.init[k], steps_per_epoch)
        for k, c in enumerate(configs)
    ]
    return stack_states(states)


# --- The vectorised step --------------------------------------------------------------


def make_vectorized_train(
    configs: Sequence[ml_collections.ConfigDict],
    mesh: Mesh,
    spec: train.InputSpec,
    state: train.TrainState,
    rngs: VariantRngs,
    group_size: int | None = None,
) -> Callable[..., tuple[train.TrainState, train.Metrics]]:
    """The jitted vectorised counterpart of `train.compile_steps(...).train`.

    train(state, acc, images, labels, perm, step_in_epoch, rng) -> (state, acc), with the
    stacked state and metric sums (K,); `perm` and `rng` carry a leading K axis unless the
    variants share their seed. The body is compile_steps' train function, vmapped.

    `group_size` g < K vmaps groups of g variants side by side in the one program (same
    numbers): a vmapped convolution with per-variant kernels is a grouped convolution,
    whose cost on XLA's CPU backend grows faster than K (see default_group_size).
    """
    config = configs[0]
    loss_name = config.get('loss', 'cross_entropy')
    smoothings = [float(c.get('label_smoothing', 0.0)) for c in configs]
    shared_smoothing = len(set(smoothings)) == 1
    shard = parallel.data_sharding(mesh)
    repl = parallel.replicated(mesh)
    smoothing_arr = jnp.asarray(smoothings, jnp.float32)

    def one(state, acc, images, labels, perm, step_in_epoch, rng, smoothing):
        indices = jax.lax.with_sharding_constraint(perm[step_in_epoch], shard)
        aug_rng = jax.random.fold_in(jax.random.fold_in(rng, 1), state.step)
        batch = spec.make_batch(images, labels, indices, aug_rng)
        step_rng = jax.random.fold_in(rng, 0)
        if shared_smoothing:
            state, metrics = train.train_step(
                state, batch, step_rng, loss=loss_name, label_smoothing=smoothings[0]
            )
        else:  # A traced smoothing, one per variant.
            state, metrics = train.train_step(
                state, batch, step_rng, loss=loss_name, label_smoothing=smoothing
            )
        return state, jax.tree.map(jnp.add, acc, metrics)

    per_variant = 0 if not rngs.shared else None
    axes = state_axes(state)
    vmapped = jax.vmap(
        one,
        in_axes=(axes, 0, None, None, per_variant, None, per_variant, 0),
        out_axes=(axes, 0),
    )

    k_total = len(configs)
    group = min(group_size or k_total, k_total)

    def step(state, acc, images, labels, perm, step_in_epoch, rng):
        if group == k_total:
            return vmapped(state, acc, images, labels, perm, step_in_epoch, rng, smoothing_arr)
        states, accs = [], []
        for start in range(0, k_total, group):
            part = slice(start, start + group)

            def take(x, part=part):
                return x[part]

            st = state.replace(
                params=jax.tree.map(take, state.params),
                opt_state=jax.tree.map(take, state.opt_state),
                batch_stats=jax.tree.map(take, state.batch_stats),
            )
            p, r = (perm[part], rng[part]) if per_variant == 0 else (perm, rng)
            ac = jax.tree.map(take, acc)
            st, ac = vmapped(st, ac, images, labels, p, step_in_epoch, r, smoothing_arr[part])
            states.append(st)
            accs.append(ac)
        joined = stack_groups(states)
        return joined, jax.tree.map(lambda *xs: jnp.concatenate(xs), *accs)

    return jax.jit(step, donate_argnums=(0, 1), out_shardings=(repl, repl))


def stack_groups(states: Sequence[train.TrainState]) -> train.TrainState:
    """Stacked states of variant groups joined along the variant axis (one step counter)."""

    def cat(*xs):
        return jnp.concatenate(xs)

    first = states[0]
    return first.replace(
        params=jax.tree.map(cat, *[s.params for s in states]),
        opt_state=jax.tree.map(cat, *[s.opt_state for s in states]),
        batch_stats=jax.tree.map(cat, *[s.batch_stats for s in states]),
    )


def zero_metrics(k: int) -> train.Metrics:
    return {name: jnp.zeros((k,), jnp.float32) for name in ('loss', 'correct', 'count')}


def permutations(
    rngs: VariantRngs,
    epoch: int,
    num_train: int,
    steps_per_epoch: int,
    batch_size: int,
    mesh: Mesh,
) -> jax.Array:
    """Each variant's epoch shuffle as the training loop draws it ((K, ...) unless shared)."""
    fn = functools.partial(
        train.epoch_permutation,
        epoch=epoch,
        num_examples=num_train,
        steps=steps_per_epoch,
        batch_size=batch_size,
    )
    if rngs.shared:
        perm, spec = fn(rngs.data[0]), PartitionSpec(None, parallel.DATA_AXIS)
    else:
        perm, spec = jax.vmap(fn)(rngs.data), PartitionSpec(None, None, parallel.DATA_AXIS)
    return jax.device_put(perm, NamedSharding(mesh, spec))


# --- Running studies ------------------------------------------------------------------


@dataclasses.dataclass
class _Variant:
    """Per-variant loop state: what train_and_evaluate keeps for one run."""

    config: ml_collections.ConfigDict
    workdir: pathlib.Path
    log: Any
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    status: str = 'completed'
    diverged_at: int | None = None
    stopped_early: bool = False
    best_value: float | None = None
    best_epoch: int | None = None
    bad_epochs: int = 0
    best_state: Any = None
    final_state: Any = None  # Frozen when it stops (diverged or stopped early).

    @property
    def active(self) -> bool:
        return self.status == 'completed' and not self.stopped_early


def run_vectorized(
    config: ml_collections.ConfigDict,
    variants: Sequence[dict[str, Any]],
    workdirs: Sequence[str | pathlib.Path],
    names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Trains every variant of `config` as one vectorised program; one summary per variant.

    Args:
      config: the base experiment config (no `study` field).
      variants: one dict of overrides per variant, keys from SWEEPABLE, e.g.
        [{'learning_rate': 0.1}, {'learning_rate': 0.01, 'seed': 1}].
      workdirs: one directory per variant; each receives what `cnn_jax.experiment.run`
        would write there (metrics.jsonl, summary.json, curves.png, confusion_matrix.png,
        report.md), checkpoints excepted.
      names: optional `name` of each variant's config (the title of its reports).

    Returns:
      What each variant's summary.json holds, in order, plus `vectorized`: {'k', 'index'}.
    """
    from cnn_jax import experiment, summary
    from cnn_jax.data import load_dataset
    from cnn_jax.records import MetricsLog
    from cnn_jax.training_loop import (
        _epoch_row,
        _host_acc,
        device_splits,
        epoch_plan,
        improved,
        input_spec,
        model_input_shape,
    )

    if len(variants) != len(workdirs):
        raise ConfigError(f'{len(variants)} variants but {len(workdirs)} workdirs')
    configs = variant_configs(config, variants)
    if names is not None:
        if len(names) != len(configs):
            raise ConfigError(f'{len(configs)} variants but {len(names)} names')
        for c, name in zip(configs, names, strict=True):
            c.name = name
    t0 = time.perf_counter()
    k_total = len(configs)
    dataset = load_dataset(config)
    model = build_model(config, dataset.num_classes)
    shape = model_input_shape(config, dataset)
    layer_table = summary.layer_table(model, shape)
    mesh = parallel.make_mesh()
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, 'eval_batch_size')
    print(
        f'{config.model} on {dataset.name}: {k_total} variants vectorised '
        f'({", ".join(str(v) for v in variants)}); {mesh.devices.size} '
        f'{jax.devices()[0].platform} device(s).',
        flush=True,
    )
    sanity_by_seed = {}
    for c in configs:
        if c.seed not in sanity_by_seed:
            sanity_by_seed[c.seed] = experiment.sanity_checks(c, model, dataset)

    num_train = len(dataset.train)
    steps_per_epoch, monitor, mode = epoch_plan(config, dataset)
    es = config.early_stopping

    rngs = VariantRngs.from_seeds([c.seed for c in configs])
    spec = input_spec(config, dataset)
    state = create_stacked_state(configs, model, shape, rngs, steps_per_epoch)
    state = jax.device_put(state, parallel.replicated(mesh))
    device_data = device_splits(dataset, mesh)
    vtrain = make_vectorized_train(configs, mesh, spec, state, rngs)
    steps = train.compile_steps(config, mesh, spec, num_train, steps_per_epoch)  # evaluate
    train_rng = rngs.train[0] if rngs.shared else rngs.train
    runs = []
    for c, w in zip(configs, workdirs, strict=True):
        w = pathlib.Path(w)
        w.mkdir(parents=True, exist_ok=True)
        log = MetricsLog(w, enabled=jax.process_index() == 0)
        log.truncate(0)  # No checkpoints to resume from: start the records afresh.
        runs.append(_Variant(config=c, workdir=w, log=log))

    train_images, train_labels = device_data['train']
    log_every = max(1, config.get('log_every_steps', 50))
    acc = jax.device_put(zero_metrics(k_total), parallel.replicated(mesh))
    compile_s, timed_steps, timed_s = 0.0, 0, 0.0
    t_start = time.perf_counter()
    for epoch in range(config.num_epochs):
        if not any(r.active for r in runs):
            break
        perm = permutations(rngs, epoch, num_train, steps_per_epoch, config.batch_size, mesh)
        t_epoch = None
        for s in range(steps_per_epoch):
            state, acc = vtrain(
                state, acc, train_images, train_labels, perm, np.int32(s), train_rng
            )
            gstep = epoch * steps_per_epoch + s + 1
            if t_epoch is None:
                jax.block_until_ready(acc)
                if compile_s == 0.0:
                    compile_s = time.perf_counter() - t_start
                t_epoch, first_timed = time.perf_counter(), gstep
            if gstep % log_every == 0 or s == steps_per_epoch - 1:
                host = jax.device_get(acc)  # The only host sync inside an epoch.
                for k, r in enumerate(runs):
                    loss = float(host['loss'][k]) / max(float(host['count'][k]), 1.0)
                    if r.active and not math.isfinite(loss):
                        r.status, r.diverged_at = 'diverged', gstep
                        r.final_state = jax.device_get(unstack_state(state, k))
                        print(f'variant {k}: diverged at step {gstep}: training loss is {loss}.')
                if not any(r.active for r in runs):
                    break
        jax.block_until_ready(state)
        if t_epoch is not None:
            timed_steps += gstep - first_timed
            timed_s += time.perf_counter() - t_epoch
        host_acc = jax.device_get(acc)
        for k, r in enumerate(runs):
            if not r.active:
                continue
            state_k = unstack_state(state, k)
            evals = {}
            for split in ('val', 'test'):
                if split in device_data and (split == 'val' or config.get('eval_test_each_epoch')):
                    evals[split], _ = train.evaluate_split(
                        steps, state_k, *device_data[split], config.eval_batch_size, mesh
                    )
            lr = train.optax_learning_rate(state_k, r.config, steps_per_epoch)
            acc_k = _host_acc({n: v[k] for n, v in host_acc.items()})
            row = _epoch_row(
                epoch + 1, int(state.step), acc_k, lr, time.perf_counter() - t_start, evals
            )
            r.history.append(row)
            r.log.write_epoch(row)
            if improved(row[monitor], r.best_value, mode, es.min_delta):
                r.best_value, r.best_epoch, r.bad_epochs = row[monitor], epoch + 1, 0
                if es.patience > 0:
                    r.best_state = jax.device_get(state_k)
            else:
                r.bad_epochs += 1
            if es.patience > 0 and r.bad_epochs >= es.patience:
                r.stopped_early = True  # Keras' restore_best_weights, as the loop does.
                best = r.best_state
                r.final_state = best if best is not None else jax.device_get(state_k)
        print(
            f'epoch {epoch + 1}: '
            + '  '.join(
                f'[{k}] {r.history[-1].get("val_accuracy", r.history[-1]["train_accuracy"]):.4f}'
                for k, r in enumerate(runs)
                if r.history and r.history[-1]['epoch'] == epoch + 1
            ),
            flush=True,
        )
        acc = jax.device_put(zero_metrics(k_total), parallel.replicated(mesh))

    steps_per_s = timed_steps / timed_s if timed_s > 0 else float('nan')
    outs = []
    for k, r in enumerate(runs):
        if r.final_state is not None:
            state_k = jax.device_put(r.final_state, parallel.replicated(mesh))
        elif es.patience > 0 and r.status == 'completed' and r.best_state is not None:
            state_k = jax.device_put(r.best_state, parallel.replicated(mesh))
        else:
            state_k = unstack_state(state, k)
        out = _summary(
            r, k, k_total, state_k, steps, device_data, dataset, mesh, sanity_by_seed[r.config.seed]
        )
        out.update(
            steps_per_epoch=steps_per_epoch,
            wall_time_s=round(time.perf_counter() - t0, 2),
            compile_s=round(compile_s, 2),
            train_steps_per_s=round(steps_per_s, 3),
            train_images_per_s=round(steps_per_s * config.batch_size, 1),
        )
        out = {
            key: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for key, v in out.items()
        }
        if jax.process_index() == 0:
            experiment.write_outputs(
                r.workdir, out, r.history, r.config, layer_table, dataset.class_names
            )
        r.log.close()
        outs.append(out)
    return outs


def _summary(
    r: _Variant,
    k: int,
    k_total: int,
    state: train.TrainState,
    steps: train.CompiledSteps,
    device_data: dict[str, tuple[jax.Array, jax.Array]],
    dataset: Any,
    mesh: Mesh,
    sanity: dict[str, Any],
) -> dict[str, Any]:
    """The keys of experiment.run's summary, in its order, for one variant."""
    from cnn_jax import report, summary

    config = r.config
    evals, predictions = {}, None
    for split in ('train', 'val', 'test'):
        if split in device_data:
            evals[split], preds = train.evaluate_split(
                steps,
                state,
                *device_data[split],
                config.eval_batch_size,
                mesh,
                with_predictions=split == 'test',
            )
            predictions = preds if split == 'test' else predictions
    metrics = report.classification_metrics(dataset.test.labels, predictions, dataset.num_classes)
    counts = summary.param_counts({'params': state.params, 'batch_stats': state.batch_stats})
    return {
        'name': config.get('name', None) or config.model,
        'status': r.status,
        'diverged_at_step': r.diverged_at,
        'stopped_early': r.stopped_early,
        'best_epoch': r.best_epoch,
        **{f'{s}_accuracy': m['accuracy'] for s, m in evals.items()},
        **{f'{s}_loss': m['loss'] for s, m in evals.items()},
        **metrics,
        'total_params': counts.total,
        'trainable_params': counts.trainable,
        'non_trainable_params': counts.non_trainable,
        'batch_norm_statistics': counts.batch_stats,
        'epochs_run': len(r.history),
        'steps_per_epoch': None,
        'wall_time_s': None,
        'compile_s': None,
        'train_steps_per_s': None,
        'train_images_per_s': None,
        'num_devices': int(mesh.devices.size),
        'platform': jax.devices()[0].platform,
        'resumed_from_step': None,
        'class_names': dataset.class_names,
        'sanity': sanity,
        'vectorized': {'k': k_total, 'index': k},
    }

"""One experiment end to end: data -> model -> sanity checks -> training -> reports.

`run(config, workdir)` is what `launch.py` calls for a single experiment (and what a
study calls per variant). Everything it writes lands in `workdir`.
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from cnn_jax import accumulate, losses, parallel, records, report, steps, summary
from cnn_jax.data import Dataset, load_dataset
from cnn_jax.data.metadata import model_input_shape
from cnn_jax.errors import ConfigError
from cnn_jax.models import build_model
from cnn_jax.models.onednn_conv import onednn_conv_wins
from cnn_jax.records import Reporter
from cnn_jax.training_loop import TrainResult, input_spec, train_and_evaluate


def sanity_checks(config: ml_collections.ConfigDict, model, dataset: Dataset) -> dict[str, Any]:
    """The checks the reports made before training, on freshly initialised weights.

    Output shape of one example; the first batch's loss against ln(classes) (a warning
    beyond `sanity_loss_tolerance`, relative); parameter counts against the formulas
    (summary.layer_table raises on any disagreement).
    """
    shape = model_input_shape(config, dataset)
    variables = steps.init_variables(model, shape, jax.random.key(config.seed), config.init)
    spec = input_spec(config, dataset)
    n = min(config.batch_size, len(dataset.train))

    @jax.jit  # One program: op by op, this took seconds of every launch.
    def first_batch(variables, images, labels, rng):
        batch = spec.make_batch(images, labels, None)
        one = model.apply(variables, batch['image'][:1], train=False)
        # In training mode, as the first step sees it: at initialisation BatchNorm's running
        # averages (mean 0, variance 1) do not describe a deep net's activations, and in
        # evaluation mode a ResNet-50 gave loss 14 where training mode gives ln(C).
        logits, _ = model.apply(
            variables, batch['image'], train=True, mutable=['batch_stats'], rngs={'dropout': rng}
        )
        return one, jnp.mean(losses.per_example_loss(logits, batch['label'], config.loss))

    images, labels = dataset.train.examples(np.arange(n)), dataset.train.labels[:n]
    one, loss = first_batch(variables, images, labels, jax.random.key(config.seed))
    expected_shape = (1, dataset.num_classes)
    if tuple(one.shape) != expected_shape:
        raise ConfigError(f'model output shape {tuple(one.shape)} != {expected_shape}')
    loss = float(loss)
    expected = math.log(dataset.num_classes)
    checks: dict[str, Any] = {
        'output_shape_one_example': list(one.shape[1:]),
        'first_batch_loss': round(loss, 4),
    }
    if config.loss == 'cross_entropy':
        ok = abs(loss - expected) <= config.sanity_loss_tolerance * expected
        checks.update(expected_first_loss_ln_classes=round(expected, 4), first_loss_ok=ok)
        if not ok:
            Reporter().warn(
                f'first-batch loss {loss:.3f} is far from ln({dataset.num_classes}) = '
                f'{expected:.3f}: check the initialisation, labels and normalisation.'
            )
    checks.update(summary.count_fields(variables), params_match_formula=True)
    return checks


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Trains the experiment `config` in `workdir`; returns what summary.json holds.

    The 'train' task; cnn_jax.tasks.run dispatches on config.task (and records the config
    in the workdir first). A workdir that already holds this finished run returns its
    summary without training again.
    """
    workdir = pathlib.Path(workdir)
    finished = records.read_summary(workdir)
    if finished is not None and finished['status'] in ('completed', 'diverged'):
        Reporter().line(f'{workdir} already holds this run, {finished["status"]}; nothing to do.')
        return finished
    t0 = time.perf_counter()
    workdir.mkdir(parents=True, exist_ok=True)
    losses.check_loss(config.loss, config.label_smoothing)
    if config.pretrained:  # Fail before the data load and compilation.
        from cnn_jax.transfer.weights import check_exists

        check_exists(config.pretrained, config.model)
    dataset, model, layer_table, mesh = prepare(config)
    sanity = sanity_checks(config, model, dataset)
    result = train_and_evaluate(config, workdir, dataset, model, mesh)
    return finish(config, workdir, result, dataset, sanity, layer_table, t0)


def prepare(
    config: ml_collections.ConfigDict, variants: str = ''
) -> tuple[Dataset, nn.Module, str, Mesh]:
    """A run's data (device-resident or streamed), model, layer table and mesh, announced
    in one line (`variants`: what a vectorised study trains)."""
    dataset = load_dataset(config, allow_streams=True)
    model = build_model(config, dataset.num_classes)
    shape = model_input_shape(config, dataset)
    layer_table = summary.layer_table(model, shape)  # Raises if a count breaks its formula.
    mesh, platform = parallel.make_mesh(), jax.devices()[0].platform
    onednn = '; convolutions by oneDNN' if onednn_conv_wins(platform, config.dtype) else ''
    Reporter().line(
        f'{config.model} on {dataset.name}: {len(dataset.train)} train / '
        f'{len(dataset.val) if dataset.val else 0} val / {len(dataset.test)} test examples, '
        f'{dataset.num_classes} classes, input {shape}{variants}; {mesh.devices.size} '
        f'{platform} device(s){onednn}.'
    )
    return dataset, model, layer_table, mesh


def finish(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    result: TrainResult,
    dataset: Dataset,
    sanity: dict[str, Any],
    layer_table: str,
    t0: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes a trained run's (or a cnn_jax.sweep variant's) reports; returns what
    summary.json holds (timing since `t0`, `extra` keys last)."""
    out = summary_fields(config, result, dataset, time.perf_counter() - t0)
    out = {**out, 'sanity': sanity, **(extra or {})}
    out = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}
    if parallel.is_main_process():  # Only process 0 writes files.
        write_reports(config, workdir, out, result.history, dataset.class_names, layer_table)
    return out


def summary_fields(
    config: ml_collections.ConfigDict, result: TrainResult, dataset: Dataset, wall_s: float
) -> dict[str, Any]:
    """The numbers summary.json records of a run: its final evaluation, counts, timing."""
    metrics = report.classification_metrics(
        dataset.test.labels, result.test_predictions, dataset.num_classes
    )
    variables = {'params': result.state.params, 'batch_stats': result.state.batch_stats}
    device = jax.devices()[0]
    return {
        'name': config.get('name', None) or config.model,
        'status': result.status,
        'diverged_at_step': result.diverged_at_step,
        'stopped_early': result.stopped_early,
        'best_epoch': result.best_epoch,
        **{f'{s}_accuracy': m['accuracy'] for s, m in result.evals.items()},
        **{f'{s}_loss': m['loss'] for s, m in result.evals.items()},
        **metrics,
        **summary.count_fields(variables),
        # Epochs begun (the last row's epoch rounded up: 1.5 with evals_per_epoch = 2 is 2).
        'epochs_run': math.ceil(result.history[-1]['epoch']) if result.history else 0,
        'steps_per_epoch': result.steps_per_epoch,
        'wall_time_s': round(wall_s, 2),
        'compile_s': round(result.compile_s, 2),
        'train_steps_per_s': round(result.train_steps_per_s, 3),
        'train_images_per_s': round(
            result.train_steps_per_s * accumulate.optimizer_batch(config), 1
        ),
        'num_devices': result.num_devices,
        'platform': device.platform,
        'device_kind': device.device_kind,
        'onednn_convolutions': onednn_conv_wins(device.platform, config.dtype),
        'num_train_examples': len(dataset.train),
        'resumed_from_step': result.resumed_from_step,
        'class_names': dataset.class_names,
    }


def write_reports(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    out: dict[str, Any],
    history: list[dict[str, Any]],
    class_names: list[str],
    layer_table: str,
) -> None:
    """curves.png, confusion_matrix.png, report.md, then summary.json (which marks the run
    finished), and the closing console line."""
    report.plot_curves(history, workdir / 'curves.png', title=out['name'])
    report.plot_confusion_matrix(
        out['confusion_matrix'],
        class_names,
        workdir / 'confusion_matrix.png',
        title=f'{out["name"]}: test confusion matrix',
    )
    # NaN was stored as null (JSON); the report prints it as nan.
    printable = {
        k: float('nan') if v is None and k.endswith(('_s', '_loss', '_accuracy')) else v
        for k, v in out.items()
    }
    report.write_report(workdir, printable, str(config), layer_table)
    records.write_json(workdir / 'summary.json', out)  # Last: it marks the run finished.
    Reporter().line(
        f'{out["status"]}: test accuracy {printable["test_accuracy"]:.4f}, test loss '
        f'{printable["test_loss"]:.4f}, F1 {out["f1"]:.4f}. Reports in {workdir}/ (report.md, '
        'summary.json, curves.png, confusion_matrix.png).'
    )

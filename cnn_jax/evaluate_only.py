"""Evaluation-only runs (launch.py --eval_only; timm's validate.py).

`run(config, workdir, checkpoint)` restores the workdir's best or latest weights (their
moving average when the run kept one, cnn_jax.ema), evaluates them on the test split of
the config's dataset, which may be other data of the same classes (`--config.dataset=`),
and writes eval_<checkpoint>.md, .json and _confusion_matrix.png beside the training
report. It trains nothing and only reads the checkpoints and config.json.

The workdir's config guard (cnn_jax.run_record) still holds, except for the keys that say
which data is read (DATA_KEYS); the class count must be the run's. The test metrics equal
summary.json's when the checkpoint is the state the run tested: 'best' with early
stopping on, 'latest' otherwise.
"""

from __future__ import annotations

import copy
import pathlib
from typing import Any

import jax
import ml_collections

from cnn_jax import checkpoints, ema, experiment, parallel, records, report, run_record, steps
from cnn_jax.data.metadata import model_input_shape
from cnn_jax.errors import ConfigError
from cnn_jax.training_loop import input_spec

CHECKPOINTS = ('best', 'latest')
# The keys an evaluation may change: which data it reads, at what size (not the model).
DATA_KEYS = frozenset(
    'dataset val_fraction data_seed classes label_groups label_group_names one_vs_rest '
    'max_train_examples max_eval_examples image_size input_mode device_memory_budget_gb'.split()
)


def check_request(config: ml_collections.ConfigDict, workdir: pathlib.Path, which: str) -> None:
    """ConfigError (one line, exit 2) unless `workdir` holds a `which` checkpoint of a
    run whose config differs from `config` in DATA_KEYS only."""
    if which not in CHECKPOINTS:
        raise ConfigError(f'--checkpoint must be one of {", ".join(CHECKPOINTS)}, got {which!r}')
    if not workdir.is_dir():
        raise ConfigError(f'no workdir {workdir}: --eval_only evaluates a run trained there')
    if not any((workdir / 'checkpoints' / which).glob('[0-9]*')):
        raise ConfigError(f'no {which} checkpoint in {workdir}/checkpoints/{which}')
    advice = 'an evaluation may change only the data keys (' + ', '.join(sorted(DATA_KEYS)) + ')'
    run_record.check_config(config, workdir, may_change=DATA_KEYS, advice=advice)


def run(
    config: ml_collections.ConfigDict, workdir: str | pathlib.Path, which: str = 'best'
) -> dict[str, Any]:
    """Evaluates `workdir`'s `which` checkpoint on the test split; returns what
    eval_<which>.json holds (written by process 0)."""
    workdir = pathlib.Path(workdir)
    check_request(config, workdir, which)
    dataset, model, _, mesh = experiment.prepare(config)
    trained = (records.read_summary(workdir) or {}).get('class_names')
    if trained is not None and len(trained) != dataset.num_classes:
        raise ConfigError(
            f'{workdir} holds a model of {len(trained)} classes; {dataset.name} has '
            f'{dataset.num_classes}'
        )
    if trained is not None and trained != dataset.class_names:  # Same count, other names.
        records.Reporter().warn(
            f'{dataset.name} names its classes {dataset.class_names}; '
            f'the run was trained on {trained}'
        )
    state, step = restore(config, workdir, which, model, model_input_shape(config, dataset), mesh)
    spec = input_spec(config, dataset)
    compiled = steps.compile_steps(config, mesh, spec, len(dataset.train), 1)
    test = dataset.splits()['test'].on_devices(mesh)
    evaluated = ema.weights_to_evaluate(state)
    metrics, predictions = steps.evaluate(compiled, evaluated, test, config.eval_batch_size, True)
    out = {
        'checkpoint': which,
        'step': step,
        'dataset': dataset.name,
        'ema_weights': state.ema is not None,
        'test_loss': metrics['loss'],
        'test_accuracy': metrics['accuracy'],
        **report.classification_metrics(dataset.test.labels, predictions, dataset.num_classes),
        'class_names': dataset.class_names,
    }
    if parallel.is_main_process():
        write(workdir, out)
    return out


def restore(
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    which: str,
    model: Any,
    shape: tuple[int, ...],
    mesh: Any,
) -> tuple[steps.TrainState, int]:
    """The `which` checkpoint's train state on the mesh, and its step."""
    config = copy.deepcopy(config)
    config.pretrained = None  # The checkpoint holds the weights: no import for the template.
    template = steps.create_train_state(config, model, shape, jax.random.key(config.seed), 1)
    template = jax.device_put(template, parallel.replicated(mesh))
    try:
        restored = checkpoints.restore_read_only(workdir, which, template)
    except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise many types.
        raise ConfigError(
            f'the {which} checkpoint in {workdir} does not fit {config.model} as configured '
            f'({checkpoints.brief(e)})'
        ) from None
    if restored is None:
        raise ConfigError(f'no {which} checkpoint in {workdir}/checkpoints/{which}')
    return restored


def write(workdir: pathlib.Path, out: dict[str, Any]) -> None:
    """eval_<checkpoint>.json, .md and _confusion_matrix.png, and the closing line."""
    name = f'eval_{out["checkpoint"]}'
    image = f'{name}_confusion_matrix.png'
    title = (
        f'{workdir.name}: {out["checkpoint"]} checkpoint (step {out["step"]}) on {out["dataset"]}'
    )
    report.plot_confusion_matrix(
        out['confusion_matrix'], out['class_names'], workdir / image, title
    )
    weights = 'moving average of the weights (ema_decay)' if out['ema_weights'] else 'weights'
    lines = [
        f'# Evaluation: {title}',
        '',
        f"The test split, evaluated with the {out['checkpoint']} checkpoint's {weights}.",
        '',
        report.markdown_table(
            ('split', 'accuracy', 'loss'), [('test', out['test_accuracy'], out['test_loss'])]
        ),
        '',
        f'Macro precision {out["precision"]:.4f}, recall {out["recall"]:.4f}, F1 {out["f1"]:.4f}.',
        '',
        *report.class_sections(
            out['class_names'], out['per_class_accuracy'], out['confusion_matrix'], image
        ),
    ]
    (workdir / f'{name}.md').write_text('\n'.join(lines))
    records.write_json(workdir / f'{name}.json', out)
    records.Reporter().line(
        f'Test accuracy {out["test_accuracy"]:.4f}, test loss {out["test_loss"]:.4f} '
        f'({title}). Reports in {workdir}/ ({name}.md, {name}.json, {image}).'
    )

"""Studies: one config names a base experiment and its variants, one command runs them all.

A study config is an ordinary experiment config plus a `study` ConfigDict:

    config.study.name        str: the study's name (titles of its outputs).
    config.study.variants    tuple of (variant_name, overrides), overrides a dict whose keys
                             are dotted config paths: {'optimizer': 'adam',
                             'model_options.activation': 'tanh', 'augment.flip': True}.
    config.study.seeds       tuple of ints; empty () means (config.seed,).
    config.study.plot_metric 'val_accuracy' | 'test_accuracy' (per-epoch curves; the test
                             one needs eval_test_each_epoch=True).
    config.study.sweep_key   optional dotted path ('learning_rate', 'weight_decay'): also plot
                             the result against that number on a log axis.
    config.study.description optional str: the question the study answers.
    config.only              optional str: run only this variant (comma-separated names work).
    config.vectorize         'auto' | 'true' | 'false': train runs that differ only in
                             cnn_jax.sweep.SWEEPABLE keys (learning rate, weight decay,
                             momentum, label smoothing, seed) as one vmapped program, with
                             the same per-run outputs ('auto': on accelerators only).

`configs/ablations/__init__.py` has `make_study(...)`, which fills these in.

Order of precedence: command-line overrides (`--config.num_epochs=1`) change the base
config; each run then gets `seed` from `study.seeds`, and the variant's overrides go on top,
so a variant wins for the keys it sets. An override key must exist in the config, except
under `model_options`, where any field of the variant's model is accepted.

`run_study(config, workdir)` runs every variant x seed in workdir/<variant>/ (one seed) or
workdir/<variant>/seed_<s>/ through `cnn_jax.tasks.run` (training resumes an interrupted
run from its checkpoints); a run whose summary.json has a status is skipped. A run that
diverges is recorded as 'diverged at step N'; any other error is recorded as 'failed' and
the study goes on. Then it writes, in workdir: summary.json and summary.md (one row per
variant; mean +- sample std over seeds), comparison.png (per-epoch accuracy and loss of
every variant), and sweep.png for a sweep. The outputs are rebuilt from what is on disk,
so `--config.only` runs fill in the same table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np

from cnn_jax import parallel, run_record
from cnn_jax.errors import CnnJaxError, ConfigError, Diverged

RunFn = Callable[[ml_collections.ConfigDict, str], dict]

PLOT_METRICS = ('val_accuracy', 'test_accuracy')
# Per-run numbers of a study row, with their table headers.
ROW_METRICS = (
    ('best_val_accuracy', 'Best val acc'),
    ('best_epoch', 'Best epoch'),
    ('test_accuracy', 'Test acc'),
    ('test_loss', 'Test loss'),
    ('precision', 'Precision'),
    ('recall', 'Recall'),
    ('f1', 'F1'),
    ('wall_time_s', 'Wall time (s)'),
)
_VARIANT_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.+=-]*$')


# --- Config -------------------------------------------------------------------------


def variant_names(config: ml_collections.ConfigDict) -> list[str]:
    """The study's variant names, in order."""
    return [name for name, _ in config.study.variants]


def study_seeds(config: ml_collections.ConfigDict) -> tuple[int, ...]:
    """`study.seeds`, or (config.seed,) when it is empty or unset."""
    seeds = tuple(config.study.get('seeds', None) or ())
    return tuple(int(s) for s in seeds) if seeds else (int(config.seed),)


def selected_variants(config: ml_collections.ConfigDict) -> list[str]:
    """Variants to run: all, or those named by `config.only` (comma-separated)."""
    names = variant_names(config)
    only = config.get('only', None)
    if not only:
        return names
    chosen = [n.strip() for n in str(only).split(',') if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise ConfigError(
            f'--config.only: unknown variant {", ".join(map(repr, unknown))} in study '
            f'{config.study.name!r}; its variants are: {", ".join(names)}'
        )
    return [n for n in names if n in chosen]


def _model_fields(config: ml_collections.ConfigDict) -> set[str] | None:
    """Names of the fields of config.model (the keys model_options may hold), or None."""
    try:
        from cnn_jax.models import MODELS
    except ImportError:
        return None
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


def _strip_study(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` without its `study` and `only` fields: a plain experiment."""
    base = copy.deepcopy(config)
    with base.unlocked():
        for key in ('study', 'only'):
            if key in base:
                del base[key]
    return base


def run_name(config: ml_collections.ConfigDict, variant: str) -> str:
    """'<study>:<variant>', the title of a run's reports."""
    return f'{config.study.name}:{variant}'


def variant_config(
    config: ml_collections.ConfigDict, variant: str, seed: int | None = None
) -> ml_collections.ConfigDict:
    """The experiment config of one run: base, then `seed`, then the variant's overrides.

    The result has no `study` or `only` field, so it runs as a plain experiment; its
    `name` (the title of the run's reports) is '<study>:<variant>' unless the variant sets it.
    """
    variants = dict(config.study.variants)
    if variant not in variants:
        raise ConfigError(
            f'unknown variant {variant!r}; variants: {", ".join(variant_names(config))}'
        )
    base = _strip_study(config)
    with base.unlocked():
        if seed is not None:
            base.seed = int(seed)
        base.name = run_name(config, variant)
    return apply_overrides(base, dict(variants[variant]), variant)


def validate_study(config: ml_collections.ConfigDict) -> None:
    """Checks the study fields and every variant's overrides; raises ConfigError."""
    if 'study' not in config:
        raise ConfigError('the config has no `study` field')
    study = config.study
    for key in ('name', 'variants'):
        if not study.get(key, None):
            raise ConfigError(f'study: `study.{key}` must be set')
    names = []
    for item in study.variants:
        if not (isinstance(item, Sequence) and len(item) == 2 and isinstance(item[1], dict)):
            raise ConfigError(
                f'study {study.name!r}: each variant must be (name, overrides dict), got {item!r}'
            )
        name = item[0]
        if not isinstance(name, str) or not _VARIANT_NAME.match(name):
            raise ConfigError(
                f'study {study.name!r}: variant name {name!r} must be letters, digits, _ . + = -'
            )
        names.append(name)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f'study {study.name!r}: duplicate variants {", ".join(dupes)}')
    plot_metric = study.get('plot_metric', 'val_accuracy')
    if plot_metric not in PLOT_METRICS:
        raise ConfigError(
            f'study.plot_metric must be one of {", ".join(PLOT_METRICS)}, got {plot_metric!r}'
        )
    seeds = study_seeds(config)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f'study.seeds has duplicates: {seeds}')
    sweep_key = study.get('sweep_key', None)
    from cnn_jax.config_checks import check_config  # Imports JAX: not at module level.

    for name in names:
        vc = variant_config(config, name, seeds[0])  # Raises on a bad override.
        try:
            check_config(vc)
        except ConfigError as e:
            raise ConfigError(f'study {study.name!r}, variant {name!r}: {e}') from None
        if sweep_key:
            value = _get_path(vc, sweep_key, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(
                    f'study.sweep_key {sweep_key!r} of variant {name!r} is {value!r}, not a number'
                )
    selected_variants(config)
    vectorize_mode(config)


def _get_path(config: ml_collections.ConfigDict, key: str, variant: str = '') -> Any:
    node = config
    for part in key.split('.'):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f'the config of variant {variant!r} has no key {key!r}')
        node = node[part]
    return node


def run_dir(workdir: str | Path, variant: str, seed: int, seeds: Sequence[int]) -> Path:
    """workdir/<variant>/ with one seed, workdir/<variant>/seed_<s>/ with several."""
    path = Path(workdir) / variant
    return path if len(seeds) == 1 else path / f'seed_{seed}'


def read_summary(path: str | Path) -> dict | None:
    """The run's summary.json if it exists and has a status (the run finished), else None."""
    file = Path(path) / 'summary.json'
    try:
        summary = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) and summary.get('status') else None


def read_metrics(path: str | Path) -> list[dict]:
    """Per-epoch records of metrics.jsonl sorted by epoch (last record of an epoch wins).

    Unreadable lines (a run killed mid-write) are skipped.
    """
    by_epoch: dict[int, dict] = {}
    try:
        lines = (Path(path) / 'metrics.jsonl').read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and 'epoch' in record:
            by_epoch[int(record['epoch'])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


# --- Running ------------------------------------------------------------------------


def _say(message: str) -> None:
    # Progress goes to stdout: launch.py keeps absl logging at WARNING.
    print(message, file=sys.stdout, flush=True)


def run_study(
    config: ml_collections.ConfigDict, workdir: str | Path, run_fn: RunFn | None = None
) -> dict:
    """Runs every variant x seed not yet finished, then writes the study's outputs.

    Args:
      config: a study config (see the module docstring).
      workdir: the study's directory; each run gets a sub-directory.
      run_fn: `run(config, workdir) -> summary dict`; default cnn_jax.tasks.run, and
        vectorised groups (`config.vectorize`). Given, every run goes through it.

    Returns:
      The study summary (what summary.json holds): rows in `variants`, and `failures`,
      one {'variant', 'seed', 'error'} per run that raised, also counted in `failed`
      (launch.py exits 1 when it is not 0). KeyboardInterrupt (and errors.Interrupted)
      propagates: the next run of the study resumes.
    """
    validate_study(config)
    vectorize = run_fn is None
    if run_fn is None:
        from cnn_jax.tasks import run as run_fn
    workdir = Path(workdir)
    main = parallel.is_main_process()  # Only process 0 writes files.
    if main:
        workdir.mkdir(parents=True, exist_ok=True)
        run_record.record_config(config, workdir)
    else:
        run_record.check_config(config, workdir)
    name = config.study.name
    seeds = study_seeds(config)
    jobs = [(v, s) for v in selected_variants(config) for s in seeds]
    tags = {
        (v, s): f'study {name} [{i}/{len(jobs)}] {v}' + (f' seed {s}' if len(seeds) > 1 else '')
        for i, (v, s) in enumerate(jobs, 1)
    }
    pending = []
    for job in jobs:
        path = run_dir(workdir, *job, seeds)
        done = read_summary(path)
        if done is None:
            pending.append(job)
        else:  # Reused only if it is a run of this variant's config.
            run_record.check_config(variant_config(config, *job), path)
            _say(f'{tags[job]}: skipped, already {_status_text(done)} ({path})')
    groups = vectorized_groups(config, pending) if vectorize else {}
    failures: list[dict] = []
    for job in pending:
        if job in groups:
            group = groups[job]
            if job == group[0]:
                failures += _run_group(config, workdir, group, tags)
            continue
        failure = _run_one(config, workdir, job, tags[job], run_fn)
        if failure is not None:
            failures.append(failure)
    if main:
        write_study_outputs(config, workdir, failures)
    parallel.barrier('study outputs')  # Then every process reads what process 0 wrote.
    result = collect_study(config, workdir, failures)
    result['outputs'] = [str(workdir / o) for o in study_outputs(result)]
    result['failed'] = len(failures)
    _say(f'study {name}: {workdir / "summary.md"}, summary.json, comparison.png')
    if failures:
        _say(f'study {name}: {len(failures)} run(s) failed; re-run the command to retry them')
    return result


def vectorize_mode(config: ml_collections.ConfigDict) -> str:
    """`config.vectorize` as 'auto', 'true' or 'false' (a flag gives a string, Python a bool)."""
    value = config.get('vectorize', 'auto')
    text = str(value).strip().lower()
    if text in ('auto', 'true', 'false'):
        return text
    raise ConfigError(f'config.vectorize must be auto, true or false, got {value!r}')


def vectorized_groups(
    config: ml_collections.ConfigDict, jobs: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], list[tuple[str, int]]]:
    """Maps each (variant, seed) job that trains vectorised to its group's jobs, in order.

    Jobs whose overrides differ only in cnn_jax.sweep.SWEEPABLE keys (seed included) share
    a group. With `vectorize='auto'` a group is vectorised where `sweep.should_vectorize`
    says it pays (an accelerator); with 'true' wherever it can be; with 'false' never.
    Groups of one job run as ordinary experiments (with checkpoints).
    """
    mode = vectorize_mode(config)
    if mode == 'false' or len(jobs) < 2:
        return {}
    from cnn_jax import sweep

    variants = dict(config.study.variants)
    overrides = [{'seed': s, **variants[v]} for v, s in jobs]  # A variant's seed wins.
    out = {}
    for indices in sweep.vectorizable_groups(overrides):
        members = [jobs[i] for i in indices]
        base = _group_base(config, members[0])
        sweepables = [sweep.split_overrides(overrides[i])[1] for i in indices]
        allowed = sweep.can_vectorize if mode == 'true' else sweep.should_vectorize
        if len(indices) > 1 and allowed(base, sweepables):
            out.update({job: members for job in members})
    return out


def _group_base(
    config: ml_collections.ConfigDict, job: tuple[str, int]
) -> ml_collections.ConfigDict:
    """A vectorised group's base experiment: the study's config plus its members' shared
    overrides (those that change the program)."""
    from cnn_jax import sweep

    variant = job[0]
    fixed, _ = sweep.split_overrides(dict(dict(config.study.variants)[variant]))
    return apply_overrides(_strip_study(config), fixed, variant)


def _run_group(
    config: ml_collections.ConfigDict,
    workdir: Path,
    group: list[tuple[str, int]],
    tags: dict[tuple[str, int], str],
) -> list[dict]:
    """Trains `group` as one vmapped program (cnn_jax.sweep); returns its failures."""
    from cnn_jax import sweep

    seeds = study_seeds(config)
    variants = dict(config.study.variants)
    paths = [run_dir(workdir, v, s, seeds) for v, s in group]
    sweepables = [sweep.split_overrides({'seed': s, **variants[v]})[1] for v, s in group]
    for job, path in zip(group, paths, strict=True):
        if parallel.is_main_process():
            run_record.record_config(variant_config(config, *job), path)
        _say(f'{tags[job]}: running vectorised with {len(group) - 1} other run(s) in {path}')
    try:
        summaries = sweep.run_vectorized(
            _group_base(config, group[0]),
            sweepables,
            paths,
            names=[run_name(config, v) for v, _ in group],
        )
    except KeyboardInterrupt:  # Each run keeps its checkpoints: the group resumes.
        raise
    except Exception as e:  # noqa: BLE001 - one bad group must not stop the study
        if not isinstance(e, CnnJaxError):
            traceback.print_exc()
        error = f'{type(e).__name__}: {e}'
        for job in group:
            _say(f'{tags[job]}: FAILED: {error}')
        return [{'variant': v, 'seed': s, 'error': error} for v, s in group]
    for job, summary in zip(group, summaries, strict=True):
        _say(f'{tags[job]}: {_status_text(summary)}')
    return []


def _run_one(
    config: ml_collections.ConfigDict,
    workdir: Path,
    job: tuple[str, int],
    tag: str,
    run_fn: RunFn,
) -> dict | None:
    """Runs (or resumes) one variant x seed; returns its failure record, or None."""
    variant, seed = job
    path = run_dir(workdir, variant, seed, study_seeds(config))
    resuming = path.exists() and any(path.iterdir())
    _say(f'{tag}: {"resuming" if resuming else "running"} in {path}')
    path.mkdir(parents=True, exist_ok=True)
    vc = variant_config(config, variant, seed)
    start = time.time()
    try:
        summary = run_fn(vc, str(path))
    except KeyboardInterrupt:  # Also errors.Interrupted: stop the study, resume later.
        raise
    except Diverged as e:
        # The spine normally returns status 'diverged'; record a raise the same way,
        # so that a re-run skips it.
        summary = {
            'status': 'diverged',
            'diverged_at_step': e.step,
            'diverged_loss': str(e.loss),
            'wall_time_s': round(time.time() - start, 2),
        }
        if parallel.is_main_process():
            _write_json(path / 'summary.json', summary)
    except Exception as e:  # noqa: BLE001 - one bad variant must not stop the study
        if not isinstance(e, CnnJaxError):
            traceback.print_exc()
        failure = {'variant': variant, 'seed': seed, 'error': f'{type(e).__name__}: {e}'}
        _say(f'{tag}: FAILED: {failure["error"]}')
        return failure
    _say(f'{tag}: {_status_text(summary or {"status": "completed"})}')
    return None


# --- Collecting ---------------------------------------------------------------------


def _finite(x: Any) -> float | None:
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if math.isfinite(x) else None


def _status_text(summary: dict) -> str:
    status = summary.get('status', 'completed')
    if status == 'diverged':
        step = summary.get('diverged_at_step')
        return f'diverged at step {step}' if step is not None else 'diverged'
    if status == 'completed' and summary.get('stopped_early'):
        return 'completed (stopped early)'
    return str(status)


def _run_record(path: Path, seed: int, failure: dict | None) -> dict:
    """One run's row numbers from its summary.json and metrics.jsonl."""
    summary = read_summary(path)
    epochs = read_metrics(path)
    record: dict[str, Any] = {'seed': seed, 'workdir': str(path)}
    if summary is not None:
        record['status'] = summary['status']
        record['status_text'] = _status_text(summary)
        record['diverged_at_step'] = summary.get('diverged_at_step')
        record['stopped_early'] = bool(summary.get('stopped_early', False))
    elif failure is not None:
        record['status'] = 'failed'
        record['status_text'] = f'failed: {failure["error"]}'
        record['error'] = failure['error']
    elif epochs:
        record['status'] = record['status_text'] = 'incomplete'
    else:
        record['status'] = record['status_text'] = 'not run'
    summary = summary or {}
    # Best validation accuracy and its epoch from the curves; the summary as a fallback.
    val = [(e['epoch'], _finite(e.get('val_accuracy'))) for e in epochs]
    val = [(ep, a) for ep, a in val if a is not None]
    if val:
        best_epoch, best = max(val, key=lambda t: (t[1], -t[0]))
    else:
        best, best_epoch = _finite(summary.get('val_accuracy')), summary.get('best_epoch')
    record['best_val_accuracy'] = best
    record['best_epoch'] = best_epoch
    for key in ('test_accuracy', 'test_loss', 'precision', 'recall', 'f1'):
        record[key] = _finite(summary.get(key))
    wall = _finite(summary.get('wall_time_s'))
    if wall is not None and summary.get('vectorized'):
        wall /= summary['vectorized']['k']  # A vectorised group's time, shared equally.
    if wall is None and epochs:
        wall = _finite(epochs[-1].get('elapsed_s'))
    record['wall_time_s'] = wall
    record['epochs_run'] = summary.get('epochs_run', len(epochs) or None)
    return record


def _aggregate(values: Iterable[float | None]) -> dict:
    xs = [v for v in values if v is not None]
    if not xs:
        return {'mean': None, 'std': None, 'n': 0}
    std = float(np.std(xs, ddof=1)) if len(xs) > 1 else 0.0
    return {'mean': float(np.mean(xs)), 'std': std, 'n': len(xs)}


def _row_status(runs: list[dict]) -> str:
    texts = [r['status_text'] for r in runs]
    if len(set(texts)) == 1:
        return texts[0]
    counts: dict[str, int] = {}
    for t in texts:
        counts[t] = counts.get(t, 0) + 1
    return ', '.join(f'{n}x {t}' for t, n in counts.items())


def collect_study(
    config: ml_collections.ConfigDict, workdir: str | Path, failures: Sequence[dict] = ()
) -> dict:
    """The study summary from the runs on disk (and this invocation's `failures`)."""
    workdir = Path(workdir)
    seeds = study_seeds(config)
    sweep_key = config.study.get('sweep_key', None) or None
    failed = {(f['variant'], f['seed']): f for f in failures}
    rows = []
    for variant, overrides in config.study.variants:
        runs = [
            _run_record(run_dir(workdir, variant, s, seeds), s, failed.get((variant, s)))
            for s in seeds
        ]
        row = {
            'variant': variant,
            'overrides': _jsonable(dict(overrides)),
            'status': _row_status(runs),
            'metrics': {k: _aggregate(r[k] for r in runs) for k, _ in ROW_METRICS},
            'runs': runs,
        }
        if sweep_key:
            row['sweep_value'] = _get_path(variant_config(config, variant), sweep_key, variant)
        rows.append(row)
    return {
        'study': config.study.name,
        'description': config.study.get('description', '') or '',
        'plot_metric': config.study.get('plot_metric', 'val_accuracy'),
        'sweep_key': sweep_key,
        'seeds': list(seeds),
        'variants': rows,
        'failures': [dict(f) for f in failures],
    }


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict | ml_collections.ConfigDict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x if isinstance(x, str | int | float | bool | type(None)) else repr(x)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(_jsonable(obj), indent=2) + '\n')
    tmp.replace(path)


# --- Outputs ------------------------------------------------------------------------


def _ranking_key(study: dict) -> str:
    return 'test_accuracy' if study['plot_metric'] == 'test_accuracy' else 'best_val_accuracy'


def _fmt(agg: dict, key: str) -> str:
    if agg['n'] == 0:
        return '-'
    digits = {'best_epoch': 1, 'wall_time_s': 1}.get(key, 3)
    if key == 'best_epoch' and agg['std'] == 0:
        digits = 0
    text = f'{agg["mean"]:.{digits}f}'
    if agg['n'] > 1:
        text += f' ± {agg["std"]:.{digits}f}'
    return text


def summary_markdown(study: dict) -> str:
    """The study's table as Markdown."""
    seeds = study['seeds']
    lines = [f'# Study {study["study"]}', '']
    if study['description']:
        lines += [study['description'], '']
    seeds_text = (
        f'mean ± sample std over seeds {", ".join(map(str, seeds))}'
        if len(seeds) > 1
        else f'seed {seeds[0]}'
    )
    lines += [f'One row per variant; {seeds_text}.', '']
    headers = ['Variant', 'Status'] + [h for _, h in ROW_METRICS]
    if study['sweep_key']:
        headers.insert(1, study['sweep_key'])
    lines.append('| ' + ' | '.join(headers) + ' |')
    lines.append('|' + '---|' * len(headers))
    for row in study['variants']:
        cells = [row['variant'], row['status']]
        cells += [_fmt(row['metrics'][k], k) for k, _ in ROW_METRICS]
        if study['sweep_key']:
            cells.insert(1, f'{row["sweep_value"]:g}')
        lines.append('| ' + ' | '.join(c.replace('|', '/') for c in cells) + ' |')
    key = _ranking_key(study)
    # Best among variants whose runs all completed (a diverged run's early peak does not count).
    ranked = [
        r
        for r in study['variants']
        if r['metrics'][key]['n'] and r['status'].startswith('completed')
    ]
    if ranked:
        best = max(ranked, key=lambda r: r['metrics'][key]['mean'])
        label = 'final test accuracy' if key == 'test_accuracy' else 'best validation accuracy'
        lines += [
            '',
            f'Best by {label}: **{best["variant"]}** ({_fmt(best["metrics"][key], key)}).',
        ]
    lines += ['', '![comparison](comparison.png)']
    if study['sweep_key']:
        lines += ['', '![sweep](sweep.png)']
    lines += ['', '## Variants', '']
    for row in study['variants']:
        over = ', '.join(f'`{k}={v!r}`' for k, v in row['overrides'].items()) or 'base config'
        lines.append(f'- **{row["variant"]}**: {over}')
    if study['failures']:
        lines += ['', '## Failures', '']
        lines += [f'- {f["variant"]} seed {f["seed"]}: {f["error"]}' for f in study['failures']]
    return '\n'.join(lines) + '\n'


def _curves(runs: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-epoch mean and std of `key` over the runs (epochs any run has)."""
    per_epoch: dict[int, list[float]] = {}
    for run in runs:
        for record in read_metrics(run['workdir']):
            value = _finite(record.get(key))
            if value is not None:
                per_epoch.setdefault(int(record['epoch']), []).append(value)
    epochs = sorted(per_epoch)
    mean = np.array([np.mean(per_epoch[e]) for e in epochs])
    std = np.array([np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in map(per_epoch.get, epochs)])
    return np.array(epochs), mean, std


def _figure(ncols: int, width: float = 6.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, 4.5))
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]


def plot_comparison(study: dict, path: str | Path) -> None:
    """Per-epoch accuracy and loss (validation or test) of every variant on one axes pair."""
    split = 'test' if study['plot_metric'] == 'test_accuracy' else 'val'
    rows = study['variants']
    curves = {k: [_curves(r['runs'], k) for r in rows] for k in ('test_accuracy', 'val_accuracy')}
    if split == 'test' and not any(len(c[0]) for c in curves['test_accuracy']):
        split = 'val'  # No per-epoch test numbers (eval_test_each_epoch was off).
    fig, (ax_acc, ax_loss) = _figure(2)
    losses = []
    for i, row in enumerate(rows):
        label = row['variant'] + (
            '' if row['status'].startswith('completed') else f' ({row["status"]})'
        )
        for ax, key in ((ax_acc, f'{split}_accuracy'), (ax_loss, f'{split}_loss')):
            epochs, mean, std = curves[key][i] if key in curves else _curves(row['runs'], key)
            if not len(epochs):
                continue
            (line,) = ax.plot(epochs, mean, marker='o', markersize=3, label=label)
            if len(row['runs']) > 1:
                ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2)
            if ax is ax_loss:
                losses.extend(mean.tolist())
    name = 'validation' if split == 'val' else 'test'
    ax_acc.set(
        xlabel='epoch', ylabel=f'{name} accuracy', title=f'{study["study"]}: {name} accuracy'
    )
    ax_loss.set(xlabel='epoch', ylabel=f'{name} loss', title=f'{study["study"]}: {name} loss')
    positive = [x for x in losses if x > 0]
    if positive and max(positive) / min(positive) > 20:
        ax_loss.set_yscale('log')  # a diverging or differently-scaled loss squashes the rest
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_acc, ax_loss):
        # Whole epochs; min_n_ticks=1 keeps one-epoch runs from ticks like 0.995.
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_sweep(study: dict, path: str | Path) -> None:
    """The result against the swept number on a log axis; 0 sits one decade below the rest."""
    rows = study['variants']
    values = [float(r['sweep_value']) for r in rows]
    nonzero = [abs(v) for v in values if v != 0]
    zero_at = min(nonzero) / 10 if nonzero else 1.0
    xs = np.array([v if v != 0 else zero_at for v in values])
    order = np.argsort(xs)
    fig, (ax,) = _figure(1, width=7.0)
    keys = [('best_val_accuracy', 'best validation accuracy'), ('test_accuracy', 'test accuracy')]
    for key, label in keys:
        aggs = [r['metrics'][key] for r in rows]
        if not any(a['n'] for a in aggs):
            continue
        mean = np.array([a['mean'] if a['n'] else np.nan for a in aggs])
        std = np.array([a['std'] if a['n'] else np.nan for a in aggs])
        ax.errorbar(xs[order], mean[order], yerr=std[order], marker='o', capsize=3, label=label)
    for x, row in zip(xs, rows, strict=True):
        if 'diverged' in row['status'] or 'failed' in row['status']:
            agg = row['metrics']['best_val_accuracy']
            y = agg['mean'] if agg['n'] else 0.0
            ax.plot([x], [y], 'rx', markersize=10)
            ax.annotate(
                row['status'].split(':')[0],
                (x, y),
                textcoords='offset points',
                xytext=(0, 6),
                ha='center',
                fontsize='small',
                color='red',
            )
    ax.set_xscale('log')
    ax.margins(x=0.15)
    ticks = sorted(set(xs.tolist()))
    ax.set_xticks(ticks)
    ax.set_xticklabels(['0' if (t == zero_at and 0 in values) else f'{t:g}' for t in ticks])
    ax.minorticks_off()
    ax.set(
        xlabel=study['sweep_key'] + ' (log scale)',
        ylabel='accuracy',
        title=f'{study["study"]}: accuracy against {study["sweep_key"]}',
    )
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize='small')
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def study_outputs(study: dict) -> list[str]:
    """The files write_study_outputs writes for `study` (collect_study's result)."""
    return ['summary.json', 'summary.md', 'comparison.png'] + (
        ['sweep.png'] if study['sweep_key'] else []
    )


def write_study_outputs(
    config: ml_collections.ConfigDict, workdir: str | Path, failures: Sequence[dict] = ()
) -> dict:
    """Writes summary.json, summary.md, comparison.png (and sweep.png) into workdir."""
    workdir = Path(workdir)
    study = collect_study(config, workdir, failures)
    plot_comparison(study, workdir / 'comparison.png')
    if study['sweep_key']:
        plot_sweep(study, workdir / 'sweep.png')
    study['outputs'] = [str(workdir / o) for o in study_outputs(study)]
    (workdir / 'summary.md').write_text(summary_markdown(study))
    _write_json(workdir / 'summary.json', study)
    return study

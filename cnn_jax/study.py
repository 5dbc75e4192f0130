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
diverges is recorded as 'diverged at step N'; any other error is recorded as 'failed' (one
line in the output, its traceback in the run's error.log) and the study goes on. A
vectorised group that fails runs again as separate runs. Then it writes its outputs in
workdir (cnn_jax.study_report: summary.md, summary.json, comparison.png, sweep.png for a
sweep), rebuilt from what is on disk, so `--config.only` runs fill in the same table.
"""

from __future__ import annotations

import copy
import re
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections

from cnn_jax import parallel, records, run_record, sweep, tasks
from cnn_jax.config_checks import apply_overrides, check_config, config_value
from cnn_jax.errors import ConfigError, DataError
from cnn_jax.study_report import (
    ROW_METRICS,
    aggregate,
    output_files,
    row_status,
    run_row,
    status_text,
    write_study_outputs,
)

RunFn = Callable[[ml_collections.ConfigDict, str], dict]

PLOT_METRICS = ('val_accuracy', 'test_accuracy')
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
    """The experiment config of one run: base, then `seed`, then the variant's overrides. The
    result has no `study` or `only` field, so it runs as a plain experiment; its `name` (the
    title of the run's reports) is '<study>:<variant>' unless the variant sets it."""
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
    for name in names:
        vc = variant_config(config, name, seeds[0])  # Raises on a bad override.
        try:
            check_config(vc)
        except ConfigError as e:
            raise ConfigError(f'study {study.name!r}, variant {name!r}: {e}') from None
        if sweep_key:
            value = config_value(vc, sweep_key, name)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise ConfigError(
                    f'study.sweep_key {sweep_key!r} of variant {name!r} is {value!r}, not a number'
                )
    selected_variants(config)
    vectorize_mode(config)


def run_dir(workdir: str | Path, variant: str, seed: int, seeds: Sequence[int]) -> Path:
    """workdir/<variant>/ with one seed, workdir/<variant>/seed_<s>/ with several."""
    path = Path(workdir) / variant
    return path if len(seeds) == 1 else path / f'seed_{seed}'


# --- Running ------------------------------------------------------------------------


def _say(message: str) -> None:
    records.Reporter().line(message)


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
      one {'variant', 'seed', 'error', 'bad_input'} per run that raised, also counted in
      `failed` (launch.py exits 1 when it is not 0) and, if a ConfigError or DataError,
      in `config_errors` (then exit 2). KeyboardInterrupt (and errors.Interrupted)
      propagates: the next run of the study resumes.
    """
    validate_study(config)
    vectorize = run_fn is None
    run_fn = run_fn or tasks.run
    workdir = Path(workdir)
    main = parallel.is_main_process()  # Only process 0 writes files.
    if main:  # Creates the workdir with its config.json.
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
        done = records.read_summary(path)
        if done is None:
            pending.append(job)
        else:  # Reused only if it is a run of this variant's config.
            run_record.check_config(variant_config(config, *job), path)
            _say(f'{tags[job]}: skipped, already {status_text(done)} ({path})')
    groups = vectorized_groups(config, pending) if vectorize else {}
    failures: list[dict] = []
    for job in pending:
        group = groups.get(job, [job])
        if job != group[0]:
            continue  # Trained with the first job of its group.
        if len(group) > 1:
            try:
                summaries = _run_group(config, workdir, group, tags)
            except KeyboardInterrupt:  # errors.Interrupted too: checkpointed, resumes.
                raise
            except Exception as e:  # noqa: BLE001 - the separate runs may still work
                _log_error([run_dir(workdir, *j, seeds) for j in group])
                _say(f'study {name}: vectorised group failed ({_brief(e)}); running it separately')
            else:
                for j, summary in zip(group, summaries, strict=True):
                    _say(f'{tags[j]}: {status_text(summary or {"status": "completed"})}')
                continue
        for j in group:
            failures += _attempt(
                j,
                tags[j],
                run_dir(workdir, *j, seeds),
                lambda j=j: _run_one(config, workdir, j, tags[j], run_fn),
            )
    parallel.barrier('study runs')  # Then every process reads what process 0 wrote.
    result = collect_study(config, workdir, failures)
    if main:
        write_study_outputs(result, workdir)
    result['failed'] = len(failures)
    result['config_errors'] = sum(f['bad_input'] for f in failures)
    _say(f'study {name}: {workdir / "summary.md"}, summary.json, comparison.png')
    if failures:
        _say(f'study {name}: {len(failures)} run(s) failed; re-run the command to retry them')
    return result


def vectorize_mode(config: ml_collections.ConfigDict) -> str:
    """`config.vectorize` as 'auto', 'true' or 'false' (a flag gives a string, Python a bool)."""
    value = config.vectorize
    text = str(value).strip().lower()
    if text in ('auto', 'true', 'false'):
        return text
    raise ConfigError(f'config.vectorize must be auto, true or false, got {value!r}')


def vectorized_groups(
    config: ml_collections.ConfigDict, jobs: Sequence[tuple[str, int]]
) -> dict[tuple[str, int], list[tuple[str, int]]]:
    """Maps each (variant, seed) job that trains vectorised to its group's jobs, in order:
    the `sweep.vectorizable_groups` of the jobs' overrides (seed included) that
    config.vectorize allows (module doc). Groups of one job run as ordinary experiments."""
    mode = vectorize_mode(config)
    if mode == 'false' or len(jobs) < 2:
        return {}
    allowed = sweep.can_vectorize if mode == 'true' else sweep.should_vectorize
    out = {}
    for indices in sweep.vectorizable_groups([_job_overrides(config, job) for job in jobs]):
        members = [jobs[i] for i in indices]
        if len(indices) > 1 and allowed(*_group_program(config, members)):
            out.update({job: members for job in members})
    return out


def _job_overrides(config: ml_collections.ConfigDict, job: tuple[str, int]) -> dict[str, Any]:
    """A job's overrides, its seed included (a variant's own seed wins)."""
    variant, seed = job
    return {'seed': seed, **dict(config.study.variants)[variant]}


def _group_program(
    config: ml_collections.ConfigDict, group: Sequence[tuple[str, int]]
) -> tuple[ml_collections.ConfigDict, list[dict[str, Any]]]:
    """A vectorised group's base experiment (the study's config plus the overrides its
    members share: those that change the program) and each member's SWEEPABLE rest."""
    parts = [sweep.split_overrides(_job_overrides(config, job)) for job in group]
    return apply_overrides(_strip_study(config), parts[0][0], group[0][0]), [p[1] for p in parts]


def _run_group(
    config: ml_collections.ConfigDict,
    workdir: Path,
    group: list[tuple[str, int]],
    tags: dict[tuple[str, int], str],
) -> list[dict]:
    """Trains `group` as one vmapped program (cnn_jax.sweep); returns the runs' summaries."""
    paths = [run_dir(workdir, v, s, study_seeds(config)) for v, s in group]
    for job, path in zip(group, paths, strict=True):
        if parallel.is_main_process():
            run_record.record_config(variant_config(config, *job), path)
        _say(f'{tags[job]}: running vectorised with {len(group) - 1} other run(s) in {path}')
    base, sweepables = _group_program(config, group)
    return sweep.run_vectorized(
        base, sweepables, paths, names=[run_name(config, v) for v, _ in group]
    )


def _run_one(
    config: ml_collections.ConfigDict, workdir: Path, job: tuple[str, int], tag: str, run_fn: RunFn
) -> dict:
    """Runs (or resumes) one variant x seed; returns its summary."""
    variant, seed = job
    path = run_dir(workdir, variant, seed, study_seeds(config))
    _say(f'{tag}: {"resuming" if path.exists() and any(path.iterdir()) else "running"} in {path}')
    path.mkdir(parents=True, exist_ok=True)
    return run_fn(variant_config(config, variant, seed), str(path))


def _attempt(job: tuple[str, int], tag: str, path: Path, train: Callable[[], dict]) -> list[dict]:
    """Calls `train` for `job` and says how it ended; returns its failure record, if any
    (module doc: an error is one line, KeyboardInterrupt propagates)."""
    try:
        summary = train()
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 - one bad variant must not stop the study
        _log_error([path])
        _say(f'{tag}: FAILED: {_brief(e)}')
        bad_input = isinstance(e, ConfigError | DataError)
        return [{'variant': job[0], 'seed': job[1], 'error': _brief(e), 'bad_input': bad_input}]
    _say(f'{tag}: {status_text(summary or {"status": "completed"})}')
    return []


def _brief(error: Exception) -> str:
    """'<type>: <message>' on one line."""
    return ' '.join(f'{type(error).__name__}: {error}'.split())


def _log_error(paths: Sequence[Path]) -> None:
    """Appends the traceback being handled to each run's error.log."""
    if not parallel.is_main_process():
        return
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        with open(path / 'error.log', 'a') as f:
            f.write(f'--- {time.strftime("%Y-%m-%d %H:%M:%S")}\n{traceback.format_exc()}')


# --- Collecting ---------------------------------------------------------------------


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
            run_row(run_dir(workdir, variant, s, seeds), s, failed.get((variant, s))) for s in seeds
        ]
        row = {
            'variant': variant,
            'overrides': dict(overrides),
            'status': row_status(runs),
            'metrics': {k: aggregate(r[k] for r in runs) for k, _ in ROW_METRICS},
            'runs': runs,
        }
        if sweep_key:
            row['sweep_value'] = config_value(variant_config(config, variant), sweep_key, variant)
        rows.append(row)
    return {
        'study': config.study.name,
        'description': config.study.get('description', '') or '',
        'plot_metric': config.study.get('plot_metric', 'val_accuracy'),
        'sweep_key': sweep_key,
        'seeds': list(seeds),
        'variants': rows,
        'failures': [dict(f) for f in failures],
        'outputs': [str(workdir / f) for f in output_files(sweep_key)],
    }

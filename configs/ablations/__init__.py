"""Study configs: each file here is one comparison of EXPERIMENTS.md.

A study config is its base experiment's config plus `config.study` (see cnn_jax.study):
`python launch.py --config=configs/ablations/<study>.py` runs every variant, skips the
finished ones, resumes an interrupted one and writes summary.md, summary.json,
comparison.png (and sweep.png for a sweep) in the study's workdir. `--config.only=<variant>`
runs one variant; other `--config.<key>=...` flags change the base config of every variant,
and a variant's own overrides win over them.
"""

from collections.abc import Sequence
from typing import Any

import ml_collections
from ml_collections import config_dict

from cnn_jax.run_record import flatten  # Values as they are: tuples stay tuples.

Variant = tuple[str, dict[str, Any]]


def make_study(
    config: ml_collections.ConfigDict,
    name: str,
    variants: Sequence[Variant],
    *,
    seeds: Sequence[int] = (),
    plot_metric: str = 'val_accuracy',
    sweep_key: str | None = None,
    description: str = '',
) -> ml_collections.ConfigDict:
    """Adds `study` (and `only`) to the base experiment `config` and returns it.

    Args:
      config: the base experiment's config (e.g. `configs.simplenn.get_config()`).
      name: the study's name.
      variants: (name, overrides) pairs; override keys are dotted config paths.
      seeds: seeds of every variant; () means just config.seed.
      plot_metric: 'val_accuracy' or 'test_accuracy' (then eval_test_each_epoch is set).
      sweep_key: dotted path of the number swept over, for a log-axis plot.
      description: the question the study answers (first line of summary.md).
    """
    config.study = ml_collections.ConfigDict()
    config.study.name = name
    config.study.description = description
    config.study.variants = tuple((v, dict(o)) for v, o in variants)
    config.study.seeds = tuple(seeds)
    config.study.plot_metric = plot_metric
    config.study.sweep_key = sweep_key or ''
    config.only = config_dict.placeholder(str)
    if plot_metric == 'test_accuracy':
        config.eval_test_each_epoch = True
    return config


def config_diff(
    base: ml_collections.ConfigDict,
    other: ml_collections.ConfigDict,
    ignore: Sequence[str] = ('name',),
) -> dict[str, Any]:
    """The dotted-path overrides that turn `base` into `other` (keys whose values differ).

    `name` is left out by default: a study names each run '<study>:<variant>'.
    """
    a, b = flatten(base.to_dict()), flatten(other.to_dict())
    return {k: v for k, v in b.items() if k not in ignore and (k not in a or a[k] != v)}


def sweep(key: str, values: Sequence[float], fmt: str = '{}_{:g}') -> list[Variant]:
    """One variant per value of `key`, named e.g. 'learning_rate_0.01'."""
    short = key.rsplit('.', 1)[-1]
    return [(fmt.format(short, v), {key: v}) for v in values]

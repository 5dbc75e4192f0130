"""What `config.task` runs: a training experiment, or the frozen-feature SVM.

launch.py and studies go through `run`, so neither task's module imports the other.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import ml_collections

from cnn_jax import experiment, parallel, run_record
from cnn_jax.config_checks import check_config
from cnn_jax.errors import ConfigError
from cnn_jax.transfer import svm

TaskFn = Callable[[ml_collections.ConfigDict, str | pathlib.Path], dict[str, Any]]
TASKS: dict[str, TaskFn] = {'train': experiment.run, 'svm': svm.run_svm}


def run(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict[str, Any]:
    """Checks `config`'s values and the workdir's record of its config (run_record), then
    runs its task in `workdir`; returns its summary."""
    if config.task not in TASKS:
        raise ConfigError(f'unknown task {config.task!r}; known tasks: {", ".join(TASKS)}')
    check_config(config)
    if parallel.is_main_process():  # Only process 0 writes files.
        run_record.record_config(config, workdir)
    else:
        run_record.check_config(config, workdir)
    return TASKS[config.task](config, workdir)

"""Runs one experiment (or one study) from a config file.

    python launch.py --config=configs/quickstart.py [--config.key=value ...] [--workdir=DIR]
    python launch.py --config=configs/vgg.py --summary       # layer table, no training
    python launch.py --config=configs/quickstart.py --eval_only [--checkpoint=latest]

Multi-process (hosts, or processes on one host): the same command in each process, with
--coordinator=HOST:PORT --num_processes=N --process_id=I (or JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID; SLURM and other clusters JAX detects need neither).

Re-running the same command on the same workdir resumes from its latest checkpoint; a
workdir with a checkpoint refuses a config that would change its results (--restart starts
it over), and a workdir that another launch is using is refused.
Exit codes: 0 done, 1 diverged (or a study run failed), 2 a mistake in the command line,
config or data, a study run's included (one 'error: ...' line on stderr, no traceback),
or a workdir in use, 130 interrupted.
"""

import pathlib
import sys

from absl import app, flags, logging
from ml_collections import config_flags

# Neither imports JAX: XLA_FLAGS can still be set after the flags are parsed.
from cnn_jax import cli, xla_cpu

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Output folder; default results/<config file stem>[_<arg>].'
)
_SUMMARY = flags.DEFINE_bool('summary', False, "Print the model's layer table and exit.")
_RESTART = flags.DEFINE_bool(
    'restart', False, 'Delete what an earlier run left in the workdir and start over.'
)
_EVAL_ONLY = flags.DEFINE_bool(
    'eval_only',
    False,
    "Evaluate the workdir's checkpoint on the test split (--config.dataset= may name other "
    'data of the same classes); writes eval_<checkpoint>.md/.json there, trains nothing.',
)
_CHECKPOINT = flags.DEFINE_enum(
    'checkpoint', 'best', ['best', 'latest'], 'With --eval_only: which checkpoint.'
)
_COORDINATOR = flags.DEFINE_string(
    'coordinator', None, 'Multi-process: HOST:PORT of process 0 (JAX_COORDINATOR_ADDRESS).'
)
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'Multi-process: how many processes (JAX_NUM_PROCESSES).'
)
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, "Multi-process: this process's index, 0 to N-1 (JAX_PROCESS_ID)."
)


def default_workdir(config_path: str) -> str:
    path, _, arg = config_path.partition(':')
    stem = pathlib.Path(path).stem
    parent = pathlib.Path(path).parent.name
    name = f'{parent}_{stem}' if parent not in ('configs', '') else stem
    return str(pathlib.Path('results') / (f'{name}_{arg}' if arg else name))


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, a mistake ending as one 'error:' line and exit code 2."""
    try:
        rest = flags.FLAGS(argv)
        _CONFIG.value.keys()  # ml_collections defers a config file's load error to first use.
        return rest
    except Exception as e:  # noqa: BLE001 - the config file itself can raise anything.
        print(f'error: {cli.flag_error_message(e, argv)}', file=sys.stderr)
        sys.exit(2)


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        print(f'error: unexpected arguments: {" ".join(argv[1:])}', file=sys.stderr)
        return 2
    if not flags.FLAGS['verbosity'].present:  # Orbax logs every save at INFO.
        logging.set_verbosity(logging.WARNING)
    from cnn_jax import parallel  # Imports JAX, which has not started a backend yet.
    from cnn_jax.errors import ConfigError

    if not _SUMMARY.value:  # First: before anything starts a JAX backend.
        try:
            parallel.initialize_distributed(
                _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value
            )
        except ConfigError as e:
            print(f'error: {e}', file=sys.stderr)
            return 2
    xla_cpu.use_recommended_flags()  # CPU speed-ups XLA_FLAGS does not already set.

    config = _CONFIG.value
    workdir = _WORKDIR.value or default_workdir(flags.FLAGS['config'].config_filename)
    if _SUMMARY.value:
        return cli.print_summary(config)
    if _EVAL_ONLY.value:
        if _RESTART.value:
            print('error: --eval_only never deletes a run: drop --restart', file=sys.stderr)
            return 2
        return cli.evaluate_only(config, workdir, _CHECKPOINT.value)
    return cli.run(config, workdir, restart=_RESTART.value)


if __name__ == '__main__':
    flags.mark_flag_as_required('config')
    xla_cpu.keep_freed_memory()  # Before JAX loads: its buffers reused, not mapped afresh.
    sys.exit(app.run(main, flags_parser=parse_flags))

"""What launch.py does with its flags: run, summarise, and turn errors into messages.

A mistake in the command line or the config ends as one line on stderr, 'error: ...',
and exit code 2 (1 is a diverged run, 130 an interrupted one): `flag_error_message` for
those found while absl parses the flags and loads the config file, `run` for the rest.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Sequence

import ml_collections
from absl import flags as absl_flags

from cnn_jax.errors import CnnJaxError, ConfigError, Interrupted


def enable_compilation_cache() -> None:
    """Keeps XLA programs on disk: a study's variants and re-runs skip recompiling. Every
    program, down to the ~100 small ones of eager ops a run starts with (about 40 ms each
    to compile): with them, a repeated 2-step quickstart took 9.7-10.1 s instead of
    14.7-15.3 s on 2 CPU cores (about 800 KB of cache). No size cap: JAX's cap takes a
    lock file that every process would write."""
    import jax

    from cnn_jax.data.sources import default_cache_dir

    jax.config.update('jax_compilation_cache_dir', str(default_cache_dir() / 'xla'))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def print_summary(config: ml_collections.ConfigDict) -> int:
    """The layer table of config.model at the experiment's input shape, without its data.
    Shape and class count come from the config and the dataset's metadata (a header, a
    listing or TFDS's feature description): no decode, no download."""
    try:
        from cnn_jax import summary
        from cnn_jax.data.metadata import dataset_metadata, model_input_shape
        from cnn_jax.models import build_model

        meta = dataset_metadata(config)
        model = build_model(config, len(meta.class_names))
        print(summary.layer_table(model, model_input_shape(config, meta)))
    except CnnJaxError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


def evaluate_only(config: ml_collections.ConfigDict, workdir: str, checkpoint: str) -> int:
    """launch.py --eval_only: the workdir's `checkpoint` weights on the test split
    (cnn_jax.evaluate_only); no lock, as nothing the run wrote is written. Exit 0, or 2
    with one error line."""
    enable_compilation_cache()
    from cnn_jax import evaluate_only
    from cnn_jax.config_checks import check_config

    try:
        if 'study' in config or config.task != 'train':
            raise ConfigError('--eval_only evaluates one trained run: not a study or an SVM')
        check_config(config)
        evaluate_only.run(config, workdir, checkpoint)
    except CnnJaxError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    return 0


def run(config: ml_collections.ConfigDict, workdir: str, restart: bool = False) -> int:
    """Runs the experiment or study; exit code 0 done, 1 diverged/failed, 2 bad input, 130
    stop. Process 0 holds the workdir's lock for the whole job (a second launch there exits 2
    naming it); `restart` deletes the workdir's contents first (launch.py --restart)."""
    enable_compilation_cache()
    from cnn_jax import parallel
    from cnn_jax.config_checks import check_config
    from cnn_jax.run_record import start_over, workdir_lock
    from cnn_jax.study import validate_study

    try:
        # Mistakes in the config's values stop before anything (the lock) is written.
        if 'study' in config:
            validate_study(config)
        else:
            check_config(config)
        with contextlib.ExitStack() as held:
            busy = None
            if parallel.is_main_process():
                try:
                    held.enter_context(workdir_lock(workdir))
                except ConfigError as e:
                    busy = str(e)
            if busy := parallel.from_main(busy):  # Every process stops if process 0 must.
                raise ConfigError(busy)
            if restart:
                if parallel.is_main_process():  # The others wait, then find it empty.
                    start_over(workdir)
                parallel.barrier('restart')
            return _run(config, workdir)
    except Interrupted as e:
        print(f'\n{e}', file=sys.stderr)
        return 130
    except CnnJaxError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2


def _run(config: ml_collections.ConfigDict, workdir: str) -> int:
    if 'study' in config:
        from cnn_jax.study import run_study

        result = run_study(config, workdir)
        return 2 if result.get('config_errors') else 1 if result.get('failed') else 0
    from cnn_jax.tasks import run as run_task

    return 1 if run_task(config, workdir).get('status') == 'diverged' else 0


def flag_error_message(error: BaseException, argv: Sequence[str], flag: str = 'config') -> str:
    """One line saying what is wrong, for an exception raised while parsing the flags. absl
    and ml_collections wrap what went wrong: an exception of the config file may come as a
    flags error holding its traceback as text, an override of a key the config does not have
    as an AttributeError over KeyErrors, an unreadable file as an OSError on first use. The
    exception that says what is wrong is down the chain of causes."""
    chain = _chain(error)
    ours = [e for e in chain if isinstance(e, CnnJaxError)]
    if ours:  # A config file's own ConfigError (e.g. an unknown variant).
        return _one_line(str(ours[-1]))
    if isinstance(chain[-1], KeyError) and (message := _unknown_key(chain, argv, flag)):
        return message
    source = next((a for a in argv if a.startswith((f'--{flag}=', f'-{flag}='))), f'--{flag}')
    if isinstance(chain[-1], OSError):  # ml_collections could not read the file.
        why = str(chain[-1]).strip().splitlines() or [type(chain[-1]).__name__]
        return _one_line(f'cannot load {source}: {why[-1]}')
    wrapped = [i for i, e in enumerate(chain) if str(e).startswith('Error whilst parsing')]
    if wrapped or not isinstance(error, absl_flags.Error):  # Raised by the config file.
        cause = chain[wrapped[0] + 1] if wrapped and wrapped[0] + 1 < len(chain) else error
        return _one_line(f'{source}: {type(cause).__name__}: {cause}')
    return _one_line(str(error))


def _chain(error: BaseException) -> list[BaseException]:
    """`error`, then what caused it, and so on (outermost first)."""
    chain: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in chain:
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _unknown_key(chain: list[BaseException], argv: Sequence[str], flag: str) -> str | None:
    """'unknown config key ...' for the override that names a missing key, if one does."""
    key = chain[-1].args[0] if chain[-1].args else None
    for arg in argv:
        match = re.match(rf'-{{1,2}}(?:no)?{flag}\.([^=]+)', arg)
        parts = match.group(1).split('.') if match else []
        if key in parts:
            path = '.'.join(parts[: parts.index(key) + 1])
            message = f'unknown config key {path!r} in {arg.split("=", 1)[0]}'
            hint = re.search(r'Did you mean "([^"]+)"', ' '.join(map(str, chain)))
            if hint:
                message += f'; did you mean {".".join([*parts[: parts.index(key)], hint[1]])!r}?'
            return message
    return None


def _one_line(text: str) -> str:
    return ' '.join(text.split())

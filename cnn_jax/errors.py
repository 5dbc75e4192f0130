"""Errors that a user can act on: launch.py prints their message without a traceback."""


class CnnJaxError(Exception):
    """Base class: the message alone tells the user what is wrong and what to do."""


class ConfigError(CnnJaxError, ValueError):
    """A config value is unknown, out of range or inconsistent."""


class DataError(CnnJaxError, ValueError):
    """A dataset cannot be found, read or used as configured."""


class CheckpointError(CnnJaxError, RuntimeError):
    """No checkpoint in the workdir can be restored into the configured run."""


class Interrupted(CnnJaxError, KeyboardInterrupt):
    """Training stopped on request (Ctrl-C, SIGTERM) after saving a checkpoint."""

    def __init__(self, step: int, workdir: str):
        super().__init__(
            f'interrupted at step {step}; checkpoint saved in {workdir}. '
            'Re-run the same command to resume from it.'
        )

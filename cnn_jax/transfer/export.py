"""Exports a run's trained ResNet as a torchvision state_dict (.pth, .safetensors or .npz).

    python -m cnn_jax.transfer.export results/resnet18 resnet18.pth [--which=best]

Reads the workdir's latest (or best) Orbax checkpoint without needing the config: the
parameters and batch-norm statistics are renamed to torchvision's tensor names, so
`torchvision.models.resnet18().load_state_dict(torch.load('resnet18.pth'))` and
`--config.pretrained=resnet18.pth` both take the file.
"""

import pathlib
import sys

import orbax.checkpoint as ocp
from absl import app, flags, logging

from cnn_jax.errors import CnnJaxError, ConfigError
from cnn_jax.transfer.weights import export_torchvision

_WHICH = flags.DEFINE_enum('which', 'latest', ['latest', 'best'], 'Which checkpoint to export.')


def export_run(workdir: str, out: str, which: str = 'latest') -> int:
    """Writes `out` from workdir/checkpoints/<which>; returns the step exported."""
    directory = pathlib.Path(workdir).absolute() / 'checkpoints' / which
    if not directory.is_dir():
        raise ConfigError(f'no {which} checkpoints in {directory}: train there first')
    with ocp.CheckpointManager(directory) as manager:
        step = manager.best_step() if which == 'best' else manager.latest_step()
        if step is None:
            raise ConfigError(f'no {which} checkpoint in {directory}')
        # No template: the state comes back as plain nested dicts of arrays.
        state = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    state = state['state']
    export_torchvision({'params': state['params'], 'batch_stats': state['batch_stats']}, out)
    return step


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        raise app.UsageError('usage: python -m cnn_jax.transfer.export WORKDIR OUT_FILE')
    logging.set_verbosity(logging.WARNING)  # Orbax logs every read at INFO.
    try:
        step = export_run(argv[1], argv[2], _WHICH.value)
    except CnnJaxError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    print(f'wrote {argv[2]} from step {step} of {argv[1]}')
    return 0


if __name__ == '__main__':
    app.run(main)

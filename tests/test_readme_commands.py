"""Every command README.md shows runs: a broken documented path fails here, not for a user.

The commands are read from README.md's fenced blocks and its inline `python ...` spans.
Each runs as written, on a tiny slice added through overrides (one epoch of a step or two,
digits or a few hundred CIFAR-10 images), its placeholders filled in, into a temporary
folder, with a time limit. A command a test cannot run is in SKIP, with the reason; a
command that is in neither fails the first test until this file learns it.
"""

import concurrent.futures
import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'
TIMEOUT_S = 900  # Per command; two CPU cores shared with other work.
EXPORT = ['-m', 'cnn_jax.transfer.export']

SKIP = {
    'python -m pytest -q -m "not slow" -n 2 --dist loadfile': 'the test suite itself',
    'python -m benchmarks.gpu_check --out DIR': (
        'run end to end with --tiny by tests/test_gpu_check.py (slow tier)'
    ),
    'python -m reproduce.torch_recipe --config=<config> --data ... --out FILE.json': (
        'trains the PyTorch reference recipe at its full schedule (no quick-slice option)'
    ),
}
# What a placeholder stands for here (DIR: the CIFAR-10 archive; WORKDIR: E2's ResNet-18).
PLACEHOLDERS = {
    'configs/<experiment>.py': 'configs/quickstart.py',
    'configs/ablations/<study>.py': 'configs/ablations/simplenn_lr_sweep.py',
    'folder:DIR': f'folder:{DATA}',
}
LAUNCH_TINY = ['--config.num_epochs=1', '--config.steps_per_epoch=2']
LAUNCH_TINY += ['--config.max_eval_examples=64']
# SimpleNN needs 12 px. The README's vectorize=true, which `auto` is on an accelerator.
STUDY_TINY = ['--config.dataset=digits', '--config.image_size=16', '--config.vectorize=true']
REPRODUCE_TINY = ['num_epochs=1', 'steps_per_epoch=1', 'max_train_examples=256']
REPRODUCE_TINY += ['max_eval_examples=64']


def readme_commands() -> list[str]:
    """The `python ...` commands of README.md, in order, without comments or env setup."""
    text = (REPO / 'README.md').read_text()
    chunks = re.findall(r'```(?:bash|sh)?\n(.*?)```', text, re.S)
    chunks += [' '.join(span.split()) for span in re.findall(r'`(python [^`]+)`', text)]
    commands = []
    for chunk in chunks:
        for line in chunk.replace('\\\n', ' ').splitlines():
            for part in re.sub(r'\s+#.*$', '', line).split('&&'):
                part = re.sub(r'^(\w+=\S+\s+)+', '', ' '.join(part.split()))  # VAR=value
                if part.startswith('python ') and ' -m venv ' not in part:
                    commands.append(part)
    return list(dict.fromkeys(commands))


def tiny_argv(command: str, tmp: pathlib.Path, index: int) -> list[str]:
    """`command` as argv with its placeholders filled in and the tiny slice added."""
    text = re.sub(r'\s*\[[^\]]*\]', '', command)  # [--optional ...] arguments.
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    argv = shlex.split(text)[1:]
    if argv[0] == 'launch.py':
        if '--summary' in argv:
            return argv
        extra = STUDY_TINY if 'ablations/' in text else []
        workdir = tmp / f'launch_{index}'
        if '--workdir=W' in argv:  # One workdir: a run, then its --eval_only after it.
            argv, workdir = [a for a in argv if a != '--workdir=W'], tmp / 'W'
        return [*argv, *LAUNCH_TINY, *extra, f'--workdir={workdir}']
    module = argv[1] if argv[0] == '-m' else None
    if module == 'reproduce':
        if '--root' in argv:  # Its own example root: the same one here.
            del argv[argv.index('--root') : argv.index('--root') + 2]
        argv += ['--root', str(tmp / 'reproduce')]
        if '--only' not in argv and '--table' not in argv:
            argv += ['--only', 'E10']  # Every experiment, even sliced, takes an hour here.
        if 'E2,E6-E7' in argv:  # E6-E7's six studies (19 runs): the study command above
            argv[argv.index('E2,E6-E7')] = 'E2'  # and tests/test_study_vectorized.py.
        if '--table' not in argv:
            if '--data' not in argv:
                argv += ['--data', 'cifar10=digits']
            argv += [a for item in REPRODUCE_TINY for a in ('--override', item)]
        return argv
    if module == 'benchmarks':
        return [*argv, '--quick', '--json', str(tmp / 'benchmark.json')]
    if module == 'cnn_jax.transfer.export':
        workdir = str(tmp / 'reproduce' / 'E2' / 'resnet18')  # Trained by --only E2,...
        return [workdir if a == 'WORKDIR' else str(tmp / a) if a == 'OUT.pth' else a for a in argv]
    raise AssertionError(f'README command {command!r}: add it to SKIP or teach this test')


def needs_data(command: str) -> bool:
    return 'folder:DIR' in command or 'cnn_jax.transfer.export' in command


def test_every_readme_command_is_run_or_skipped_with_a_reason(tmp_path):
    commands = readme_commands()
    assert 'python launch.py --config=configs/quickstart.py' in commands
    for command in commands:
        if command not in SKIP:
            tiny_argv(command, tmp_path, 0)  # Raises for a command this file does not know.
    assert set(SKIP) <= set(commands), 'SKIP names a command the README no longer shows'


def run_command(command: str, argv: list[str]) -> str | None:
    """Runs one README command as a user would (8 virtual devices); its failure, or None."""
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8')
    try:
        proc = subprocess.run(
            [sys.executable, *argv], cwd=REPO, env=env, capture_output=True, text=True,
            timeout=TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return f'{command}: over {TIMEOUT_S} s'
    if proc.returncode != 0:
        return f'{command}: exit {proc.returncode}\n{proc.stderr[-2000:]}'
    if 'vectorised group failed' in proc.stdout:  # Ran, but not as documented.
        return f'{command}: {proc.stdout[-2000:]}'
    return None


@pytest.mark.slow
def test_every_readme_command_runs_on_a_tiny_slice(tmp_path):
    commands = [c for c in readme_commands() if c not in SKIP]
    if not DATA.exists():
        commands = [c for c in commands if not needs_data(c)]
    # Two lanes at once, one per core, each in the README's order: the commands that share
    # reproduce's root (the export reads the ResNet-18 that `--only E2,...` trains, so it
    # goes last) and the others, each in a workdir of its own.
    commands.sort(key=lambda c: 'cnn_jax.transfer.export' in c)
    jobs = [(c, tiny_argv(c, tmp_path, i)) for i, c in enumerate(commands)]
    shared_root = [job for job in jobs if job[1][:2] in (['-m', 'reproduce'], EXPORT)]
    lanes = [shared_root, [job for job in jobs if job not in shared_root]]
    with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
        runs = pool.map(lambda lane: [run_command(*job) for job in lane], lanes)
        failed = [failure for lane in runs for failure in lane if failure]
    assert not failed, '\n\n'.join(failed)
    assert (tmp_path / 'OUT.pth').stat().st_size > 0 or not DATA.exists()

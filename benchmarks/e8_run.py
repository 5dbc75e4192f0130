"""E8 (ResNet-20 on CIFAR-10, configs/resnet20.py) through launch.py, stopped by a deadline.

`run_e8` starts `python launch.py --config=configs/resnet20.py` on a `folder:` archive
as a child process (the user's own command: it records, checkpoints and resumes as any
run does) and sends it SIGTERM at the deadline: the training loop saves a checkpoint
after the step it is in and exits 130, and the same call again resumes from there. `stop_at`
(E8's own budget) waits for training to have begun, so that a run stopped early still
saves a step; `hard_stop_at` (the command's deadline) does not wait: before the first
step there is nothing to save but compilation.

The child imports neither TensorFlow, TFDS nor CLU on this path (folder decoding falls
back to Pillow): tests/test_gpu_check.py runs it with those imports blocked.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = 'configs/resnet20.py'
# --tiny: a handful of steps on a small slice (config keys of configs/default.py).
TINY_OVERRIDES = {
    'num_epochs': 3,
    'steps_per_epoch': 4,
    'batch_size': 32,
    'max_train_examples': 640,
    'max_eval_examples': 200,
    'log_every_steps': 1,
}
PROGRESS = re.compile(r'\bstep (\d+)/(\d+)\b')  # cnn_jax.records.Progress lines.
RESUMED = re.compile(r'Resuming from checkpoint at step (\d+)')
# What the report keeps of summary.json.
SUMMARY_KEYS = (
    'status',
    'test_accuracy',
    'val_accuracy',
    'train_accuracy',
    'test_loss',
    'epochs_run',
    'wall_time_s',
    'compile_s',
    'train_steps_per_s',
    'train_images_per_s',
    'resumed_from_step',
    'platform',
    'device_kind',
)
SMALL_OUTPUTS = ('summary.json', 'metrics.jsonl', 'config.json', 'report.md', 'curves.png')


def command(
    archive: pathlib.Path, workdir: pathlib.Path, cache_dir: str | None, tiny: bool
) -> list[str]:
    """The launch.py command line of E8 (the paper's schedule unless `tiny`).

    An archive inside the repository is named relative to it: the dataset is part of the
    run's recorded config, and a device's checkout may lie elsewhere on the next call.
    """
    archive = archive.resolve()
    if REPO in archive.parents:
        archive = archive.relative_to(REPO)
    cmd = [
        sys.executable,
        'launch.py',  # Run in REPO.
        f'--config={CONFIG}',
        f'--workdir={workdir}',
        f'--config.dataset=folder:{archive}',
    ]
    if cache_dir:
        cmd.append(f'--config.cache_dir={cache_dir}')
    if tiny:
        cmd += [f'--config.{k}={v}' for k, v in TINY_OVERRIDES.items()]
    return cmd


class _Watcher:
    """Copies the child's output to a log file; notes when training has begun."""

    def __init__(self, proc: subprocess.Popen, log_path: pathlib.Path):
        self.started = threading.Event()
        self.resumed_from: int | None = None
        self.last_step: int | None = None
        self.total_steps: int | None = None
        self.tail: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc, log_path), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen, log_path: pathlib.Path) -> None:
        with log_path.open('a') as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                self.tail = (self.tail + [line.rstrip()])[-20:]
                if m := RESUMED.search(line):
                    self.resumed_from = int(m.group(1))
                if m := PROGRESS.search(line):
                    self.last_step, self.total_steps = int(m.group(1)), int(m.group(2))
                    self.started.set()

    def join(self) -> None:
        self._thread.join(timeout=10)


def _wait(proc: subprocess.Popen, watcher: _Watcher, stop_at: float, hard_stop_at: float) -> bool:
    """Waits for the child; SIGTERM once `stop_at` has passed and training has begun, or at
    `hard_stop_at` regardless; SIGKILL if it has not saved and exited 120 s later.
    Returns whether it was signalled."""
    signalled_at = None
    while proc.poll() is None:
        now = time.time()
        if signalled_at is None:
            if (now >= stop_at and watcher.started.is_set()) or now >= hard_stop_at:
                proc.send_signal(signal.SIGTERM)
                signalled_at = now
        elif now >= signalled_at + 120:
            proc.kill()
        time.sleep(0.1)
    return signalled_at is not None


def run_e8(
    archive: pathlib.Path,
    workdir: pathlib.Path,
    out_dir: pathlib.Path,
    *,
    stop_at: float = float('inf'),
    hard_stop_at: float = float('inf'),
    cache_dir: str | None = None,
    tiny: bool = False,
) -> dict[str, Any]:
    """Runs (or resumes) E8 in `workdir` until it finishes or is stopped (times are
    time.time(): `stop_at` once training has begun, `hard_stop_at` in any case); its log
    and small outputs go to `out_dir`. Returns the figures of this invocation."""
    if not archive.is_file():
        raise FileNotFoundError(
            f'{archive} not found: copy the CIFAR-10 archive (cifar10-jpeg.tar.gz) there'
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = command(archive, workdir, cache_dir, tiny)
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    t0 = time.time()
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    watcher = _Watcher(proc, out_dir / 'launch.log')
    stopped = _wait(proc, watcher, stop_at, hard_stop_at)
    watcher.join()
    summary = _read_json(workdir / 'summary.json')
    if summary is not None:
        status = summary['status']
    elif stopped and proc.returncode == 130:
        status = 'stopped at the deadline, checkpointed: run the same command to resume'
    elif stopped and not watcher.started.is_set():
        status = 'stopped at the deadline before its first step (nothing to save)'
    else:
        status = f'failed (exit code {proc.returncode})'
    _copy_outputs(workdir, out_dir)
    failed = status.startswith('failed')
    return {
        **({'error': f'{status}: {watcher.tail[-1] if watcher.tail else ""}'} if failed else {}),
        'status': status,
        'exit_code': proc.returncode,
        'command': ' '.join(cmd[1:]),
        'workdir': str(workdir),
        'wall_s': round(time.time() - t0, 1),
        'resumed_from_step': watcher.resumed_from,
        'last_step': watcher.last_step,
        'total_steps': watcher.total_steps,
        'summary': {k: summary.get(k) for k in SUMMARY_KEYS} if summary else None,
        'log_tail': None if summary else watcher.tail,
    }


def _read_json(path: pathlib.Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _copy_outputs(workdir: pathlib.Path, out_dir: pathlib.Path) -> None:
    """The run's small files into `out_dir`; its checkpoints too when the workdir lies
    elsewhere (a device returns only what is under its output folder)."""
    for name in SMALL_OUTPUTS:
        if (workdir / name).is_file():
            shutil.copy2(workdir / name, out_dir / name)
    inside = out_dir.resolve() in workdir.resolve().parents
    if not inside and workdir.is_dir():
        shutil.copytree(workdir, out_dir / 'workdir', dirs_exist_ok=True)

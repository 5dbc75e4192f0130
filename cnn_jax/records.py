"""What a run reports: console lines, metrics.jsonl, TensorBoard events, a progress line.

`Reporter` is the one way out for all of them, and decides which process writes.
metrics.jsonl has one JSON object per epoch (plots and studies read it: `read_metrics`);
`write_json` writes the JSON files that mark a run or a study done. `StepProfile` traces
a few train steps with jax.profiler into the TensorBoard folder (config.profile_steps).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import socket
import sys
import time
from typing import Any, TextIO

import jax
import ml_collections
import numpy as np
from absl import logging

from cnn_jax import parallel


class Reporter:
    """Where a run's messages and metrics go, and which process writes them.

    `line` prints a console line; with a `workdir`, `epoch` appends a row to
    workdir/metrics.jsonl (and prints it), and `scalars` go to TensorBoard too where the
    tensorboard package is installed (it is not on the accelerator image). Files are the
    main process's alone; every process prints its console lines to its own log, so each
    shows it is alive. `tag` prefixes a variant's lines.
    """

    def __init__(self, workdir: str | pathlib.Path | None = None, tag: str = ''):
        self.main = parallel.is_main_process()
        self.tag = tag
        self.path = None if workdir is None else pathlib.Path(workdir) / 'metrics.jsonl'
        self._tb = None
        if self.main and workdir is not None:
            try:
                self._tb = ScalarEvents(pathlib.Path(workdir) / 'tensorboard')
            except ImportError:
                logging.info('tensorboard not installed: writing metrics.jsonl only')

    def line(self, text: str) -> None:
        """A console line (stdout)."""
        sys.stdout.write(text + '\n')
        sys.stdout.flush()

    def warn(self, text: str) -> None:
        self.line(f'WARNING: {text}')

    def resume(self, step: int) -> list[dict[str, Any]]:
        """The rows of the first `step` steps, read by the main process (which drops the
        rest from the file: a resumed run rewrites them) and given to every process."""
        rows = None
        if self.main:
            rows = [r for r in read_metrics(self.path.parent) if r['step'] <= step]
            self.path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
        return parallel.from_main(rows)

    def epoch(self, row: dict[str, Any]) -> None:
        """An epoch's row: metrics.jsonl, TensorBoard and a console line of its metrics."""
        if self.main:
            with self.path.open('a') as f:
                f.write(json.dumps(row) + '\n')
        numbers = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        self.scalars(row['step'], {k: v for k, v in numbers.items() if k not in ('epoch', 'step')})
        shown = [f'{n} {v:.4f}' for n, v in row.items() if n.endswith(('loss', 'accuracy'))]
        self.line(f'epoch {row["epoch"]}{self.tag}: ' + '  '.join(shown))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._tb is not None:
            self._tb.write_scalars(step, values)
            self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class ScalarEvents:
    """TensorBoard scalars in an event file of `folder`, as the tensorboard package's own
    record writer frames them. CLU's SummaryWriter, and tensorboard's EventFileWriter (for
    its file API), would import TensorFlow: 3-5 s of CPU at every run's start, for a few
    scalars an epoch."""

    def __init__(self, folder: pathlib.Path):
        from tensorboard.compat.proto import event_pb2, summary_pb2
        from tensorboard.summary.writer.record_writer import RecordWriter

        self._event, self._summary = event_pb2.Event, summary_pb2.Summary
        folder.mkdir(parents=True, exist_ok=True)
        name = f'events.out.tfevents.{time.time():.0f}.{socket.gethostname()}.{os.getpid()}'
        self._writer = RecordWriter((folder / name).open('ab'))
        self._write(self._event(wall_time=time.time(), file_version='brain.Event:2'))

    def _write(self, event: Any) -> None:
        self._writer.write(event.SerializeToString())

    def write_scalars(self, step: int, values: dict[str, float]) -> None:
        value = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()]
        summary = self._summary(value=value)
        self._write(self._event(wall_time=time.time(), step=int(step), summary=summary))

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class StepProfile:
    """A jax.profiler trace of `steps` train steps after warm-up (the first step, compiled
    and run) into workdir/tensorboard, where TensorBoard's profile plugin finds it
    (plugins/profile/<time>/*.xplane.pb); process 0 only; 0 steps: off. Call `step` after
    each train step and `stop` at the epoch's end, which also ends a trace cut short."""

    def __init__(self, workdir: str | pathlib.Path, steps: int):
        self.folder = pathlib.Path(workdir) / 'tensorboard'
        self.left = steps if parallel.is_main_process() else 0
        self.tracing = False

    def step(self, state: Any) -> None:
        if self.tracing:
            self.left -= 1
            if self.left == 0:
                self.stop(state)
        elif self.left > 0:  # Warm-up done: the program is compiled and has run once.
            jax.block_until_ready(state)
            jax.profiler.start_trace(str(self.folder))
            self.tracing = True

    def stop(self, state: Any) -> None:
        if self.tracing:
            jax.block_until_ready(state)  # The traced steps' work, not only their dispatch.
            jax.profiler.stop_trace()
            self.tracing, self.left = False, 0


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The evaluations' records of metrics.jsonl sorted by epoch (the last record of an epoch
    value wins; 0.5, 1.0 ... with config.evals_per_epoch = 2).

    Unreadable lines (a run killed mid-write) are skipped.
    """
    by_epoch: dict[float, dict] = {}
    try:
        lines = (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and 'epoch' in record:
            by_epoch[float(record['epoch'])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict | ml_collections.ConfigDict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic | np.ndarray):
        return _jsonable(x.tolist())
    return x if isinstance(x, str | int | float | bool | type(None)) else repr(x)


def write_json(path: pathlib.Path, obj: Any) -> None:
    """Writes `obj` as indented JSON, atomically (a reader sees the old file or the new).

    NaN and infinity become null; what JSON cannot hold becomes its repr.
    """
    tmp = path.with_suffix('.json.tmp')
    tmp.write_text(json.dumps(_jsonable(obj), indent=2) + '\n')
    tmp.replace(path)


def read_json(path: str | pathlib.Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (half-written)."""
    try:
        return json.loads(pathlib.Path(path).read_text())
    except (OSError, ValueError):
        return None


def read_summary(path: str | pathlib.Path) -> dict | None:
    """The run's summary.json if it exists and has a status (the run finished), else None."""
    summary = read_json(pathlib.Path(path) / 'summary.json')
    return summary if isinstance(summary, dict) and summary.get('status') else None


def format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds))) if math.isfinite(seconds) else '?'


class Progress:
    """A one-line progress display: epoch, bar, steps/s, ETA and the running loss.

    On a terminal the line is redrawn in place; otherwise (logs, CI) it prints one line
    per update, so a long run still shows it is alive.
    """

    def __init__(self, total_steps: int, stream: TextIO | None = None):
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self.enabled = parallel.is_main_process()
        self.interactive = hasattr(self.stream, 'isatty') and self.stream.isatty()
        self._t0: float | None = None
        self._step0 = 0

    def start(self, step: int) -> None:
        """Timing starts after the first (compiling) step, so the rate is the steady one."""
        self._t0, self._step0 = time.perf_counter(), step

    def rate(self, step: int) -> float:
        if self._t0 is None or step <= self._step0:
            return float('nan')
        return (step - self._step0) / (time.perf_counter() - self._t0)

    def update(self, step: int, epoch: int, num_epochs: int, **values: float) -> None:
        if not self.enabled:
            return
        rate = self.rate(step)
        eta = (self.total_steps - step) / rate if rate == rate and rate > 0 else float('nan')
        width = 20
        done = int(width * step / max(1, self.total_steps))
        text = ' '.join(f'{k} {v:.4f}' for k, v in values.items())
        line = (
            f'epoch {epoch}/{num_epochs} [{"#" * done}{"." * (width - done)}] '
            f'step {step}/{self.total_steps}  {rate:.1f} steps/s  '
            f'ETA {format_duration(eta)}  {text}'
        )
        self.stream.write('\r' + line.ljust(100) if self.interactive else line + '\n')
        self.stream.flush()

    def end_line(self) -> None:
        if self.enabled and self.interactive:
            self.stream.write('\n')
            self.stream.flush()

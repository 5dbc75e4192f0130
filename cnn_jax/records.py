"""What a run writes while it trains: metrics.jsonl, TensorBoard events, a progress line.

metrics.jsonl has one JSON object per epoch (plots and studies read it: `read_metrics`);
`write_json` writes the JSON files that mark a run or a study done. TensorBoard
events come from CLU's metric writers when CLU is installed (it is not on the
accelerator image; the JSONL file is always written).
"""

from __future__ import annotations

import datetime
import json
import math
import pathlib
import sys
import time
from typing import Any, TextIO

import ml_collections
import numpy as np
from absl import logging


class MetricsLog:
    """Appends epoch rows to workdir/metrics.jsonl and scalars to TensorBoard."""

    def __init__(self, workdir: str | pathlib.Path, enabled: bool = True):
        self.path = pathlib.Path(workdir) / 'metrics.jsonl'
        self.enabled = enabled
        self._tb = None
        if enabled:
            try:
                from clu import metric_writers

                self._tb = metric_writers.SummaryWriter(str(pathlib.Path(workdir) / 'tensorboard'))
            except ImportError:
                logging.info('clu/tensorboard not installed: writing metrics.jsonl only')

    def truncate(self, epochs: int) -> list[dict[str, Any]]:
        """Keeps the rows of the first `epochs` epochs (a resumed run rewrites the rest)."""
        rows = [r for r in read_metrics(self.path.parent) if r['epoch'] <= epochs]
        if self.enabled:
            self.path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
        return rows

    def write_epoch(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open('a') as f:
            f.write(json.dumps(row) + '\n')
        if self._tb is not None:
            scalars = {
                k: v
                for k, v in row.items()
                if isinstance(v, (int, float)) and k not in ('epoch', 'step')
            }
            self._tb.write_scalars(row['step'], scalars)
            self._tb.flush()

    def write_step(self, step: int, scalars: dict[str, float]) -> None:
        if self.enabled and self._tb is not None:
            self._tb.write_scalars(step, scalars)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """Per-epoch records of metrics.jsonl sorted by epoch (last record of an epoch wins).

    Unreadable lines (a run killed mid-write) are skipped.
    """
    by_epoch: dict[int, dict] = {}
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
            by_epoch[int(record['epoch'])] = record
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
    if not math.isfinite(seconds):
        return '?'
    return str(datetime.timedelta(seconds=int(seconds)))


class Progress:
    """A one-line progress display: epoch, bar, steps/s, ETA and the running loss.

    On a terminal the line is redrawn in place; otherwise (logs, CI) it prints one line
    per update, so a long run still shows it is alive.
    """

    def __init__(self, total_steps: int, stream: TextIO | None = None, enabled: bool = True):
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self.enabled = enabled
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
        if self.interactive:
            self.stream.write('\r' + line.ljust(100))
        else:
            self.stream.write(line + '\n')
        self.stream.flush()

    def end_line(self) -> None:
        if self.enabled and self.interactive:
            self.stream.write('\n')
            self.stream.flush()

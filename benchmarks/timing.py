"""Timed windows of step runners, interleaved so that machine load hits every runner alike."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

Runner = Callable[[int], None]  # Runs n steps and waits for them to finish.


def time_window(run: Runner, steps: int) -> float:
    """Seconds for `steps` steps, synchronised at the end by the runner."""
    t0 = time.perf_counter()
    run(steps)
    return time.perf_counter() - t0


def interleaved(
    runners: dict[str, Runner],
    steps: int,
    windows: int,
    warmup: int,
    settle_s: float,
    window_s: float = 0.0,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Seconds per window of every runner, the runners taking turns window by window.

    Each runner gets at least `steps` steps per window, more if needed to fill `window_s`
    seconds (judged from its last warm-up step): windows of a few milliseconds measure the
    scheduler more than the step. Returns the times and each runner's steps per window.
    """
    per_window = {}
    for name, run in runners.items():
        if warmup > 1:
            run(warmup - 1)
        one = time_window(run, 1)
        per_window[name] = max(steps, math.ceil(window_s / one)) if one > 0 else steps
        time.sleep(settle_s)
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(windows):
        for name, run in runners.items():
            times[name].append(time_window(run, per_window[name]))
            time.sleep(settle_s)
    return times, per_window


def median(xs: Sequence[float | None]) -> float | None:
    """The median of the finite values of `xs`, or None when there are none."""
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return statistics.median(xs) if xs else None


def log(message: str) -> None:
    """Progress, flushed at once (a benchmark runs for minutes)."""
    print(message, flush=True)


def rounded(x: float | None, digits: int = 2) -> float | None:
    """round(x, digits), None staying None."""
    return None if x is None else round(x, digits)


def significant(x: float | None, digits: int = 4) -> float | None:
    """`x` to `digits` significant digits (tiny FLOP counts must not round to 0)."""
    return None if x is None else float(f'{x:.{digits}g}')

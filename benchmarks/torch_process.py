"""torch's eager train step in a process of its own, driven window by window from the benchmark.

`python -m benchmarks --torch eager-process` times torch this way. Its windows still take
turns with cnn_jax's (`timing.interleaved`), so load on a shared machine hits both sides
alike, but the two runtimes no longer share a process. They can interfere when they do:
with oneDNN's OpenMP build (`onednn-cpu-gomp`) running cnn_jax's convolutions, torch's
SimpleNN step ran at 4,600-7,000 img/s beside it and 12,300-12,400 in its own process,
in the same session (results/benchmark/torch_gap_cpu.md).
"""

from __future__ import annotations

import multiprocessing
import weakref
from multiprocessing.connection import Connection

from benchmarks.cases import Case
from benchmarks.timing import Runner


def _serve(case: Case, dtype: str, conn: Connection) -> None:
    """The child: builds the runner, then runs the steps each message asks for."""
    from benchmarks import train_step
    from cnn_jax.xla_cpu import keep_freed_memory

    keep_freed_memory()  # As the benchmark's own process has it.
    runners, info = train_step.torch_runners(case, dtype, compile_model=False)
    conn.send(info)
    run = runners['torch_eager']
    while (steps := conn.recv()) is not None:
        run(steps)
        conn.send('done')


def eager_runner(case: Case, dtype: str = 'float32') -> tuple[Runner, dict]:
    """A runner of torch's eager step on `case` in a spawned process, ended with the runner,
    and `train_step.torch_runners`' info from there."""
    context = multiprocessing.get_context('spawn')  # No copy of this process's threads.
    conn, child_conn = context.Pipe()
    process = context.Process(target=_serve, args=(case, dtype, child_conn), daemon=True)
    process.start()
    child_conn.close()
    info = conn.recv()

    def run(steps: int) -> None:
        conn.send(steps)
        conn.recv()

    def stop() -> None:
        conn.send(None)
        process.join(timeout=30)

    weakref.finalize(run, stop)
    return run, info

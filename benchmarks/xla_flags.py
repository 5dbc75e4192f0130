"""XLA_FLAGS variants timed against each other, each in a fresh process.

XLA reads its flags once per process, so variants cannot share one; each run is
`python -m benchmarks` with torch eager alongside, whose jax/torch ratio normalises away
the machine's load at the time it ran.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

from benchmarks.cases import device_info
from benchmarks.timing import log

# XLA CPU options tried by --compare-xla-flags (each in its own process).
FLAG_VARIANTS = (
    '',
    '--xla_cpu_experimental_ynn_fusion_type=',
    '--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_enable_fast_math=true',
    '--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_multi_thread_eigen=false',
    '--xla_cpu_use_onednn=true',
)


def compare_xla_flags(
    models: Sequence[str],
    variants: Sequence[str],
    *,
    steps: int,
    windows: int,
    repeats: int = 2,
    log: Callable[[str], None] = log,
) -> dict[str, Any]:
    """Each XLA_FLAGS variant in a fresh process (A, B, ..., A, B, ...), torch eager alongside.

    XLA reads its flags once per process, so variants cannot share one. The jax/torch ratio
    of each process normalises away the machine's load at the time it ran.
    """
    runs = []
    for rep in range(repeats):
        for flags in variants:
            with tempfile.TemporaryDirectory() as tmp:
                out = pathlib.Path(tmp) / 'b.json'
                cmd = [
                    sys.executable,
                    '-m',
                    'benchmarks',
                    '--models',
                    ','.join(models),
                    '--steps',
                    str(steps),
                    '--windows',
                    str(windows),
                    '--torch',
                    'eager',
                    '--json',
                    str(out),
                    '--markdown',
                    '',
                    f'--xla-flags={flags}',  # '=': the value starts with '--'.
                ]
                env = {**os.environ, 'XLA_FLAGS': ''}
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    log(f'xla flags {flags!r}: failed\n{proc.stderr[-2000:]}')
                    continue
                rows = json.loads(out.read_text())['results']
            for r in rows:
                runs.append(
                    {
                        'flags': flags,
                        'repeat': rep,
                        'model': r['model'],
                        'jax_synthetic_ips': r['jax_synthetic_ips'],
                        'jax_pipeline_ips': r['jax_pipeline_ips'],
                        'torch_eager_ips': r['torch_eager_ips'],
                        'ratio_vs_torch_eager': r['ratio_vs_torch_eager'],
                        'compile_s': r['compile_s'],
                    }
                )
                log(
                    f'{flags or "(none)"!s:60} {r["model"]:10} jax {r["jax_pipeline_ips"]} '
                    f'img/s, torch {r["torch_eager_ips"]}, ratio {r["ratio_vs_torch_eager"]}, '
                    f'compile {r["compile_s"]} s'
                )
    return {'device': device_info(), 'variants': list(variants), 'runs': runs}

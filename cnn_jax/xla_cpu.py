"""XLA options for training on CPU, set before JAX starts its backends, and the C heap's.

XLA reads XLA_FLAGS once, when its first backend starts, and aborts the process on a flag
its build does not know; so a flag is added only when this jaxlib names it, and never over
a setting the user already made in XLA_FLAGS. GPU and TPU backends ignore CPU flags.
`keep_freed_memory` tunes glibc's malloc for XLA:CPU's per-step buffers.
"""

from __future__ import annotations

import ctypes
import importlib.util
import mmap
import os
import pathlib
from collections.abc import Sequence

# Kept because the numbers justify them. Evidence: 2 shared AMD EPYC (Zen 3) cores,
# jax 0.10.2, `python -m benchmarks --compare-xla-flags` (each variant in its own
# process, A/B/A/B, ratios to torch eager in the same process); results/benchmark/.
# - '--xla_cpu_experimental_ynn_fusion_type=' (empty list: no YNNPACK fusions, so XLA's own
#   emitters and Eigen run convolutions, dots and reductions): ResNet-20 batch 128 train step
#   56 -> 149 and 67 -> 92 img/s in back-to-back runs, SimpleNN batch 64 1,670 -> 2,580
#   and 2,368 -> 3,057 img/s; compile 8 s -> 5 s. The YNNPACK weight-gradient convolution
#   was the cost: ResNet-20's 16->16 channel 3x3 conv at batch 128, forward + dW,
#   207 ms -> 63 ms.
RECOMMENDED_CPU_XLA_FLAGS: tuple[str, ...] = ('--xla_cpu_experimental_ynn_fusion_type=',)


def _flag_name(flag: str) -> str:
    return flag.split('=', 1)[0]


def jaxlib_knows(flag: str) -> bool:
    """Whether the installed jaxlib's XLA library contains the flag's name."""
    spec = importlib.util.find_spec('jaxlib')
    if spec is None or spec.origin is None:
        return False
    needle = _flag_name(flag).lstrip('-').encode()
    for lib in pathlib.Path(spec.origin).parent.glob('*.so'):
        if lib.stat().st_size == 0:
            continue
        with open(lib, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            if m.find(needle) >= 0:
                return True
    return False


def backends_started() -> bool:
    """True once JAX has started a backend (XLA_FLAGS set later would be ignored).

    JAX has no public query for this; its documented rule for `jax_num_cpu_devices`
    ("must be set before JAX is initialized": jax.config.update raises RuntimeError
    afterwards) answers it. The probe sets another value and puts the old one back.
    """
    import jax  # Here, not above: launch.py imports this module before it loads JAX.

    current = jax.config.jax_num_cpu_devices
    try:
        jax.config.update('jax_num_cpu_devices', 2 if current == 1 else 1)
    except RuntimeError:
        return True
    jax.config.update('jax_num_cpu_devices', current)
    return False


def apply_xla_flags(flags: Sequence[str]) -> bool:
    """Appends `flags` to XLA_FLAGS, except those whose name XLA_FLAGS already sets.

    Returns False, changing nothing, when JAX's backends have already started.
    """
    if backends_started():
        return False
    current = os.environ.get('XLA_FLAGS', '')
    names = {_flag_name(f) for f in current.split()}
    extra = [f for f in flags if _flag_name(f) not in names]
    if extra:
        os.environ['XLA_FLAGS'] = ' '.join([current, *extra]).strip()
    return True


def use_recommended_flags() -> list[str]:
    """Adds the RECOMMENDED_CPU_XLA_FLAGS this jaxlib knows; returns those it added."""
    names = set(map(_flag_name, os.environ.get('XLA_FLAGS', '').split()))
    wanted = [f for f in RECOMMENDED_CPU_XLA_FLAGS if _flag_name(f) not in names]
    known = [f for f in wanted if jaxlib_knows(f)]
    return known if known and apply_xla_flags(known) else []


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8


def keep_freed_memory() -> bool:
    """Has glibc serve large blocks from its heap and keep freed memory there, for reuse.

    XLA:CPU allocates a program's buffers at every execution. By default glibc maps a
    large block afresh (above its mmap threshold, 128 KB rising to at most 32 MB) and
    gives freed memory back to the kernel (unmapped, or trimmed off the heap's top), so
    every step faults once per 4 KB page it writes, and the kernel zeroes each page, before
    the first useful store. Three BatchNorm + ReLU layers forward and backward at batch
    128 x 32 x 32 x 16, 30 calls: 1.04 million page faults and 40 ms a call by default,
    0.12 million and 20 ms kept (results/benchmark/memory_batchnorm_cpu.md). The cost: the process
    holds on to its peak memory. Call it before JAX loads; after, it removed half of
    those faults. Returns whether it changed anything: not with CNN_JAX_MALLOC=0, nor
    where a MALLOC_* or glibc.malloc tunable is set (the user's own), nor without glibc.
    """
    users_own = any(n.startswith('MALLOC_') for n in os.environ)
    if users_own or 'glibc.malloc' in os.environ.get('GLIBC_TUNABLES', ''):
        return False
    if os.environ.get('CNN_JAX_MALLOC') == '0':
        return False
    try:
        libc = ctypes.CDLL(None)
    except (OSError, TypeError):  # Windows has no process-wide C library handle.
        return False
    if not hasattr(libc, 'gnu_get_libc_version'):  # macOS, musl: not glibc's malloc.
        return False
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))
    return all([libc.mallopt(param, value) for param, value in settings])

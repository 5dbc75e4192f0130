"""oneDNN's convolution on XLA:CPU, through JAX's FFI: optional, CPU and float32 only.

XLA:CPU runs convolutions and their gradients through Eigen; PyTorch runs them through
oneDNN. With ResNet-20's convolutions at batch 128, oneDNN takes 0.4-0.6 of Eigen's CPU
time for forward plus both gradients (results/benchmark/onednn_cpu.md). When the
`onednn` and `onednn-devel` wheels are installed (`pip install -r requirements-onednn.txt`)
and a C++ compiler is on PATH, `onednn_conv.cc` is compiled once into cnn_jax's cache
folder (`~/.cache/cnn_jax`), and `layers.FastConv` sends float32 convolutions of one-device
CPU runs here. The OpenMP build (`onednn-cpu-gomp` with `onednn-devel-cpu-gomp`) works
too (results/benchmark/torch_gap_cpu.md compares the two). Without them, or with
CNN_JAX_ONEDNN=0 in the environment, nothing changes. The results equal lax's up to
float32 rounding (tests/test_cpu_paths.py).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.data.sources import default_cache_dir

_SOURCE = pathlib.Path(__file__).with_suffix('.cc')
_TARGETS = {
    'forward': 'CnnJaxOnednnConv',
    'input_grad': 'CnnJaxOnednnConvInputGrad',
    'weight_grad': 'CnnJaxOnednnConvWeightGrad',
}


def wheel_prefix() -> pathlib.Path | None:
    """The environment prefix holding the oneDNN wheels' headers and library, if any."""
    prefix = pathlib.Path(sys.prefix)
    header = prefix / 'include' / 'oneapi' / 'dnnl' / 'dnnl.hpp'
    return prefix if header.exists() and any((prefix / 'lib').glob('libdnnl.so*')) else None


def _build(prefix: pathlib.Path) -> pathlib.Path:
    """The compiled shim, built on first use; keyed by its source, JAX's and oneDNN's
    (the headers name oneDNN's version and threading runtime)."""
    headers = prefix / 'include' / 'oneapi' / 'dnnl'
    parts = (
        _SOURCE.read_bytes(),
        jax.__version__.encode(),
        str(prefix).encode(),
        (headers / 'dnnl_version.h').read_bytes(),
        (headers / 'dnnl_config.h').read_bytes(),
    )
    digest = hashlib.sha256(b'\0'.join(parts)).hexdigest()[:16]
    target = default_cache_dir() / f'onednn_conv-{digest}.so'
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = pathlib.Path(tmp) / target.name
        lib = prefix / 'lib'
        cmd = [shutil.which('c++') or 'g++', '-O2', '-std=c++17', '-shared', '-fPIC', '-w',
               f'-I{jax.ffi.include_dir()}', f'-I{prefix / "include"}', str(_SOURCE),
               '-o', str(built), f'-L{lib}', '-ldnnl',
               # RPATH, not RUNPATH: libdnnl's own dependencies are found beside it too.
               f'-Wl,--disable-new-dtags,-rpath,{lib}']  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(built, target)  # Atomic: concurrent processes may build it too.
    return target


@functools.cache
def available() -> bool:
    """Whether the oneDNN convolution is built, loaded and registered with XLA:CPU."""
    prefix = wheel_prefix()
    if os.environ.get('CNN_JAX_ONEDNN') == '0' or prefix is None:
        return False
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build(prefix)))
    except (OSError, subprocess.CalledProcessError) as e:
        detail = (getattr(e, 'stderr', '') or str(e)).strip().splitlines() or ['']
        logging.warning('oneDNN is installed but its convolution did not build (%s); '
                        'convolutions stay on XLA', detail[-1])  # fmt: skip
        return False
    # The `onednn` wheel's oneDNN runs on the CPU through SYCL's OpenCL device, which the
    # OpenCL loader finds only when told where the wheel put it.
    opencl = prefix / 'lib' / 'libintelocl.so'
    if opencl.exists():
        os.environ.setdefault('OCL_ICD_FILENAMES', str(opencl))
    for name in _TARGETS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform='cpu')
    return True


def onednn_conv_wins(platform: str, dtype: jnp.dtype) -> bool:
    """Whether FastConv sends a convolution here: float32 on a one-device CPU run, when
    available. With more devices XLA's own convolutions run: XLA cannot split a foreign
    call by the batch, so it would gather the whole batch onto every device and repeat
    the convolution there (no partitioning rule is written for it yet)."""
    one_device = jax.device_count() == 1
    return platform == 'cpu' and one_device and jnp.dtype(dtype) == jnp.float32 and available()


def _call(target: str, shape: tuple[int, ...], a, b, strides: tuple, pads: tuple) -> jax.Array:
    (pt, pb), (pl, pr) = pads
    window = dict(sh=strides[0], sw=strides[1], pt=pt, pb=pb, pl=pl, pr=pr)
    out = jax.ShapeDtypeStruct(shape, jnp.float32)
    # A sweep's vmapped variants run one after another, each a oneDNN call.
    call = jax.ffi.ffi_call(_TARGETS[target], out, vmap_method='sequential')
    return call(a, b, **{k: np.int64(v) for k, v in window.items()})


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def onednn_conv(x: jax.Array, w: jax.Array, strides: tuple, pads: tuple) -> jax.Array:
    """NHWC x HWIO float32 convolution without dilation or groups, pads >= 0, by oneDNN."""
    (h, wd), (kh, kw) = x.shape[1:3], w.shape[:2]
    oh = (h + sum(pads[0]) - kh) // strides[0] + 1
    ow = (wd + sum(pads[1]) - kw) // strides[1] + 1
    return _call('forward', (x.shape[0], oh, ow, w.shape[3]), x, w, strides, pads)


def _grads(strides: tuple, pads: tuple, res: tuple, g: jax.Array) -> tuple:
    x, w = res
    dx = _call('input_grad', x.shape, g, w, strides, pads)
    return dx, _call('weight_grad', w.shape, x, g, strides, pads)


onednn_conv.defvjp(lambda x, w, s, p: (onednn_conv(x, w, s, p), (x, w)), _grads)

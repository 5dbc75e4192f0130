"""torchvision ResNet weights <-> the Flax ResNets of cnn_jax.models.resnet.

The Flax ResNets name their modules after torchvision's (notes/CONTRACTS.md), so the
mapping is mechanical:

    conv1.weight                         params/conv1/kernel            OIHW -> HWIO
    bn1.weight, bn1.bias                 params/bn1/scale, bias
    bn1.running_mean, running_var        batch_stats/bn1/mean, var
    layer2.0.conv1.weight                params/layer2_0/conv1/kernel
    layer2.0.downsample.0.weight         params/layer2_0/downsample_conv/kernel
    layer2.0.downsample.1.*              params|batch_stats/layer2_0/downsample_bn/*
    fc.weight, fc.bias                   params/fc/kernel (transposed), bias

`*.num_batches_tracked` is ignored on import and written as 0 on export. Files: a
state_dict saved with torch.save (.pth/.pt, read with `weights_only=True`, needs torch),
.safetensors or .npz, all with torchvision's tensor names. Torch and safetensors are
imported lazily: models and training never need them.
"""

import os
import re
import zipfile
from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from cnn_jax.errors import ConfigError
from cnn_jax.records import Reporter

TORCH_EXTENSIONS = ('.pth', '.pt')
EXTENSIONS = (*TORCH_EXTENSIONS, '.safetensors', '.npz')
HEAD = 'fc'

# Top-level and block-level module names of the torchvision layout.
_MODULE_RE = re.compile(r'conv\d+|bn\d+|layer\d+_\d+|downsample_conv|downsample_bn|fc')
_BLOCK_RE = re.compile(r'layer(\d+)_(\d+)')
_MODULE_TO_TORCH = {'downsample_conv': 'downsample.0', 'downsample_bn': 'downsample.1'}
_LEAF_TO_TORCH = {
    ('params', 'kernel'): 'weight',
    ('params', 'scale'): 'weight',
    ('params', 'bias'): 'bias',
    ('batch_stats', 'mean'): 'running_mean',
    ('batch_stats', 'var'): 'running_var',
}
# torchvision architectures by (block type, blocks per stage), for error messages.
_KNOWN_ARCHS = {
    ('basic', (2, 2, 2, 2)): 'resnet18',
    ('basic', (3, 4, 6, 3)): 'resnet34',
    ('bottleneck', (3, 4, 6, 3)): 'resnet50',
    ('bottleneck', (3, 4, 23, 3)): 'resnet101',
    ('bottleneck', (3, 8, 36, 3)): 'resnet152',
}
_MAX_LISTED = 8


# --- Name and layout mapping ------------------------------------------------------------


def torch_name(collection: str, path: tuple[str, ...]) -> str:
    """The torchvision state_dict key of the Flax variable `collection`/`path`."""
    *modules, leaf = path
    if (collection, leaf) not in _LEAF_TO_TORCH or not modules:
        raise ConfigError(f'variable {collection}/{"/".join(path)} has no torchvision counterpart')
    parts = []
    for m in modules:
        if not _MODULE_RE.fullmatch(m):
            raise ConfigError(
                f'variable {collection}/{"/".join(path)} has no torchvision counterpart: '
                f'module {m!r} is not in the torchvision ResNet layout (conv1, bn1, '
                'layer{i}_{j}, downsample_conv, downsample_bn, fc)'
            )
        block = _BLOCK_RE.fullmatch(m)
        parts.append(f'layer{block[1]}.{block[2]}' if block else _MODULE_TO_TORCH.get(m, m))
    return '.'.join([*parts, _LEAF_TO_TORCH[collection, leaf]])


def _torch_axes(ndim: int) -> tuple[int, ...]:
    """Flax axes in torch's order: conv kernel HWIO -> OIHW, dense (in, out) -> (out, in)."""
    return {4: (3, 2, 0, 1), 2: (1, 0)}.get(ndim, tuple(range(ndim)))


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[i] for i in _torch_axes(len(shape)))


def _flat_variables(variables: Mapping[str, Any]) -> Iterator[tuple[str, tuple[str, ...], Any]]:
    """(collection, path, value) for every variable of 'params' and 'batch_stats'."""
    for collection in ('params', 'batch_stats'):
        for path, value in traverse_util.flatten_dict(variables.get(collection, {})).items():
            yield collection, path, value


_LEAF_ORDER = ('weight', 'bias', 'running_mean', 'running_var', 'num_batches_tracked')


def _module_order(name: str) -> tuple[tuple[int, int, int], ...]:
    """Sort key giving torchvision's state_dict order (jax trees sort dict keys by name)."""
    key = []
    for part in name.split('.'):
        if part.isdigit():
            key.append((0, int(part), 0))
        elif m := re.fullmatch(r'(conv|bn|layer)(\d+)', part):
            key.append(({'conv': 1, 'bn': 1, 'layer': 2}[m[1]], int(m[2]), m[1] == 'bn'))
        elif part in _LEAF_ORDER:
            key.append((5, _LEAF_ORDER.index(part), 0))
        else:  # downsample, then fc.
            key.append((3 if part == 'downsample' else 4, 0, 0))
    return tuple(key)


def to_torchvision_state_dict(variables: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The torchvision state_dict (NumPy arrays, torch layout) of Flax ResNet `variables`."""
    out: dict[str, np.ndarray] = {}
    for collection, path, value in _flat_variables(variables):
        name = torch_name(collection, path)
        value = np.asarray(value)
        out[name] = np.ascontiguousarray(np.transpose(value, _torch_axes(value.ndim)))
        if name.endswith('.running_var'):  # torch's BN also saves its step counter.
            out[name[: -len('running_var')] + 'num_batches_tracked'] = np.array(0, np.int64)
    return {k: out[k] for k in sorted(out, key=_module_order)}


# --- Files ------------------------------------------------------------------------------


def _extension(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in EXTENSIONS:
        raise ConfigError(
            f'cannot tell the format of weights file {path}: extension {ext or "(none)"!r} '
            f'is not one of {", ".join(EXTENSIONS)}'
        )
    return ext


def _unwrap_checkpoint(obj: Any, path: str) -> Mapping[str, Any]:
    """The state_dict inside a torch.load result (plain, or under 'state_dict'/'model')."""
    if not isinstance(obj, Mapping):
        raise ConfigError(
            f'weights file {path} holds a {type(obj).__name__}, not a state_dict; save '
            'model.state_dict() rather than the model'
        )
    for key in ('state_dict', 'model_state_dict', 'model'):
        if key in obj and isinstance(obj[key], Mapping):
            return obj[key]
    return obj


def _read_torch(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ConfigError(
            f'reading {path} needs PyTorch (pip install torch); without it, convert the '
            'state_dict to .safetensors or .npz with the same tensor names'
        ) from None
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files.
        raise ConfigError(f'cannot read weights file {path} as a PyTorch state_dict: {e}') from None
    out = {}
    for k, v in _unwrap_checkpoint(obj, path).items():
        if not isinstance(v, torch.Tensor):
            raise ConfigError(
                f'weights file {path}: entry {k!r} is a {type(v).__name__}, not a tensor'
            )
        v = v.detach().cpu()
        if v.dtype in (torch.bfloat16, torch.float16):
            v = v.float()
        out[k] = v.numpy()
    return out


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        from safetensors.numpy import load_file
    except ImportError:
        raise ConfigError(f'reading {path} needs safetensors (pip install safetensors)') from None
    try:
        return dict(load_file(path))
    except Exception as e:  # safetensors raises its own SafetensorError and others.
        raise ConfigError(f'cannot read weights file {path} as safetensors: {e}') from None


def _read_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ConfigError(f'cannot read weights file {path} as .npz: {e}') from None


def check_exists(path: str, arch: str = 'resnet50') -> None:
    """Raises ConfigError explaining where torchvision weights come from if `path` is absent."""
    if os.path.isfile(os.path.expanduser(path)):
        return
    msg = (
        f'weights file {path} (config.pretrained) does not exist. Give a torchvision '
        f'state_dict of {arch} (.pth/.pt, .safetensors or .npz) with --config.pretrained=PATH'
    )
    if arch in _KNOWN_ARCHS.values():
        msg += (
            f'; with internet, python -c "import torchvision; torchvision.models.{arch}('
            "weights='IMAGENET1K_V1')\" saves it to ~/.cache/torch/hub/checkpoints/"
        )
    raise ConfigError(msg)


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a torchvision weights file (.pth/.pt, .safetensors or .npz).

    A uniform 'module.' prefix (nn.DataParallel) is removed; num_batches_tracked kept.
    """
    path = os.path.expanduser(path)
    ext = _extension(path)
    check_exists(path)
    state = {'.safetensors': _read_safetensors, '.npz': _read_npz}.get(ext, _read_torch)(path)
    if not state:
        raise ConfigError(f'weights file {path} holds no tensors')
    if all(k.startswith('module.') for k in state):
        state = {k[len('module.') :]: v for k, v in state.items()}
    for k, v in state.items():
        if not isinstance(v, np.ndarray) or v.dtype == object:
            raise ConfigError(f'weights file {path}: entry {k!r} is not a numeric tensor')
    return state


def write_state_dict(state: Mapping[str, np.ndarray], path: str) -> None:
    """Writes tensors to .pth/.pt (needs torch), .safetensors or .npz by extension."""
    path = os.path.expanduser(path)
    ext = _extension(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    arrays = {k: np.ascontiguousarray(v) for k, v in state.items()}
    if ext in TORCH_EXTENSIONS:
        try:
            import torch
        except ImportError:
            raise ConfigError(
                f'writing {path} needs PyTorch; write .safetensors or .npz instead'
            ) from None
        torch.save({k: torch.from_numpy(v) for k, v in arrays.items()}, path)
    elif ext == '.safetensors':
        from safetensors.numpy import save_file

        save_file(arrays, path)
    else:
        np.savez(path, **arrays)


# --- Import and export ------------------------------------------------------------------


def _describe_arch(names: list[str]) -> str | None:
    """'resnet50 (bottleneck blocks 3-4-6-3)' from torchvision keys, if they look ResNet."""
    blocks: dict[int, set[int]] = {}
    for n in names:
        m = re.match(r'layer(\d+)\.(\d+)\.', n)
        if m:
            blocks.setdefault(int(m[1]), set()).add(int(m[2]))
    if not blocks:
        return None
    kind = 'bottleneck' if any('.conv3.' in n for n in names) else 'basic'
    sizes = tuple(len(blocks[i]) for i in sorted(blocks))
    desc = f'{kind} blocks {"-".join(map(str, sizes))}'
    arch = _KNOWN_ARCHS.get((kind, sizes))
    return f'{arch} ({desc})' if arch else desc


def _listing(items: list[str]) -> str:
    shown = ', '.join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f' and {more} more' if more > 0 else '')


def load_torchvision(path: str, variables: Mapping[str, Any], *, arch: str) -> dict:
    """`variables` of a Flax ResNet with the tensors of torchvision weights file `path`.

    Returns {'params': ..., 'batch_stats': ...} (other collections of `variables` are
    kept). When only the class count of `fc` differs, the head of `variables` is kept
    (a fresh classifier) and that is printed. `variables` may be abstract (jax.eval_shape
    of the init): what comes from the file is concrete, a kept head stays abstract. Any
    other missing, extra or mis-shaped tensor raises ConfigError naming the tensors, the
    file and `arch`.
    """
    path = os.path.expanduser(path)
    check_exists(path, arch)
    state = {
        k: v for k, v in read_state_dict(path).items() if not k.endswith('.num_batches_tracked')
    }
    named = {torch_name(c, p): (c, p, value) for c, p, value in _flat_variables(variables)}
    expected = {k: named[k] for k in sorted(named, key=_module_order)}
    missing = [k for k in expected if k not in state]
    extra = sorted((k for k in state if k not in expected), key=_module_order)
    wrong = [
        k
        for k, (_, _, v) in expected.items()
        if k in state and tuple(state[k].shape) != _torch_shape(v.shape)
    ]

    keep_head = False
    head_keys = [k for k in expected if k.startswith(HEAD + '.')]
    if wrong and 'fc.weight' in wrong and set(wrong) <= set(head_keys):
        ours = _torch_shape(expected['fc.weight'][2].shape)
        theirs = tuple(state['fc.weight'].shape)
        bias_ok = 'fc.bias' not in expected or tuple(state['fc.bias'].shape) == theirs[:1]
        if len(theirs) == 2 and theirs[1] == ours[1] and bias_ok:
            keep_head = True
            wrong = []
            Reporter().line(
                f'Replacing the classifier head: {path} has {theirs[0]} classes, the model '
                f'{ours[0]}; fc is freshly initialised.'
            )

    if missing or extra or wrong:
        problems = []
        if missing:
            problems.append(f'missing tensors: {_listing(missing)}')
        if extra:
            problems.append(f'unexpected tensors: {_listing(extra)}')
        if wrong:
            shapes = [
                f'{k} {tuple(state[k].shape)} (model expects {_torch_shape(expected[k][2].shape)})'
                for k in wrong
            ]
            problems.append(f'wrong shapes: {_listing(shapes)}')
        msg = f'weights file {path} does not fit model {arch}: ' + '; '.join(problems)
        theirs, ours = _describe_arch(list(state)), _describe_arch(list(expected))
        if theirs and ours and theirs != ours:
            msg += f'. The file looks like {theirs}, the model is {ours}'
        raise ConfigError(msg)

    flat: dict[str, dict[tuple[str, ...], Any]] = {'params': {}, 'batch_stats': {}}
    for name, (collection, p, value) in expected.items():
        if keep_head and name in head_keys:
            flat[collection][p] = value
        else:
            array = np.transpose(state[name], np.argsort(_torch_axes(value.ndim)))
            flat[collection][p] = jnp.asarray(array.astype(value.dtype))
    out = {**variables, 'params': traverse_util.unflatten_dict(flat['params'])}
    if 'batch_stats' in variables or flat['batch_stats']:
        out['batch_stats'] = traverse_util.unflatten_dict(flat['batch_stats'])
    n = sum(1 for k in expected if not (keep_head and k in head_keys))
    Reporter().line(f'Loaded {n} tensors of {arch} from {path}.')
    return out


def export_torchvision(variables: Mapping[str, Any], path: str) -> dict[str, np.ndarray]:
    """Writes Flax ResNet `variables` as a torchvision state_dict; returns the tensors.

    The format follows the extension: .pth/.pt (torch.save, needs torch), .safetensors
    or .npz. A .pth file loads into torchvision with `model.load_state_dict(torch.load(f))`.
    """
    state = to_torchvision_state_dict(variables)
    write_state_dict(state, path)
    return state

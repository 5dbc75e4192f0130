"""An independent reference of torchvision's ResNets in NCHW/OIHW, for the import tests.

Written from torchvision's definition (torchvision/models/resnet.py), not from
cnn_jax's model: it works on a torchvision state_dict directly. Two backends: torch
(when installed), benchmarks.torch_models.ResNet, the benchmark's twin, which loads the
state_dict under torchvision's names; and NumPy in float64 (always), written here.
`random_state_dict` draws random weights and BN running statistics with torchvision's
tensor names and shapes.
"""

import numpy as np

# arch -> (block, blocks per stage), as torchvision.models.resnet{18,34,50}.
ARCHS = {
    'resnet18': ('basic', (2, 2, 2, 2)),
    'resnet34': ('basic', (3, 4, 6, 3)),
    'resnet50': ('bottleneck', (3, 4, 6, 3)),
}
EXPANSION = {'basic': 1, 'bottleneck': 4}
BN_EPS = 1e-5


def _blocks(arch: str):
    """(prefix, block kind, in channels, width, stride, has downsample) for every block."""
    kind, sizes = ARCHS[arch]
    inplanes = 64
    for i, n in enumerate(sizes):
        planes = 64 * 2**i
        for j in range(n):
            stride = 2 if i > 0 and j == 0 else 1
            out = planes * EXPANSION[kind]
            yield (
                f'layer{i + 1}.{j}',
                kind,
                inplanes,
                planes,
                stride,
                (stride != 1 or inplanes != out),
            )
            inplanes = out


def _convs(kind: str, inplanes: int, planes: int):
    """(name, out, in, kernel) of the convs of one block."""
    if kind == 'basic':
        return [('conv1', planes, inplanes, 3), ('conv2', planes, planes, 3)]
    return [
        ('conv1', planes, inplanes, 1),
        ('conv2', planes, planes, 3),
        ('conv3', planes * 4, planes, 1),
    ]


def random_state_dict(arch: str, num_classes: int = 1000, seed: int = 0) -> dict:
    """A torchvision-named state_dict of random float32 weights and BN statistics.

    Scales keep activations of order one through the network so that logits are O(1)
    and an absolute tolerance of 1e-4 is meaningful.
    """
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(name, o, i, k):
        sd[f'{name}.weight'] = rng.normal(0, np.sqrt(1.0 / (i * k * k)), (o, i, k, k))

    def bn(name, c, gain=1.0):
        sd[f'{name}.weight'] = gain * rng.uniform(0.5, 1.5, c)
        sd[f'{name}.bias'] = rng.normal(0, 0.1, c)
        sd[f'{name}.running_mean'] = rng.normal(0, 0.1, c)
        sd[f'{name}.running_var'] = rng.uniform(0.5, 1.5, c)
        sd[f'{name}.num_batches_tracked'] = np.array(int(rng.integers(1000)), np.int64)

    conv('conv1', 64, 3, 7)
    bn('bn1', 64)
    kind = ARCHS[arch][0]
    for prefix, kind, inplanes, planes, _, down in _blocks(arch):
        convs = _convs(kind, inplanes, planes)
        for n, (name, o, i, k) in enumerate(convs):
            conv(f'{prefix}.{name}', o, i, k)
            # The last BN of a block is small so the residual stream does not blow up.
            bn(f'{prefix}.bn{name[-1]}', o, 0.3 if n == len(convs) - 1 else 1.0)
        if down:
            out = planes * EXPANSION[kind]
            conv(f'{prefix}.downsample.0', out, inplanes, 1)
            bn(f'{prefix}.downsample.1', out)
    features = 512 * EXPANSION[kind]
    sd['fc.weight'] = rng.normal(0, np.sqrt(1.0 / features), (num_classes, features))
    sd['fc.bias'] = rng.normal(0, 0.1, num_classes)
    return {k: v if v.dtype == np.int64 else v.astype(np.float32) for k, v in sd.items()}


# --- Forward passes ------------------------------------------------------------------------


def _torch_forward(state_dict: dict, images_nchw: np.ndarray, arch: str) -> np.ndarray:
    import torch

    from benchmarks.torch_models import ResNet

    kind, sizes = ARCHS[arch]
    net = ResNet(kind, sizes, num_classes=state_dict['fc.weight'].shape[0])
    # strict: every tensor name and shape must be torchvision's.
    net.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()})
    with torch.no_grad():
        logits = net.eval()(torch.from_numpy(np.ascontiguousarray(images_nchw, np.float32)))
    return logits.numpy().astype(np.float64)


class _NumpyOps:
    """float64 NumPy ops; a conv is a sum over window offsets of strided tensordots."""

    def tensor(self, x):
        return np.asarray(x, np.float64)

    def conv(self, x, w, stride, padding):
        w = self.tensor(w)
        o, _, kh, kw = w.shape
        x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
        ho = (x.shape[2] - kh) // stride + 1
        wo = (x.shape[3] - kw) // stride + 1
        out = np.zeros((x.shape[0], ho, wo, o))
        for di in range(kh):
            for dj in range(kw):
                patch = x[:, :, di : di + stride * ho : stride, dj : dj + stride * wo : stride]
                out += np.tensordot(patch, w[:, :, di, dj], axes=([1], [1]))
        return out.transpose(0, 3, 1, 2)

    def bn(self, x, g, b, m, v):
        g, b, m, v = (self.tensor(a)[None, :, None, None] for a in (g, b, m, v))
        return (x - m) / np.sqrt(v + BN_EPS) * g + b

    def relu(self, x):
        return np.maximum(x, 0)

    def maxpool(self, x):
        x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
        ho, wo = (x.shape[2] - 3) // 2 + 1, (x.shape[3] - 3) // 2 + 1
        windows = [
            x[:, :, i : i + 2 * ho : 2, j : j + 2 * wo : 2] for i in range(3) for j in range(3)
        ]
        return np.max(windows, axis=0)

    def pool_fc(self, x, w, b):
        return x.mean(axis=(2, 3)) @ self.tensor(w).T + self.tensor(b)

    def numpy(self, x):
        return x


def forward(state_dict: dict, images_nchw: np.ndarray, arch: str, backend: str = 'auto'):
    """torchvision ResNet `arch` in eval mode: logits (N, classes) for NCHW float images.

    backend: 'torch', 'numpy', or 'auto' (torch when installed, else NumPy).
    """
    if backend == 'auto':
        try:
            import torch  # noqa: F401

            backend = 'torch'
        except ImportError:
            backend = 'numpy'
    if backend == 'torch':
        return _torch_forward(state_dict, images_nchw, arch)
    ops = _NumpyOps()
    sd = state_dict

    def bn(x, name):
        return ops.bn(
            x, *(sd[f'{name}.{k}'] for k in ('weight', 'bias', 'running_mean', 'running_var'))
        )

    x = ops.tensor(images_nchw)
    x = ops.relu(bn(ops.conv(x, sd['conv1.weight'], 2, 3), 'bn1'))
    x = ops.maxpool(x)
    for prefix, kind, inplanes, planes, stride, down in _blocks(arch):
        identity = x
        convs = _convs(kind, inplanes, planes)
        y = x
        for n, (name, _, _, k) in enumerate(convs):
            # torchvision: the stride sits on conv1 (BasicBlock) or conv2 (Bottleneck v1.5).
            s = stride if (kind == 'basic' and n == 0) or (kind != 'basic' and n == 1) else 1
            y = bn(ops.conv(y, sd[f'{prefix}.{name}.weight'], s, k // 2), f'{prefix}.bn{name[-1]}')
            if n < len(convs) - 1:
                y = ops.relu(y)
        if down:
            identity = bn(
                ops.conv(x, sd[f'{prefix}.downsample.0.weight'], stride, 0),
                f'{prefix}.downsample.1',
            )
        x = ops.relu(y + identity)
    return np.asarray(ops.numpy(ops.pool_fc(x, sd['fc.weight'], sd['fc.bias'])), np.float64)

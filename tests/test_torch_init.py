"""config.init='torch': conv and dense layers drawn as PyTorch's defaults draw them."""

import math

import jax
import numpy as np
import pytest

from cnn_jax import steps
from cnn_jax.models import create_model
from cnn_jax.models.torch_init import apply_init


def _layers(params, prefix=()):
    for name, value in params.items():
        if not isinstance(value, dict):
            continue
        if 'kernel' in value:
            yield (*prefix, name), value
        else:
            yield from _layers(value, (*prefix, name))


def test_every_conv_and_dense_is_uniform_within_one_over_root_fan_in():
    model = create_model('cifar_cnn6', 10)  # Convs, 1x1 convs, dense layers and BatchNorm.
    module = steps.init_variables(model, (32, 32, 3), jax.random.key(0))
    torch_like = steps.init_variables(model, (32, 32, 3), jax.random.key(0), 'torch')
    layers = dict(_layers(torch_like['params']))
    assert len(layers) == 10  # 6 convs + 4 dense.
    for path, layer in layers.items():
        kernel = np.asarray(layer['kernel'])
        bound = 1 / math.sqrt(math.prod(kernel.shape[:-1]))
        for name in ('kernel', 'bias'):
            values = np.asarray(layer[name])
            assert np.abs(values).max() <= bound, (path, name)
            if values.size >= 1000:  # U(-b, b): std b / sqrt(3), max near b.
                assert values.std() == pytest.approx(bound / math.sqrt(3), rel=0.05), path
                assert np.abs(values).max() > 0.95 * bound, path
    # BatchNorm starts at scale 1, bias 0 in both frameworks: left as the module made it.
    bn = [k for k in torch_like['params'] if 'BatchNorm' in k]
    assert bn
    for k in bn:
        np.testing.assert_array_equal(
            torch_like['params'][k]['scale'], module['params'][k]['scale']
        )
    assert apply_init(module, 'module', jax.random.key(1)) is module


def test_bound_is_torchs_own_for_conv_and_linear():
    torch = pytest.importorskip('torch')
    conv, linear = torch.nn.Conv2d(3, 32, 5), torch.nn.Linear(2048, 64)
    for layer, fan_in in ((conv, 75), (linear, 2048)):
        bound = 1 / math.sqrt(fan_in)
        for tensor in (layer.weight, layer.bias):
            values = tensor.detach().numpy()
            assert np.abs(values).max() <= bound and np.abs(values).max() > 0.9 * bound

"""torchvision weight import/export (cnn_jax.transfer.weights) and fine-tuning masks.

The import is checked numerically against tests/torch_reference.py, an independent
NCHW/OIHW torchvision ResNet (torch.nn.functional when installed, NumPy always).
"""

import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch_reference as ref
from flax import traverse_util

from cnn_jax import optim, steps
from cnn_jax.errors import ConfigError
from cnn_jax.models import create_model
from cnn_jax.transfer import weights
from configs import default

IMAGE = 64  # Even: a stride-2 conv with flax 'SAME' padding would differ from torch here.


def abstract_variables(model, size=IMAGE, channels=3):
    """The variables' structure (ShapeDtypeStructs) without running an init."""
    x = jnp.zeros((1, size, size, channels))
    return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))


def random_variables(model, seed=0, size=IMAGE):
    """Every variable drawn at random (BN variances positive): a stand-in trained model."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        x = rng.normal(0, 0.1, s.shape)
        if path[-1].key == 'var':
            x = rng.uniform(0.5, 1.5, s.shape)
        return x.astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract_variables(model, size))


def flat(variables):
    return {
        (c, *p): np.asarray(v)
        for c in ('params', 'batch_stats')
        for p, v in traverse_util.flatten_dict(variables[c]).items()
    }


def assert_same_variables(a, b):
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        np.testing.assert_array_equal(fa[k], fb[k], err_msg=str(k))


# --- Numerical agreement with torchvision ------------------------------------------------


@pytest.fixture(
    scope='module', params=['resnet18', pytest.param('resnet50', marks=pytest.mark.slow)]
)
def imported(request, tmp_path_factory):
    """(arch, torchvision state_dict, images NCHW, our logits) for random weights."""
    arch = request.param
    sd = ref.random_state_dict(arch, num_classes=7, seed=1)
    path = tmp_path_factory.mktemp(arch) / f'{arch}.npz'
    np.savez(path, **sd)
    model = create_model(arch, 7)
    variables = weights.load_torchvision(str(path), abstract_variables(model), arch=arch)
    images = np.random.default_rng(2).normal(size=(2, 3, IMAGE, IMAGE)).astype(np.float32)
    logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
        variables, images.transpose(0, 2, 3, 1)
    )
    return arch, sd, images, variables, np.asarray(logits)


@pytest.mark.parametrize('backend', ['torch', 'numpy'])
def test_logits_match_torchvision_reference(imported, backend):
    if backend == 'torch':
        pytest.importorskip('torch')
    arch, sd, images, _, logits = imported
    expected = ref.forward(sd, images, arch, backend=backend)
    assert logits.shape == expected.shape == (2, 7)
    assert np.abs(expected).max() > 0.1  # Meaningful logits, not vanished activations.
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)


def test_export_gives_back_the_torchvision_state_dict(imported, tmp_path):
    arch, sd, _, variables, _ = imported
    out = weights.export_torchvision(variables, str(tmp_path / 'out.npz'))
    assert list(out) == list(sd)  # Same names, in torchvision's module order.
    for k, v in sd.items():
        assert out[k].shape == v.shape, k
        if not k.endswith('num_batches_tracked'):
            np.testing.assert_array_equal(out[k], v, err_msg=k)


# --- Round trip and file formats ----------------------------------------------------------


@pytest.fixture(scope='module')
def small():
    """A narrow torchvision-layout ResNet-18 (width 8) with random variables."""
    model = create_model('resnet18', 10, width=8)
    return model, random_variables(model, seed=3, size=32)


@pytest.mark.parametrize('ext', ['.pth', '.safetensors', '.npz'])
def test_round_trip_is_exact(small, tmp_path, ext):
    if ext == '.pth':
        pytest.importorskip('torch')
    model, variables = small
    path = str(tmp_path / f'w{ext}')
    weights.export_torchvision(variables, path)
    back = weights.load_torchvision(path, abstract_variables(model, 32), arch='resnet18')
    assert_same_variables(back, variables)


def test_pth_is_a_plain_torch_state_dict(small, tmp_path):
    torch = pytest.importorskip('torch')
    _, variables = small
    path = tmp_path / 'w.pth'
    weights.export_torchvision(variables, str(path))
    sd = torch.load(path, weights_only=True)
    assert sd['conv1.weight'].shape == (8, 3, 7, 7)
    assert sd['layer2.0.downsample.0.weight'].shape == (16, 8, 1, 1)
    assert sd['fc.weight'].shape == (10, 64)
    assert sd['bn1.num_batches_tracked'].dtype == torch.int64


def test_checkpoint_wrappers_and_counters_are_accepted(small, tmp_path):
    torch = pytest.importorskip('torch')
    model, variables = small
    sd = weights.to_torchvision_state_dict(variables)
    wrapped = {
        'epoch': 3,
        'state_dict': {f'module.{k}': torch.from_numpy(v) for k, v in sd.items()},
    }
    path = tmp_path / 'ckpt.pt'
    torch.save(wrapped, path)
    back = weights.load_torchvision(str(path), abstract_variables(model, 32), arch='resnet18')
    assert_same_variables(back, variables)


def test_head_is_replaced_when_the_class_count_differs(small, tmp_path, capsys):
    model, variables = small
    imagenet = create_model('resnet18', 1000, width=8)
    path = str(tmp_path / 'imagenet.npz')
    weights.export_torchvision(random_variables(imagenet, seed=4, size=32), path)
    out = weights.load_torchvision(path, variables, arch='resnet18')
    printed = capsys.readouterr().out
    assert 'Replacing the classifier head' in printed and '1000 classes' in printed
    file_sd = weights.read_state_dict(path)
    np.testing.assert_array_equal(
        out['params']['fc']['kernel'], variables['params']['fc']['kernel']
    )
    np.testing.assert_array_equal(out['params']['fc']['bias'], variables['params']['fc']['bias'])
    np.testing.assert_array_equal(
        out['params']['conv1']['kernel'], file_sd['conv1.weight'].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        out['batch_stats']['layer4_1']['bn2']['var'], file_sd['layer4.1.bn2.running_var']
    )


# --- Malformed files ----------------------------------------------------------------------


@pytest.fixture()
def good_sd(small):
    return weights.to_torchvision_state_dict(small[1])


def load_sd(sd, tmp_path, small, arch='resnet18', model=None):
    path = tmp_path / 'bad.npz'
    np.savez(path, **sd)
    model = model or small[0]
    return weights.load_torchvision(str(path), abstract_variables(model, 32), arch=arch)


def test_missing_tensor_is_named(good_sd, tmp_path, small):
    del good_sd['layer2.0.downsample.1.running_var']
    with pytest.raises(
        ConfigError, match=r'missing tensors: layer2\.0\.downsample\.1\.running_var'
    ) as e:
        load_sd(good_sd, tmp_path, small)
    assert str(tmp_path / 'bad.npz') in str(e.value)


def test_extra_tensor_is_named(good_sd, tmp_path, small):
    good_sd['layer5.0.conv1.weight'] = np.zeros((8, 8, 3, 3), np.float32)
    with pytest.raises(ConfigError, match=r'unexpected tensors: layer5\.0\.conv1\.weight'):
        load_sd(good_sd, tmp_path, small)


def test_wrong_shape_is_named(good_sd, tmp_path, small):
    good_sd['layer1.0.conv2.weight'] = np.zeros((8, 8, 5, 5), np.float32)
    with pytest.raises(
        ConfigError,
        match=r'wrong shapes: layer1\.0\.conv2\.weight \(8, 8, 5, 5\) '
        r'\(model expects \(8, 8, 3, 3\)\)',
    ):
        load_sd(good_sd, tmp_path, small)


def test_head_with_other_input_width_is_an_error(good_sd, tmp_path, small):
    good_sd['fc.weight'] = np.zeros((1000, 2048), np.float32)
    good_sd['fc.bias'] = np.zeros((1000,), np.float32)
    with pytest.raises(ConfigError, match=r'wrong shapes: fc\.weight \(1000, 2048\)'):
        load_sd(good_sd, tmp_path, small)


def test_other_architecture_is_recognised(good_sd, tmp_path, small):
    r34 = create_model('resnet34', 10, width=8)
    with pytest.raises(
        ConfigError, match=r'model resnet34: missing tensors: layer1\.2\.conv1'
    ) as e:
        load_sd(good_sd, tmp_path, small, arch='resnet34', model=r34)
    assert 'looks like resnet18 (basic blocks 2-2-2-2), the model is resnet34' in str(e.value)


def test_model_without_torchvision_layout_is_an_error(good_sd, tmp_path, small):
    cnn = create_model('small_cnn', 10)
    with pytest.raises(ConfigError, match='no torchvision counterpart'):
        load_sd(good_sd, tmp_path, small, arch='small_cnn', model=cnn)


@pytest.mark.parametrize('ext', ['.pth', '.safetensors', '.npz'])
def test_unreadable_file(tmp_path, small, ext):
    if ext == '.pth':
        pytest.importorskip('torch')
    path = tmp_path / f'garbage{ext}'
    path.write_bytes(b'this is not a weights file' * 10)
    with pytest.raises(ConfigError, match=f'cannot read weights file {path}'):
        weights.load_torchvision(str(path), small[1], arch='resnet18')


def test_unknown_extension(tmp_path, small):
    path = tmp_path / 'weights.h5'
    path.write_bytes(b'\0' * 16)
    with pytest.raises(ConfigError, match=r"extension '\.h5' is not one of \.pth, \.pt"):
        weights.load_torchvision(str(path), small[1], arch='resnet18')


def test_without_torch_pth_is_explained_and_others_work(tmp_path, small, monkeypatch):
    model, variables = small
    pth = tmp_path / 'w.pth'
    pth.write_bytes(b'PK')  # Never opened: the missing torch is reported first.
    monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError.
    with pytest.raises(ConfigError, match=r'needs PyTorch.*\.safetensors or \.npz'):
        weights.load_torchvision(str(pth), variables, arch='resnet18')
    with pytest.raises(ConfigError, match='needs PyTorch'):
        weights.export_torchvision(variables, str(tmp_path / 'out.pth'))
    path = str(tmp_path / 'w.safetensors')
    weights.export_torchvision(variables, path)
    back = weights.load_torchvision(path, abstract_variables(model, 32), arch='resnet18')
    assert_same_variables(back, variables)


def test_missing_file(tmp_path, small):
    with pytest.raises(ConfigError, match='does not exist'):
        weights.load_torchvision(str(tmp_path / 'nope.pth'), small[1], arch='resnet18')


# --- Fine-tuning: pretrained start, frozen stages, backbone learning rate ---------------


def test_frozen_layers_stay_and_backbone_lr_is_scaled(tmp_path, monkeypatch):
    # torchvision layout with one block per stage: the freeze names of a ResNet, less compile.
    model = create_model('resnet', 10, stage_sizes=(1, 1, 1, 1), width=4)
    pretrained = random_variables(model, seed=6, size=32)
    # Every variable comes from the file: skip the real init, whose compile (truncated
    # normal initialisers) costs tens of CPU seconds.
    monkeypatch.setattr(
        steps, 'init_variables', lambda m, shape, rng, init: abstract_variables(m, 32)
    )
    path = str(tmp_path / 'pretrained.safetensors')
    weights.export_torchvision(pretrained, path)
    config = default.get_config()
    config.model = 'resnet'
    config.optimizer = 'sgd'
    config.learning_rate = 0.1
    config.pretrained = path
    config.freeze = ('conv1', 'bn1', 'layer1')
    config.backbone_lr_factor = 0.5
    state = steps.create_train_state(config, model, (32, 32, 3), jax.random.key(0), 10)
    assert_same_variables({'params': state.params, 'batch_stats': state.batch_stats}, pretrained)
    before = flat({'params': state.params, 'batch_stats': {}})

    def is_frozen(top):
        return top in ('conv1', 'bn1') or top.startswith('layer1_')

    # The optimiser: frozen updates are 0, backbone ones scaled by 0.5 (plain SGD: -lr * g).
    ones = jax.tree.map(jnp.ones_like, state.params)
    updates, _ = state.tx.update(ones, state.opt_state, state.params)
    for k, u in flat({'params': updates, 'batch_stats': {}}).items():
        lr = 0.0 if is_frozen(k[1]) else 0.1 * (1.0 if k[1] == 'fc' else 0.5)
        np.testing.assert_allclose(u, -lr, rtol=1e-6, err_msg=str(k))

    # Real training steps: frozen parameters stay bit-identical, all others move.
    rng = np.random.default_rng(5)
    batch = {
        'image': jnp.asarray(rng.normal(size=(8, 32, 32, 3)), jnp.float32),
        'label': jnp.asarray(rng.integers(0, 10, 8), jnp.int32),
    }
    step = jax.jit(steps.train_step)
    for i in range(2):
        state, metrics = step(state, batch, jax.random.key(i))
    assert np.isfinite(float(metrics['loss']))
    after = flat({'params': state.params, 'batch_stats': {}})
    for k in before:
        if is_frozen(k[1]):
            np.testing.assert_array_equal(after[k], before[k], err_msg=str(k))
        else:
            assert not np.array_equal(after[k], before[k]), k

    # ('backbone',) freezes everything but the head.
    config.freeze = ('backbone',)
    config.backbone_lr_factor = 1.0
    tx = optim.build_optimizer(config, 10, state.params)
    updates, _ = tx.update(ones, tx.init(state.params), state.params)
    for k, u in flat({'params': updates, 'batch_stats': {}}).items():
        np.testing.assert_allclose(u, -0.1 if k[1] == 'fc' else 0.0, rtol=1e-6, err_msg=str(k))


def test_export_of_a_run_checkpoint_imports_back(small, tmp_path):
    """`python -m cnn_jax.transfer.export WORKDIR OUT`: a run's checkpoint -> torchvision file."""
    from cnn_jax.checkpoints import Checkpoints
    from cnn_jax.transfer.export import export_run

    model, variables = small
    variables = jax.tree.map(jnp.asarray, variables)
    state = {
        'params': variables['params'],
        'batch_stats': variables['batch_stats'],
        'step': jnp.int32(7),
    }
    ckpt = Checkpoints(tmp_path / 'run')
    ckpt.save_latest(7, state, {'epoch': 1, 'step_in_epoch': 0, 'acc': {}})
    ckpt.wait()
    ckpt.close()
    assert export_run(str(tmp_path / 'run'), str(tmp_path / 'out.npz')) == 7
    expected = weights.export_torchvision(variables, str(tmp_path / 'direct.npz'))
    got = weights.read_state_dict(str(tmp_path / 'out.npz'))
    assert list(got) == list(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)
    with pytest.raises(ConfigError, match='no best checkpoints'):
        export_run(str(tmp_path / 'nowhere'), str(tmp_path / 'x.npz'), 'best')

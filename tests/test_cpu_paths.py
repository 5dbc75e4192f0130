"""The CPU formulations (ReLU as a mask product, `tap_conv`, `canonical_conv`, oneDNN's
`onednn_conv`; BatchNorm's and max pooling's, tested per layer in test_batch_norm.py and
test_pooling.py) compute what the lax path does.

Each is chosen on CPU only, by its selection function (`relu_for`, `tap_conv_wins`,
`canonical_conv_wins`, `onednn_conv_wins`, `cpu_batch_norm_wins`, `window_max_wins`);
here the CPU choice is compared with the other platforms' one, forced through that
function: per layer (values and gradients, float32 and bfloat16) and per model (3 train
steps). The XLA formulations' tests turn oneDNN off.
"""

import functools
import itertools
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import optim, parallel, steps
from cnn_jax.models import batch_norm, create_model, layers, onednn_conv, pooling
from configs import default


@pytest.fixture
def no_onednn(monkeypatch):
    """XLA's own formulations, whether or not the oneDNN wheels are installed."""
    monkeypatch.setattr(layers, 'onednn_conv_wins', lambda *_: False)


@pytest.fixture
def onednn():
    if not onednn_conv.available():
        pytest.skip('oneDNN wheels not installed (pip install -r requirements-onednn.txt)')


def test_cpu_relu_equals_nn_relu_with_gradients():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 5, 3)), jnp.float32)
    x = x.at[0, 0, 0].set(0.0)  # ReLU's kink: gradient 0 in both.
    g = jnp.asarray(np.random.default_rng(1).normal(size=x.shape), jnp.float32)
    fast = layers.relu_for('cpu')
    np.testing.assert_array_equal(fast(x), nn.relu(x))
    grad_fast = jax.vjp(fast, x)[1](g)[0]
    grad_ref = jax.vjp(nn.relu, x)[1](g)[0]
    np.testing.assert_array_equal(grad_fast, grad_ref)
    assert float(grad_fast[0, 0, 0, 0]) == 0.0


def test_other_platforms_keep_nn_relu():
    assert layers.relu_for('gpu') is nn.relu
    assert layers.relu_for('tpu') is nn.relu
    assert layers.relu_for('cpu') is not nn.relu


# Kernels the tap sum is chosen for on CPU (first layers), and ones it is not.
CHOSEN = [(5, 5, 3, 8), (5, 5, 1, 8), (5, 5, 1, 32), (7, 7, 1, 16), (7, 7, 3, 6)]
NOT_CHOSEN = [(5, 5, 3, 32), (3, 3, 3, 16), (1, 1, 3, 64), (7, 7, 3, 64), (3, 3, 512, 512)]


def test_tap_conv_chosen_on_cpu_only():
    for kernel in CHOSEN:
        assert layers.tap_conv_wins('cpu', kernel), kernel
    for kernel in CHOSEN + NOT_CHOSEN:
        assert not layers.tap_conv_wins('gpu', kernel), kernel
        assert not layers.tap_conv_wins('tpu', kernel), kernel
    for kernel in NOT_CHOSEN:
        assert not layers.tap_conv_wins('cpu', kernel), kernel


def _conv_pair(kernel, stride, padding, dtype):
    """(nn.Conv through FastConv, plain nn.Conv): the same layer, the same parameters."""
    kh, kw, _, cout = kernel
    make = functools.partial(nn.Conv, cout, (kh, kw), strides=stride, padding=padding, dtype=dtype)
    return make(conv_general_dilated_cls=layers.FastConv), make()


def _values_and_grads(conv, variables, x, g):
    """The layer's output and the gradients of <output, g> w.r.t. kernel, bias and input."""
    y, vjp = jax.vjp(lambda v, x: conv.apply(v, x), variables, x)
    return y, vjp(g.astype(y.dtype))


def _assert_close(ours, ref, rtol):
    # Relative to the array's scale: sums of terms of both signs have no elementwise scale.
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(ref), strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max()))


def _sweep_cases(seed, count, max_cin=3):
    """Seeded random layers (1 to max_cin input channels, taps x outputs up to 1024): every
    kernel size, stride and kind of padding, odd map sizes, batch 1 among them."""
    rng = np.random.default_rng(seed)
    paddings = itertools.cycle(['SAME', 'VALID', 'explicit'])
    cases = []
    for k, stride in itertools.islice(
        itertools.cycle(itertools.product((1, 3, 5, 7), (1, 2))), count
    ):
        cin = int(rng.integers(1, max_cin + 1))
        cout = int(rng.integers(1, 1024 // (k * k * cin) + 1))
        size = int(rng.choice([k + 2, 7, 9, 13])) | 1  # Odd, at least the kernel.
        batch = int(rng.choice([1, 2, 3]))
        padding = next(paddings)
        if padding == 'explicit':
            padding = tuple((int(rng.integers(0, k)), int(rng.integers(0, k))) for _ in range(2))
        cases.append(((k, k, cin, cout), stride, padding, (batch, size, size, cin)))
    return cases


def _check_sweep(cases, dtype, rtol, name='tap_conv'):
    """Each case's layer through FastConv (`name`, chosen for every kernel here) against
    plain nn.Conv (lax)."""
    pairs, inputs = [], []
    for i, (kernel, stride, padding, shape) in enumerate(cases):
        ours, ref = _conv_pair(kernel, stride, padding, dtype)
        rng = np.random.default_rng(i)  # numpy draws: eager jax ops compile per shape.
        x = rng.normal(size=shape).astype(dtype)
        params = {'kernel': rng.normal(size=kernel) / np.sqrt(np.prod(kernel[:3]))}
        variables = {'params': {**params, 'bias': rng.normal(size=kernel[3])}}
        variables = jax.tree.map(lambda v: v.astype(np.float32), variables)
        g = rng.normal(size=jax.eval_shape(ref.apply, variables, x).shape).astype(np.float32)
        assert f'name={name}' in str(jax.make_jaxpr(ours.apply)(variables, x))
        pairs.append((ours, ref))
        inputs.append((variables, x, g))

    @jax.jit  # One program for all cases: one compilation.
    def run(inputs):
        return [
            tuple(_values_and_grads(conv, *args) for conv in pair)
            for pair, args in zip(pairs, inputs, strict=True)
        ]

    for got, want in run(inputs):
        assert got[0].dtype == want[0].dtype == dtype
        _assert_close(got, want, rtol)


def test_tap_conv_equals_lax_values_and_gradients(monkeypatch, no_onednn):
    """Kernels 1-7, strides 1 and 2, SAME/VALID/explicit, odd sizes, batch 1: forward and
    gradients w.r.t. kernel, bias and input at 1e-5 (float32) and at bf16's 1e-2."""
    monkeypatch.setattr(layers, 'tap_conv_wins', lambda *_: True)  # 1x1 and 3x3 too.
    _check_sweep(_sweep_cases(0, 8), jnp.float32, 1e-5)
    _check_sweep(_sweep_cases(1, 4), jnp.bfloat16, 1e-2)


def test_canonical_conv_equals_lax_values_and_gradients(monkeypatch, no_onednn):
    """The other layers on CPU, the same sweep with up to 8 input channels: the gradients
    through canonical layouts are lax's at 1e-5 (float32) and at bf16's 1e-2."""
    monkeypatch.setattr(layers, 'tap_conv_wins', lambda *_: False)
    _check_sweep(_sweep_cases(2, 8, max_cin=8), jnp.float32, 1e-5, 'canonical_conv')
    _check_sweep(_sweep_cases(3, 4, max_cin=8), jnp.bfloat16, 1e-2, 'canonical_conv')


def test_canonical_conv_chosen_on_cpu_only():
    assert layers.canonical_conv_wins('cpu')
    assert not layers.canonical_conv_wins('gpu') and not layers.canonical_conv_wins('tpu')


@pytest.mark.parametrize('kernel', [(3, 3, 3, 512), (1, 1, 64, 16)])
def test_tap_conv_formulation_at_wide_channels(kernel):
    """The formulation itself is exact at any width (the selection keeps it to few channels)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 5, 5, kernel[2])), jnp.float32)
    w = jnp.asarray(rng.normal(size=kernel), jnp.float32)
    pads = ((1, 1), (1, 1))
    tap = jax.jit(lambda x, w: layers.tap_conv(x, w, (1, 1), pads))
    lax_conv = jax.jit(lambda x, w: layers._lax(x, w, (1, 1), pads))
    _assert_close(tap(x, w), lax_conv(x, w), 1e-5)


def test_not_chosen_layers_run_lax_unchanged(monkeypatch, no_onednn):
    """Many channels, big kernels: canonical_conv on CPU. Dilation: lax. A non-CPU
    platform: lax for every kernel."""
    x = jnp.ones((1, 9, 9, 3), jnp.float32)
    for kernel in NOT_CHOSEN[:3]:
        ours, _ = _conv_pair(kernel, 1, 'SAME', jnp.float32)
        jaxpr = str(jax.make_jaxpr(ours.init)(jax.random.key(0), x))
        assert 'name=tap_conv' not in jaxpr and 'name=canonical_conv' in jaxpr, kernel
    dilated = nn.Conv(8, (3, 3), kernel_dilation=2, conv_general_dilated_cls=layers.FastConv)
    assert 'custom_vjp' not in str(jax.make_jaxpr(dilated.init)(jax.random.key(0), x))
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    for kernel in CHOSEN:
        ours, _ = _conv_pair(kernel, 1, 'SAME', jnp.float32)
        jaxpr = str(jax.make_jaxpr(ours.init)(jax.random.key(0), jnp.ones((1, 9, 9, kernel[2]))))
        assert 'custom_vjp' not in jaxpr, kernel


def _variants_loss(shape, strides, pads):
    """(x, 3 variants' 3x3 kernels, loss(conv, w)): a sum of squares of conv(x, w)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 3, 3, shape[-1], 4)), jnp.float32)

    def loss(conv, w):
        return jnp.sum(conv(x, w, strides, pads) ** 2)

    return x, w, loss


def test_tap_conv_non_finite_kernels_and_vmap_take_lax():
    """NaN propagates as in lax; vmapped (a sweep's variants), lax's values and gradients."""
    x, w, loss = _variants_loss((2, 7, 7, 3), (1, 1), ((1, 1), (1, 1)))
    pads = ((1, 1), (1, 1))
    nan = w[0].at[0, 0, 0, 1].set(jnp.nan)
    np.testing.assert_array_equal(
        jnp.isnan(layers.tap_conv(x, nan, (1, 1), pads)),
        jnp.isnan(layers._lax(x, nan, (1, 1), pads)),
    )
    vmapped = jax.vmap(jax.value_and_grad(functools.partial(loss, layers.tap_conv)))
    text = str(jax.make_jaxpr(vmapped)(w))
    assert 'cond' not in text and 'select_n' not in text  # Not both branches: lax alone.
    assert 'cond' in str(jax.make_jaxpr(functools.partial(loss, layers.tap_conv))(w[0]))
    got = jax.jit(vmapped)(w)
    want = jax.jit(jax.vmap(jax.value_and_grad(functools.partial(loss, layers._lax))))(w)
    _assert_close(got, want, 1e-6)


def _force_platform(monkeypatch, platform, onednn):
    """Every selection function makes `platform`'s choice, whatever the backend; oneDNN's
    convolution is among the CPU's choices only if `onednn`."""
    relu_for, tap_conv_wins = layers.relu_for, layers.tap_conv_wins
    canonical = layers.canonical_conv_wins(platform)
    monkeypatch.setattr(layers, 'relu_for', lambda _: relu_for(platform))
    monkeypatch.setattr(layers, 'tap_conv_wins', lambda _, kernel: tap_conv_wins(platform, kernel))
    monkeypatch.setattr(layers, 'canonical_conv_wins', lambda _: canonical)
    cpu_bn = batch_norm.cpu_batch_norm_wins
    monkeypatch.setattr(batch_norm, 'cpu_batch_norm_wins', lambda _, d: cpu_bn(platform, d))
    window_max = pooling.window_max_wins(platform)
    monkeypatch.setattr(pooling, 'window_max_wins', lambda _: window_max)
    # Forced on 8 devices too (where the selection keeps XLA's): the values still agree.
    wins = onednn and platform == 'cpu' and onednn_conv.available()
    monkeypatch.setattr(layers, 'onednn_conv_wins', lambda _, d: wins and d == jnp.float32)


def _numpy_variables(model, shape):
    """The model's variables, drawn with numpy: compiling ResNet-20's init takes 20 s here."""
    init = functools.partial(model.init, train=False)
    shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((1, *shape)))
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if path[-1].key == 'kernel':  # He-like scale, so that 3 steps train smoothly.
            return rng.normal(size=leaf.shape).astype(np.float32) / np.sqrt(
                np.prod(leaf.shape[:-1])
            )
        fill = 1.0 if path[-1].key in ('scale', 'var') else 0.0  # BatchNorm's own defaults.
        return np.full(leaf.shape, fill, np.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


def _check_model(
    model_name, shape, batch_size, monkeypatch, taps, onednn=False, bn=False, pools=False
):
    """3 momentum-SGD steps with the CPU paths, on 1 device and on 8, against the lax path
    (the other platforms' choice) on 1 device: losses, parameters and BN statistics. `taps`:
    whether the model has a layer that tap_conv_wins picks; `onednn`: whether the CPU's
    other convolutions are oneDNN's (else canonical_conv); `bn`: whether it has BatchNorm
    (cnn_jax's on the CPU); `pools`: whether it has overlapping max pools (window_max)."""
    if jax.device_count() < 8:
        pytest.skip('needs 8 (virtual) devices')
    config = default.get_config()
    config.model, config.optimizer, config.learning_rate = model_name, 'momentum', 0.01
    model = create_model(model_name, 10)
    variables = _numpy_variables(model, shape)
    tx = optim.build_optimizer(config, 10, variables['params'])
    state = steps.TrainState.create(
        apply_fn=model.apply,
        tx=tx,
        params=variables['params'],
        batch_stats=variables.get('batch_stats', {}),
    )
    rng = np.random.default_rng(0)
    batch = {
        'image': rng.normal(size=(batch_size, *shape)).astype(np.float32),
        'label': rng.integers(0, 10, batch_size).astype(np.int32),
    }
    results = {}
    for platform, n_devices in (('gpu', 1), ('cpu', 1), ('cpu', 8)):
        mesh = parallel.make_mesh(jax.devices()[:n_devices])
        args = [jax.device_put(state, parallel.replicated(mesh))]
        args += [jax.device_put(batch, parallel.data_sharding(mesh)), jax.random.key(1)]
        with monkeypatch.context() as patch:
            _force_platform(patch, platform, onednn)
            # A new function object: jit's trace cache would return the last platform's trace.
            traced = jax.jit(functools.partial(steps.train_step)).trace(*args)
        # Each CPU formulation runs where, and only where, the CPU choice was made.
        text = str(traced.jaxpr)
        assert ('name=relu' in text or 'let relu =' in text) == (platform != 'cpu')  # nn.relu
        assert ('name=tap_conv' in text) == (platform == 'cpu' and taps and not onednn)
        assert ('name=canonical_conv' in text) == (platform == 'cpu' and not onednn)
        assert ('name=onednn_conv' in text) == (platform == 'cpu' and onednn)
        assert ('name=_normalize_bwd' in text) == (platform == 'cpu' and bn)
        assert ('name=_window_max_bwd' in text) == (platform == 'cpu' and pools)
        step, losses = traced.lower().compile(), []
        for _ in range(3):
            args[0], metrics = step(*args)
            losses.append(float(metrics['loss']))
        results[platform, n_devices] = losses, jax.device_get((args[0].params, args[0].batch_stats))
    (ref_losses, ref_state) = results.pop(('gpu', 1))
    assert ref_losses[2] != ref_losses[0]  # The steps train.
    for losses, final in results.values():
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), final, ref_state
        )


def test_simplenn_train_steps_cpu_paths_equal_lax(monkeypatch):
    _check_model('simplenn', (32, 32, 3), 16, monkeypatch, taps=True)


@pytest.mark.slow
def test_resnet20_train_steps_cpu_paths_equal_lax(monkeypatch):
    _check_model('resnet20', (16, 16, 3), 8, monkeypatch, taps=False, bn=True)


def test_mnist_cnn_train_steps_cpu_paths_equal_lax(monkeypatch):
    _check_model('mnist_cnn', (28, 28, 1), 16, monkeypatch, taps=True, pools=True)


def test_simplenn_train_steps_onednn_equal_lax(monkeypatch, onednn):
    _check_model('simplenn', (32, 32, 3), 16, monkeypatch, taps=True, onednn=True)


# Wide layers beyond the sweep's 1024 taps x outputs: (kernel, stride, padding, input shape).
# The first is past onednn_conv.cc's kRelayoutMaxElements (64K), so its kernel and kernel
# gradient change layout by oneDNN's reorder; the others' and the sweep's, by Relayout
# (the sweep's odd channel counts with blocks padded past them).
WIDE = [
    ((3, 3, 64, 512), 1, 'SAME', (1, 5, 5, 64)),
    ((1, 1, 512, 3), 2, 'VALID', (2, 7, 7, 512)),
    ((7, 7, 3, 64), 2, ((3, 2), (3, 2)), (1, 15, 15, 3)),
    ((5, 5, 32, 48), 2, 'SAME', (3, 9, 11, 32)),
]


def test_onednn_conv_equals_lax_values_and_gradients(onednn, monkeypatch):
    """The sweep (kernels 1-7, strides 1 and 2, SAME/VALID/explicit, odd sizes, batch 1)
    with up to 8 input channels, and layers of 3 to 512 channels: forward and gradients
    w.r.t. kernel, bias and input at 1e-5 in float32. (Chosen whatever the device count.)"""
    monkeypatch.setattr(layers, 'onednn_conv_wins', lambda _, dtype: dtype == jnp.float32)
    _check_sweep(_sweep_cases(4, 8, max_cin=8) + WIDE, jnp.float32, 1e-5, 'onednn_conv')


def test_onednn_conv_chosen_for_float32_on_one_cpu_device_only(onednn, monkeypatch):
    """float32 on a one-device CPU run only (with 8 devices XLA would gather the batch
    onto each); bfloat16 layers keep canonical_conv; CNN_JAX_ONEDNN=0 (a new process)
    keeps XLA's convolutions."""
    monkeypatch.setattr(jax, 'device_count', lambda: 8)
    assert not onednn_conv.onednn_conv_wins('cpu', jnp.float32)
    monkeypatch.setattr(jax, 'device_count', lambda: 1)
    assert onednn_conv.onednn_conv_wins('cpu', jnp.float32)
    for platform, dtype in [('cpu', jnp.bfloat16), ('cpu', jnp.float16), ('gpu', jnp.float32)]:
        assert not onednn_conv.onednn_conv_wins(platform, dtype), (platform, dtype)
    assert not onednn_conv.onednn_conv_wins('tpu', jnp.float32)
    ours, _ = _conv_pair((3, 3, 8, 8), 1, 'SAME', jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(ours.init)(jax.random.key(0), jnp.ones((1, 9, 9, 8))))
    assert 'name=canonical_conv' in jaxpr and 'name=onednn_conv' not in jaxpr
    probe = 'from cnn_jax.models import onednn_conv as o; print(o.available())'
    for switch, want in (('0', 'False'), ('1', 'True')):
        env = {**os.environ, 'CNN_JAX_ONEDNN': switch}
        out = subprocess.run([sys.executable, '-c', probe], env=env, capture_output=True, text=True)
        assert out.stdout.strip() == want, out.stderr


def test_onednn_conv_vmapped_equals_lax(onednn):
    """A sweep's variants (vmapped kernels) run one oneDNN call each: lax's values and
    gradients."""
    _, w, loss = _variants_loss((2, 9, 9, 3), (2, 1), ((1, 0), (2, 1)))
    got = jax.jit(jax.vmap(jax.value_and_grad(functools.partial(loss, onednn_conv.onednn_conv))))
    want = jax.jit(jax.vmap(jax.value_and_grad(functools.partial(loss, layers._lax))))
    _assert_close(got(w), want(w), 1e-5)


def test_a_one_device_cpu_run_trains_through_onednn_as_through_xla(onednn, tmp_path):
    """The user's command on one CPU device: oneDNN runs its convolutions (the run says so
    in its first line and in summary.json) and ends where CNN_JAX_ONEDNN=0's run ends."""
    root = pathlib.Path(__file__).resolve().parents[1]
    summaries = {}
    for switch in ('1', '0'):
        workdir = tmp_path / f'onednn{switch}'
        env = {**os.environ, 'CNN_JAX_ONEDNN': switch, 'XLA_FLAGS': ''}  # One CPU device.
        cmd = [sys.executable, 'launch.py', '--config=configs/quickstart.py']
        cmd += ['--config.num_epochs=2', f'--workdir={workdir}']
        out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert ('1 cpu device(s); convolutions by oneDNN.' in out.stdout) == (switch == '1')
        summaries[switch] = json.loads((workdir / 'summary.json').read_text())
    assert summaries['1']['onednn_convolutions'] and not summaries['0']['onednn_convolutions']
    for key in ('test_loss', 'val_loss', 'train_loss'):
        assert summaries['1'][key] == pytest.approx(summaries['0'][key], rel=1e-4), key

"""The model zoo: every experiment config's network, the ResNet contract, the shared layers.

Everything that needs only shapes (the 224x224 ResNets, the registry) runs under
jax.eval_shape; real arithmetic runs on small batches so the file stays fast on a CPU.
"""

import dataclasses
import functools
import importlib
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import summary
from cnn_jax.errors import ConfigError
from cnn_jax.models import MODELS, create_model, layers, pooling


class Case(NamedTuple):
    config: str
    arg: str | None
    input_shape: tuple[int, int, int]
    num_classes: int
    trainable: int  # Worked out by hand from EXPERIMENTS.md (see the comments).
    non_trainable: int
    has_bn: bool
    has_dropout: bool


CASES = [
    # 9,404,992 (E1's ten convs, VGG-13's list) + 2048*4096+4096 + 4096*4096+4096 + 4096*3+3.
    # (The rungs share the network; 'dropout' is the first with classifier dropout.)
    Case('vgg', 'dropout', (64, 64, 3), 3, 34_591_299, 0, False, True),
    # torchvision's 11,689,512 - 513,000 (fc 512->1000) + 1,539 (fc 512->3).
    Case('resnet18', None, (64, 64, 3), 3, 11_178_051, 9_600, True, False),
    # 800 + 3,208 + 292 + 196*10+10.
    Case('mnist_cnn', None, (28, 28, 1), 10, 6_270, 0, False, False),
    Case('mnist_cnn', 'merged', (28, 28, 1), 4, 5_088, 0, False, False),
    # 168+440+90+132+182 + BN 28 + 240 + 2,769,920+524,800 + BN 1,024 + 131,328+2,570.
    Case('cifar_cnn6', None, (32, 32, 3), 10, 3_430_922, 1_052, True, False),
    # 608 + 1,168 + 69,240 + 10,164 + 850.
    Case('simplenn', None, (32, 32, 3), 10, 82_030, 0, False, False),
    # He et al.'s "0.27M" with 1x1 projections (option B).
    Case('resnet20', None, (32, 32, 3), 10, 272_474, 1_568, True, False),
    # 2,432 + 51,264 + 204,928 + 131,136 + 650.
    Case('cifar_cnn3', None, (32, 32, 3), 10, 390_410, 0, False, False),
    # Convs 6,198,528 + conv BN 3,840 + 2,097,664+32,832+650 + dense BN 1,152.
    Case('cifar_cnn4', None, (32, 32, 3), 10, 8_334_666, 4_992, True, True),
]
IDS = [c.config + (f':{c.arg}' if c.arg else '') for c in CASES]

BATCH = 2  # Enough for batch statistics; VGG-16 at 64x64 is the slow one on a CPU.
DATASET_SHAPES = {'cifar10': (32, 32, 3), 'mnist': (28, 28, 1)}
DATASET_CLASSES = {'cifar10': 10, 'mnist': 10}


@pytest.fixture(autouse=True)
def _fast_prng():
    """Non-partitionable threefry: same keys and API, but XLA:CPU compiles its random-bit
    programs in about a second instead of ten (init and dropout would dominate the file)."""
    with jax.threefry_partitionable(False):
        yield


def _count(tree: Any) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@functools.cache
def _config(name: str, arg: str | None):
    module = importlib.import_module(f'configs.{name}')
    return module.get_config(arg) if arg else module.get_config()


def _model(case: Case) -> nn.Module:
    config = _config(case.config, case.arg)
    return create_model(config.model, case.num_classes, **config.model_options.to_dict())


def _images(case: Case, n: int, seed: int = 0) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).normal(size=(n, *case.input_shape)), jnp.float32)


@functools.cache
def _init(case: Case) -> dict:
    """He-normal kernels, zero biases, BN at (1, 0) / statistics (0, 1), drawn in NumPy.

    Compiling flax's initialisers costs several CPU-seconds per network here, more than
    the rest of its tests together; the structure still comes from model.init (traced by
    jax.eval_shape), and test_bfloat16_* runs a real init.
    """
    model = _model(case)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *case.input_shape)), train=False)
    )
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        name = path[-1].key
        if name == 'kernel':
            std = math.sqrt(2.0 / math.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, std, leaf.shape), jnp.float32)
        fill = 1.0 if name in ('scale', 'var') else 0.0
        return jnp.full(leaf.shape, fill, jnp.float32)

    return jax.tree_util.tree_map_with_path(draw, shapes)


@functools.cache
def _probe(case: Case) -> dict[str, Any]:
    """Eval and train outputs with two dropout keys each (and the BN states), one compile."""
    model, variables = _model(case), _init(case)

    @jax.jit
    def probe(x):
        out = {}
        for mode, train in (('eval', False), ('train', True)):
            for seed in (0, 1):
                out[f'{mode}_{seed}'] = model.apply(
                    variables, x, train=train, rngs={'dropout': jax.random.key(seed)},
                    mutable=['batch_stats'],
                )  # fmt: skip
        return out

    return jax.device_get(probe(_images(case, BATCH)))


# --- Every experiment config --------------------------------------------------------


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_config_describes_its_experiment_data(case):
    config = _config(case.config, case.arg)
    shape = DATASET_SHAPES[config.dataset]
    if config.image_size:
        shape = (config.image_size, config.image_size, shape[2])
    assert shape == case.input_shape
    groups = config.classes or config.label_groups
    assert (len(groups) if groups else DATASET_CLASSES[config.dataset]) == case.num_classes
    doc = importlib.import_module(f'configs.{case.config}').__doc__
    assert f'launch.py --config=configs/{case.config}.py' in doc
    assert '--config.dataset=' in doc  # The offline command.


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_forward_gives_float32_logits(case):
    logits, _ = _probe(case)['eval_0']
    assert logits.shape == (BATCH, case.num_classes)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_parameter_count_equals_the_formula_layer_by_layer(case):
    model = _model(case)
    variables = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, *case.input_shape)), train=False)
    )
    counts = summary.param_counts(variables)
    assert (counts.trainable, counts.batch_stats) == (case.trainable, case.non_trainable)
    rows = summary.layer_rows(model, case.input_shape)[0]  # Raises on any disagreement.
    for row in rows:
        if row.trainable or row.non_trainable:
            assert row.formula == (row.trainable, row.non_trainable), row
    assert sum(r.formula.trainable for r in rows if r.formula) == case.trainable
    assert sum(r.formula.non_trainable for r in rows if r.formula) == case.non_trainable


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_train_and_eval_differ_exactly_where_bn_and_dropout_say(case):
    out = _probe(case)
    (eval_a, eval_state), (eval_b, _) = out['eval_0'], out['eval_1']
    (train_a, train_state), (train_b, _) = out['train_0'], out['train_1']
    # Eval is deterministic and leaves the BN statistics alone.
    np.testing.assert_array_equal(eval_a, eval_b)
    stats = jax.device_get(_init(case).get('batch_stats', {}))
    after_eval = eval_state.get('batch_stats', {})
    assert jax.tree.structure(after_eval) == jax.tree.structure(stats)
    assert jax.tree.all(jax.tree.map(np.array_equal, after_eval, stats))
    # Only dropout makes training depend on the dropout RNG.
    assert np.array_equal(train_a, train_b) == (not case.has_dropout)
    # Training differs from eval only through BN (batch statistics) or dropout.
    assert np.array_equal(train_a, eval_a) == (not case.has_bn and not case.has_dropout)
    if case.has_bn:
        changed = jax.tree.map(
            lambda a, b: not np.array_equal(a, b), stats, train_state['batch_stats']
        )
        assert jax.tree.all(changed)


@pytest.mark.slow
@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_trains_a_few_steps_on_random_data(case):
    model, variables = _model(case), _init(case)
    params, stats = variables['params'], variables.get('batch_stats', {})
    tx = optax.adam(1e-4)
    x, y = _images(case, BATCH, seed=1), jnp.arange(BATCH) % case.num_classes

    @jax.jit
    def step(params, stats, opt_state, rng):
        def loss_fn(p):
            logits, new = model.apply(
                {'params': p, 'batch_stats': stats}, x, train=True, rngs={'dropout': rng},
                mutable=['batch_stats'],
            )  # fmt: skip
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new

        (loss, new), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new.get('batch_stats', {}), opt_state, loss

    new_params, opt_state, losses = params, tx.init(params), []
    for i in range(3):
        new_params, stats, opt_state, loss = step(new_params, stats, opt_state, jax.random.key(i))
        losses.append(float(loss))
    assert np.isfinite(losses).all(), losses
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(new_params))
    # Every parameter tensor received an update.
    pairs = zip(jax.tree.leaves(params), jax.tree.leaves(new_params), strict=True)
    assert all(not np.array_equal(a, b) for a, b in pairs)


def test_vgg_ladder_adds_one_regulariser_per_rung():
    rungs = [_config('vgg', r) for r in ('base', 'l2', 'dropout', 'early_stopping', 'augment')]
    assert [c.weight_decay > 0 for c in rungs] == [False, True, True, True, True]
    assert [c.model_options.dropout_rate for c in rungs] == [0.0, 0.0, 0.5, 0.5, 0.5]
    assert [c.early_stopping.patience > 0 for c in rungs] == [False, False, False, True, True]
    assert [c.augment.flip for c in rungs] == [False, False, False, False, True]
    assert len({(c.seed, c.dataset, c.classes, c.image_size) for c in rungs}) == 1
    with pytest.raises(ConfigError, match='known variants: base, l2'):
        _config('vgg', 'nope')


def test_configs_carry_their_experiments_hyperparameters():
    c = _config('mnist_cnn', None)
    assert (c.optimizer, c.batch_size, c.num_epochs, c.label_groups) == ('adam', 20, 10, None)
    assert _config('mnist_cnn', 'merged').label_groups == ((0, 6), (1, 7), (2, 3, 5, 8), (4, 9))
    c = _config('cifar_cnn6', None)
    assert (c.num_epochs, c.optimizer, c.eval_test_each_epoch) == (20, 'adam', True)
    c = _config('simplenn', None)
    assert (c.optimizer, c.learning_rate, c.weight_decay) == ('momentum', 0.01, 1e-4)
    assert c.val_fraction > 0
    c = _config('resnet20', None)
    assert (c.optimizer, c.learning_rate, c.weight_decay, c.batch_size) == (
        'momentum',
        0.1,
        1e-4,
        128,
    )
    assert (c.augment.crop_padding, c.augment.flip) == (4, True)
    for name in ('cifar_cnn3', 'cifar_cnn4'):
        c = _config(name, None)
        assert (c.optimizer, c.learning_rate, c.batch_size) == ('sgd', 5e-2, 64)
        assert c.early_stopping.monitor == 'val_loss' and c.early_stopping.patience > 0
    assert _config('cifar_cnn4', None).augment.flip
    assert _config('resnet18', None).num_epochs == 5


# --- ResNet: torchvision's layout and the import contract ---------------------------


def _shapes_224(name: str) -> tuple[dict, dict]:
    """Variable shapes and captured block outputs at 224x224, without any arithmetic."""
    model = create_model(name, 1000)

    def f():
        x = jnp.zeros((1, 224, 224, 3))
        v = model.init(jax.random.key(0), x, train=False)
        _, state = model.apply(
            v, x, train=False, capture_intermediates=True, mutable=['intermediates']
        )
        return v, state['intermediates']

    return jax.eval_shape(f)


@pytest.mark.parametrize(
    'name,trainable,non_trainable,channels',
    [
        ('resnet18', 11_689_512, 9_600, (64, 64, 128, 256, 512)),
        ('resnet34', 21_797_672, 17_024, (64, 64, 128, 256, 512)),
        ('resnet50', 25_557_032, 53_120, (64, 256, 512, 1024, 2048)),
    ],
)
def test_resnet_imagenet_shapes_and_canonical_counts(name, trainable, non_trainable, channels):
    variables, inter = _shapes_224(name)
    assert _count(variables['params']) == trainable
    assert _count(variables['batch_stats']) == non_trainable
    last = {
        i: max(int(k.split('_')[1]) for k in inter if k.startswith(f'layer{i}_'))
        for i in range(1, 5)
    }
    shapes = [inter['conv1']['__call__'][0].shape, inter['maxpool']['__call__'][0].shape]
    shapes += [inter[f'layer{i}_{last[i]}']['__call__'][0].shape for i in range(1, 5)]
    assert [s[1:3] for s in shapes] == [(112, 112), (56, 56), (56, 56), (28, 28), (14, 14), (7, 7)]
    assert [s[3] for s in shapes[1:]] == list(channels)
    assert inter['__call__'][0].shape == (1, 1000)


def test_resnet_names_follow_torchvision():
    params = jax.eval_shape(
        lambda: create_model('resnet18', 10).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
        )
    )['params']
    blocks = [f'layer{i}_{j}' for i in range(1, 5) for j in range(2)]
    assert set(params) == {'conv1', 'bn1', 'fc', *blocks}
    assert set(params['layer1_0']) == {'conv1', 'bn1', 'conv2', 'bn2'}
    assert set(params['layer2_0']) == {
        'conv1',
        'bn1',
        'conv2',
        'bn2',
        'downsample_conv',
        'downsample_bn',
    }
    assert set(params['conv1']) == {'kernel'}  # No bias before BN.
    assert params['conv1']['kernel'].shape == (7, 7, 3, 64)
    assert params['fc']['kernel'].shape == (512, 10)

    params = jax.eval_shape(
        lambda: create_model('resnet50', 10).init(
            jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
        )
    )['params']
    assert set(params['layer1_0']) == {
        'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3', 'downsample_conv', 'downsample_bn',
    }  # fmt: skip
    assert set(params['layer1_1']) == {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3'}
    assert params['layer2_0']['conv1']['kernel'].shape == (1, 1, 256, 128)
    assert params['layer2_0']['conv2']['kernel'].shape == (3, 3, 128, 128)
    assert params['layer2_0']['conv3']['kernel'].shape == (1, 1, 128, 512)


def test_bottleneck_strides_on_the_3x3_conv():
    # torchvision v1.5: the 1x1 reduce keeps the size, the 3x3 halves it.
    rows = {r.name: r for r in summary.layer_rows(create_model('resnet50', 10), (64, 64, 3))[0]}
    assert rows['layer2_0/conv1'].output_shape[1] == 16
    assert rows['layer2_0/conv2'].output_shape[1] == 8
    assert rows['layer2_0/downsample_conv'].output_shape[1] == 8


def test_resnet_features_only_returns_the_pooled_features():
    for name, width in [('resnet18', 512), ('resnet50', 2048), ('resnet20', 64)]:
        out = jax.eval_shape(
            lambda name=name: create_model(name, 10).init_with_output(
                jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False, features_only=True
            )[0]
        )
        assert out.shape == (2, width) and out.dtype == jnp.float32


def test_resnet_padding_is_torchs():
    """The stem conv (7x7/2, pad 3), the max-pool (3x3/2, pad 1 with -inf) and a strided
    3x3 conv (pad 1) of the ResNets against torch.nn.functional on the same weights; flax's
    'SAME' would pad the stride-2 ones by (0, 1) on even inputs and shift every map."""
    torch = pytest.importorskip('torch')
    from cnn_jax.models import resnet

    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 10, 10, 3)).astype(np.float32)  # Negative values: -inf pad shows.

    def to_torch(a, perm):
        return torch.from_numpy(np.array(a, np.float32)).permute(*perm)

    def close(ours, theirs):
        np.testing.assert_allclose(ours, theirs.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-5)

    for kernel, torch_pad in ((7, 3), (3, 1), (1, 0)):
        conv = resnet._conv(4, kernel, 2, jnp.float32, 'conv')
        kernel_init = rng.normal(size=(kernel, kernel, 3, 4)).astype(np.float32)
        ours = conv.apply({'params': {'kernel': kernel_init}}, x)
        theirs = torch.nn.functional.conv2d(
            to_torch(x, (0, 3, 1, 2)),
            to_torch(kernel_init, (3, 2, 0, 1)),
            stride=2,
            padding=torch_pad,
        )
        close(ours, theirs)
    pool = pooling.MaxPool((3, 3), (2, 2), 1).apply({}, x)
    close(pool, torch.nn.functional.max_pool2d(to_torch(x, (0, 3, 1, 2)), 3, 2, 1))


def test_cifar_resnets():
    counts = {}
    for depth in (20, 32, 44, 56, 110):
        v = jax.eval_shape(
            lambda d=depth: create_model(f'resnet{d}', 10).init(
                jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False
            )
        )
        counts[depth] = _count(v['params'])
        assert len([k for k in v['params'] if k.startswith('layer')]) == 3 * (depth - 2) // 6
    # He et al., Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M (ours add 1x1 projections).
    assert [round(counts[d] / 1e6, 2) for d in (20, 32, 44, 56)] == [0.27, 0.47, 0.66, 0.86]
    assert round(counts[110] / 1e6, 1) == 1.7
    rows = {r.name: r for r in summary.layer_rows(create_model('resnet20', 10), (32, 32, 3))[0]}
    assert rows['conv1'].output_shape == (1, 32, 32, 16)
    assert rows['layer2_0/conv1'].output_shape == (1, 16, 16, 32)
    assert rows['layer3_2/conv2'].output_shape == (1, 8, 8, 64)
    assert 'maxpool' not in rows
    from cnn_jax.models.resnet import cifar_resnet

    with pytest.raises(ConfigError, match='6n \\+ 2'):
        cifar_resnet(21)


# --- Registry and dtypes ------------------------------------------------------------


def test_every_registered_model_builds_and_is_a_dataclass_family():
    for name in MODELS:
        shape = (1, 64, 64, 3) if 'resnet' in name or 'vgg' in name else (1, 32, 32, 3)
        model = create_model(name, 7)
        out = jax.eval_shape(
            lambda m=model, s=shape: m.init_with_output(
                jax.random.key(0), jnp.zeros(s), train=False
            )[0]
        )
        assert out.shape == (1, 7) and out.dtype == jnp.float32, name
        cls = MODELS[name]
        while isinstance(cls, functools.partial):
            cls = cls.func
        fields = {f.name for f in dataclasses.fields(cls)}
        assert {'num_classes', 'dtype'} <= fields, name


@pytest.mark.parametrize(
    'name,norm,count',
    [
        ('vgg11', 'none', 132_863_336),
        ('vgg13', 'none', 133_047_848),
        ('vgg16', 'none', 138_357_544),
        ('vgg19', 'none', 143_667_240),
        ('vgg16', 'batchnorm', 138_365_992),
    ],
)
def test_vgg_family_matches_torchvision_counts_at_224(name, norm, count):
    # At 224x224 the last map is 7x7, so flatten = torchvision's adaptive pool + flatten.
    v = jax.eval_shape(
        lambda: create_model(name, 1000, norm=norm).init(
            jax.random.key(0), jnp.zeros((1, 224, 224, 3)), train=False
        )
    )
    assert _count(v['params']) == count


def test_unknown_names_raise_config_errors_listing_the_known_ones():
    def init(model):
        x = jnp.zeros((1, 32, 32, 3))
        return jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))

    with pytest.raises(ConfigError, match='known models: .*resnet18.*vgg16'):
        create_model('resnet19', 10)
    with pytest.raises(ConfigError, match='bad model_options'):
        create_model('simplenn', 10, nonsense=1)
    known = 'known activations: identity, relu, tanh, sigmoid, swish, leaky_relu, gelu'
    with pytest.raises(ConfigError, match=known):
        init(create_model('simplenn', 10, activation='elu'))
    with pytest.raises(ConfigError, match='known norms: none, batchnorm, dropout'):
        init(create_model('cifar_cnn6', 10, norm='layernorm'))
    with pytest.raises(ConfigError, match='known blocks'):
        init(create_model('resnet', 10, block='wide'))
    with pytest.raises(ConfigError, match=r'dropout rate must be in \[0, 1\)'):
        init(create_model('vgg11', 10, dropout_rate=1.5))


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = create_model('simplenn', 10, dtype=jnp.bfloat16, norm='batchnorm')
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)

    @jax.jit
    def run(x):
        v = model.init(jax.random.key(0), x, train=False)
        conv_out = model.apply(
            v, x, train=False, capture_intermediates=True, mutable=['intermediates']
        )
        return v, conv_out

    v, (logits, state) = run(x)
    assert {p.dtype for p in jax.tree.leaves(v)} == {jnp.dtype('float32')}
    assert state['intermediates']['Conv_0']['__call__'][0].dtype == jnp.bfloat16
    assert logits.dtype == jnp.float32 and np.isfinite(np.asarray(logits)).all()


# --- Shared layers ------------------------------------------------------------------


def test_activations_by_name():
    x = jnp.array([-1.0, 0.0, 1.0])
    expected = {
        'identity': [-1.0, 0.0, 1.0],
        'relu': [0.0, 0.0, 1.0],
        'tanh': np.tanh([-1.0, 0.0, 1.0]),
        'sigmoid': 1 / (1 + np.exp([1.0, 0.0, -1.0])),
        'swish': [-1 / (1 + np.e), 0.0, 1 / (1 + np.exp(-1.0))],
        'leaky_relu': [-0.01, 0.0, 1.0],  # torch's slope.
        'gelu': [-0.15865525, 0.0, 0.84134475],  # x * Phi(x), the exact (erf) form.
    }
    assert set(expected) == set(layers.ACTIVATIONS)
    for name, want in expected.items():
        got = layers.Activation(name).apply({}, x)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)


class _Norm(nn.Module):
    norm: str
    rate: float

    @nn.compact
    def __call__(self, x, *, train):
        return layers.normalize(x, self.norm, train=train, rate=self.rate, dtype=jnp.float32)


def test_spatial_dropout_drops_whole_channels_and_plain_dropout_single_units():
    x = jnp.ones((4, 5, 5, 32))
    m = _Norm('dropout', 0.5)
    out = np.asarray(m.apply({}, x, train=True, rngs={'dropout': jax.random.key(0)}))
    per_channel = out.reshape(4, 25, 32)
    assert set(np.unique(out)) == {0.0, 2.0}  # Kept units are scaled by 1 / (1 - rate).
    assert (per_channel.min(axis=1) == per_channel.max(axis=1)).all()  # All or nothing.
    flat = np.asarray(
        m.apply({}, jnp.ones((4, 800)), train=True, rngs={'dropout': jax.random.key(0)})
    )
    assert set(np.unique(flat)) == {0.0, 2.0}
    np.testing.assert_array_equal(m.apply({}, x, train=False), x)


def test_batch_norm_uses_torch_momentum_and_epsilon():
    m = _Norm('batchnorm', 0.0)
    x = jax.random.normal(jax.random.key(0), (16, 3, 3, 4)) * 3 + 2
    v = m.init(jax.random.key(0), x, train=False)
    y, state = m.apply(v, x, train=True, mutable=['batch_stats'])
    stats = state['batch_stats']['BatchNorm_0']
    mean, var = np.mean(x, axis=(0, 1, 2)), np.var(x, axis=(0, 1, 2))
    # torch's momentum 0.1 on the new value: running = 0.9 * running + 0.1 * batch.
    np.testing.assert_allclose(stats['mean'], 0.1 * mean, rtol=1e-5)
    np.testing.assert_allclose(stats['var'], 0.9 + 0.1 * var, rtol=1e-5)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-5), rtol=1e-4, atol=1e-4)
    # Eval with fresh statistics (0, 1): x / sqrt(1 + eps).
    np.testing.assert_allclose(m.apply(v, x, train=False), x / np.sqrt(1 + 1e-5), rtol=1e-6)


@pytest.mark.parametrize(
    'shape,window,strides,padding',
    [
        ((2, 9, 7, 3), (2, 2), None, 'VALID'),
        ((1, 8, 12, 2), (3, 2), None, 'VALID'),
        ((2, 9, 8, 3), (3, 3), (2, 2), 1),
        ((1, 7, 7, 2), (3, 3), (1, 1), 'VALID'),
        ((1, 10, 9, 2), (2, 3), (2, 1), ((1, 0), (0, 1))),
    ],
)
def test_max_pool_fast_paths_equal_reduce_window_with_gradient(shape, window, strides, padding):
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)  # No ties.
    pool = pooling.MaxPool(window, strides, padding)
    pads = ((padding, padding),) * 2 if isinstance(padding, int) else padding

    def ours(v):
        return pool.apply({}, v)

    def reference(v):
        return nn.max_pool(v, window, strides or window, pads)

    assert 'reduce_window' not in str(jax.make_jaxpr(ours)(x))

    np.testing.assert_array_equal(ours(x), reference(x))
    weights = jnp.arange(ours(x).size, dtype=jnp.float32).reshape(ours(x).shape)
    grads = [jax.grad(lambda v, f=f: jnp.sum(f(v) * weights))(x) for f in (ours, reference)]
    np.testing.assert_array_equal(*grads)


@pytest.mark.parametrize(
    'hw,kernel,pad,stride',
    [((2, 2), 3, 1, 1), ((1, 2), 3, 1, 1), ((2, 2), 1, 0, 1), ((4, 4), 3, 1, 1), ((2, 2), 3, 1, 2)],
)
def test_small_map_conv_equals_lax_with_gradients(hw, kernel, pad, stride):
    """FastConv is a matrix product on maps up to 2x2 and a convolution elsewhere; same
    numbers."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(3, *hw, 5)), jnp.float32)
    conv = functools.partial(
        nn.Conv, 7, (kernel, kernel), strides=stride, padding=((pad, pad), (pad, pad))
    )
    variables = conv().init(jax.random.key(0), x)

    def loss(v, x, module):
        return jnp.sum(module.apply(v, x) ** 2)

    ours, theirs = conv(conv_general_dilated_cls=layers.FastConv), conv()
    uses_dot = 'dot_general' in str(jax.make_jaxpr(ours.apply)(variables, x))
    assert uses_dot == (max(hw) <= 2 and stride == 1)
    np.testing.assert_allclose(
        ours.apply(variables, x), theirs.apply(variables, x), rtol=1e-5, atol=1e-5
    )
    g_ours = jax.grad(loss, argnums=(0, 1))(variables, x, ours)
    g_theirs = jax.grad(loss, argnums=(0, 1))(variables, x, theirs)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)

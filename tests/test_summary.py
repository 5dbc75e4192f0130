"""The parameter counts and the layer table of `--summary` (shapes only: no compiles)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax import summary
from cnn_jax.models import create_model, layers


def test_param_counts_split_params_and_batch_stats():
    variables = {
        'params': {'a': {'kernel': np.zeros((3, 3, 2, 4)), 'bias': np.zeros(4)}},
        'batch_stats': {'bn': {'mean': np.zeros(4), 'var': np.ones(4)}},
        'intermediates': {'x': np.zeros(100)},  # Neither parameters nor state.
    }
    assert summary.param_counts(variables) == (76, 76, 0, 8)
    counts = summary.param_counts({'params': {'w': jax.ShapeDtypeStruct((5, 7), jnp.float32)}})
    assert (counts.total, counts.trainable, counts.non_trainable) == (35, 35, 0)


def test_mnist_cnn_table_row_by_row():
    text = summary.layer_table(create_model('mnist_cnn', 10), (28, 28, 1))
    lines = text.splitlines()
    assert lines[1].split('  ')[0] == 'Layer (type)'
    assert [c.strip() for c in lines[1].split('  ') if c.strip()] == [
        'Layer (type)', 'Output Shape', 'Param #', 'Formula #', 'BN stats #',
    ]  # fmt: skip
    rows = [line.split() for line in lines[3:14]]
    assert [(r[1], ' '.join(r[2:-2]), r[-2], r[-1]) for r in rows] == [
        ('(Conv2d)', '[-1, 22, 22, 16]', '800', '800'),
        ('(ReLU)', '[-1, 22, 22, 16]', '0', '0'),
        ('(MaxPool2d)', '[-1, 21, 21, 16]', '0', '0'),
        ('(Conv2d)', '[-1, 17, 17, 8]', '3,208', '3,208'),
        ('(ReLU)', '[-1, 17, 17, 8]', '0', '0'),
        ('(MaxPool2d)', '[-1, 16, 16, 8]', '0', '0'),
        ('(Conv2d)', '[-1, 14, 14, 4]', '292', '292'),
        ('(ReLU)', '[-1, 14, 14, 4]', '0', '0'),
        ('(AvgPool2d)', '[-1, 7, 7, 4]', '0', '0'),
        ('(Flatten)', '[-1, 196]', '0', '0'),
        ('(Linear)', '[-1, 10]', '1,970', '1,970'),
    ]
    assert lines[-3:] == [
        'Total params: 6,270',
        'Trainable params: 6,270',
        'Non-trainable params: 0',
    ]


def test_resnet18_table_totals_and_batch_norm_state():
    text = summary.layer_table(create_model('resnet18', 1000), (1, 224, 224, 3))
    assert text.splitlines()[-3:] == [
        'Total params: 11,689,512',  # torchvision's count: BN statistics are not parameters.
        'Trainable params: 11,689,512',
        'Non-trainable params: 0',
    ]
    assert 'Batch-norm statistics (state, not parameters): 9,600' in text
    rows = {line.split()[0]: line for line in text.splitlines()}
    assert rows['conv1'].split()[-2:] == ['9,408', '9,408']
    # BN: 2C trainable (scale, shift) and 2C running statistics, shown in their own column.
    assert rows['layer4_1/bn2'].split()[-3:] == ['1,024', '1,024', '1,024']
    assert '[-1, 56, 56, 64]' in rows['maxpool']
    assert '[-1, 7, 7, 512]' in rows['layer4_1/conv2']
    assert rows['fc'].split()[-2:] == ['513,000', '513,000']


def test_layer_rows_name_dropout_and_batch_norm_kinds():
    rows = summary.layer_rows(create_model('cifar_cnn4', 10), (32, 32, 3))[0]
    kinds = [r.kind for r in rows]
    assert kinds[:5] == ['Conv2d', 'BatchNorm2d', 'Dropout2d', 'LeakyReLU', 'MaxPool2d']
    assert kinds[-5:] == ['Linear', 'BatchNorm1d', 'Dropout', 'LeakyReLU', 'Linear']
    assert sum(r.trainable for r in rows) == 8_334_666
    assert sum(r.non_trainable for r in rows) == 4_992


class _BadConv(nn.Conv):
    """A conv that smuggles in a parameter the conv formula does not know about."""

    @nn.compact
    def __call__(self, x):
        self.param('extra', nn.initializers.zeros, (3,))
        return super().__call__(x)


class _CroppingConv(nn.Conv):
    """A conv whose output is not the size the formula predicts."""

    def __call__(self, x):
        return super().__call__(x)[:, 1:]


class _Net(nn.Module):
    conv: type[nn.Conv] = nn.Conv

    @nn.compact
    def __call__(self, x, *, train):
        x = self.conv(4, (3, 3), padding='VALID')(x)
        x = layers.Flatten()(x)
        return nn.Dense(2)(x)


def test_a_count_that_breaks_its_formula_is_an_error():
    assert summary.layer_rows(_Net(), (6, 6, 1))[0][0].formula == (40, 0)
    with pytest.raises(summary.ParamCountMismatch, match='Conv_0.*43 parameters.*formula gives 40'):
        summary.layer_table(_Net(_BadConv), (6, 6, 1))
    with pytest.raises(summary.ParamCountMismatch, match=r'output size \(3, 4\).*\(4, 4\)'):
        summary.layer_table(_Net(_CroppingConv), (6, 6, 1))


class _WithOwnParam(nn.Module):
    """A composite module holding a parameter itself, and a layer without a formula."""

    @nn.compact
    def __call__(self, x, *, train):
        scale = self.param('scale', nn.initializers.ones, (1,))
        x = nn.LayerNorm()(x * scale)
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


def test_parameters_outside_leaf_layers_are_not_lost():
    rows = summary.layer_rows(_WithOwnParam(), (2, 2, 1))[0]
    assert [(r.name, r.kind, r.trainable, r.formula) for r in rows] == [
        ('LayerNorm_0', 'LayerNorm', 2, None),
        ('Dense_0', 'Linear', 15, (15, 0)),
        ('(non-leaf modules)', '-', 1, None),
    ]
    text = summary.layer_table(_WithOwnParam(), (2, 2, 1))
    assert 'Total params: 18' in text
    assert text.splitlines()[3].split()[-2:] == ['2', '-']  # No formula for LayerNorm.

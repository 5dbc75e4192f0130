"""Max pooling's formulations (cnn_jax.models.pooling) compute reduce_window's values and
gradients, ties and NaN included, and the CPU's one is chosen on the CPU only.

Inputs are small integers, so windows hold ties and every gradient sum is exact: the
comparisons are exact equality.
"""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cnn_jax.models import pooling

# (window, strides, padding): kernels 1-7 and a 144-tap window (int32 winners), strides 1
# and 2, VALID, SAME, torch's int padding and explicit uneven pairs.
CASES = [
    *(
        ((k, k), (s, s), padding)
        for k, s, padding in itertools.product((1, 3, 5, 7), (1, 2), ('VALID', 'SAME'))
    ),
    ((3, 3), (2, 2), 1),
    ((5, 3), (2, 1), ((2, 1), (0, 1))),
    ((7, 7), (2, 2), 3),
    ((12, 12), (2, 2), 'SAME'),
]


def _pairs(x, window, strides, padding):
    if isinstance(padding, int):
        return ((padding, padding),) * 2
    if isinstance(padding, str):
        return jax.lax.padtype_to_pads(x.shape[1:3], window, strides, padding)
    return padding


def _data(shape, dtype=jnp.float32, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(-3, 4, size=shape), dtype)


def _value_and_grads(pool, x):
    """pool(x) and the gradient of its sum weighted by integers, compiled."""
    weights = _data(jax.eval_shape(pool, x).shape, x.dtype, seed=1)

    def value_and_grads(v):
        y, vjp = jax.vjp(pool, v)
        return y, vjp(weights)[0]

    return jax.jit(value_and_grads)(x)


@pytest.mark.parametrize('window,strides,padding', CASES)
@pytest.mark.parametrize('shape', [(2, 13, 11, 3), (1, 15, 15, 512)])
def test_window_max_equals_reduce_window_with_ties(window, strides, padding, shape):
    x = _data(shape)
    pads = _pairs(x, window, strides, padding)
    ours = _value_and_grads(lambda v: pooling.window_max(v, window, strides, pads), x)
    reference = _value_and_grads(lambda v: nn.max_pool(v, window, strides, pads), x)
    for a, b in zip(ours, reference, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize('window,strides,padding', [((3, 3), (2, 2), 1), ((2, 2), (1, 1), 0)])
def test_max_pool_on_cpu_runs_window_max_with_reduce_windows_gradient(
    window, strides, padding, dtype
):
    """The module, as the models call it: each gradient goes to the window's first maximum,
    where `_strided_max` (other platforms) shares it among the ties."""
    pool = pooling.MaxPool(window, strides, padding)
    x = _data((2, 9, 10, 4), dtype)
    grad = jax.grad(lambda v: jnp.sum(pool.apply({}, v).astype(jnp.float32)))
    assert 'name=_window_max_bwd' in str(jax.make_jaxpr(grad)(x))
    pads = _pairs(x, window, strides, padding)
    ours = _value_and_grads(lambda v: pool.apply({}, v), x)
    reference = _value_and_grads(lambda v: nn.max_pool(v, window, strides, pads), x)
    shared = _value_and_grads(lambda v: pooling._strided_max(v, window, strides, pads), x)
    for a, b in zip(ours, reference, strict=True):
        assert a.dtype == b.dtype == dtype
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(shared[1], reference[1])  # The ties are real.


def test_window_max_nan_wins_its_window_as_in_torch():
    torch = pytest.importorskip('torch')
    x = np.array(_data((1, 7, 7, 2)))
    x[0, 2, 3, 0] = x[0, 5, 5, 1] = np.nan
    g = np.asarray(_data((1, 4, 4, 2), seed=1))
    y, vjp = jax.vjp(lambda v: pooling.window_max(v, (3, 3), (2, 2), ((1, 1), (1, 1))), x)
    (dx,) = vjp(jnp.asarray(g))
    t = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    ty = torch.nn.functional.max_pool2d(t, 3, 2, 1)
    ty.backward(torch.tensor(g.transpose(0, 3, 1, 2)))
    np.testing.assert_array_equal(y, ty.detach().numpy().transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(dx, t.grad.numpy().transpose(0, 2, 3, 1))
    assert np.isnan(y).sum() == 2 + 4  # The windows that hold each NaN.


def test_vmapped_window_max_equals_each_variant():
    """A study's K variants are vmapped over the leading axis."""
    xs = _data((3, 2, 8, 9, 4))

    def pool(v):
        return pooling.window_max(v, (3, 3), (2, 2), ((1, 1), (1, 1)))

    ys, grads = jax.vmap(lambda v: _value_and_grads(pool, v))(xs)
    for k in range(3):
        y, grad = _value_and_grads(pool, xs[k])
        np.testing.assert_array_equal(ys[k], y)
        np.testing.assert_array_equal(grads[k], grad)


def test_window_max_is_the_cpu_choice_only():
    assert pooling.window_max_wins('cpu')
    assert not any(pooling.window_max_wins(p) for p in ('gpu', 'cuda', 'rocm', 'tpu'))

"""E9: the convolution arithmetic against scipy, flax and hand-worked values."""

import itertools

import flax.linen as nn
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage
from hypothesis import given, settings
from hypothesis import strategies as st

from cnn_jax import arithmetic

# --- Output sizes ------------------------------------------------------------------


def test_output_size_worked_examples():
    # O = (W - F + 2P) / S + 1: the classic examples (CS231n: 7x7 input, 3x3 filter).
    assert arithmetic.conv_output_size(7, 3, stride=1, padding=0) == 5
    assert arithmetic.conv_output_size(7, 3, stride=2, padding=0) == 3
    assert arithmetic.conv_output_size(227, 11, stride=4, padding=0) == 55  # AlexNet conv1.
    assert arithmetic.conv_output_size(224, 7, stride=2, padding=3) == 112  # ResNet stem.
    assert arithmetic.pool_output_size(112, 3, stride=2, padding=1) == 56  # ResNet max-pool.
    assert arithmetic.conv_output_size(32, 5, padding=2) == 32  # E10.
    assert arithmetic.conv_output_size(5, 3, dilation=2) == 1
    # E3 at 28x28: conv 7, max-pool 2/1, conv 5, max-pool 2/1, conv 3, avg-pool 2/2.
    sizes = [28]
    for op, k, s in [('c', 7, 1), ('p', 2, 1), ('c', 5, 1), ('p', 2, 1), ('c', 3, 1), ('p', 2, 2)]:
        f = arithmetic.conv_output_size if op == 'c' else arithmetic.pool_output_size
        sizes.append(f(sizes[-1], k, s))
    assert sizes == [28, 22, 21, 17, 16, 14, 7]


def test_pool_stride_defaults_to_window_and_ceil_mode():
    assert arithmetic.pool_output_size(13, 2) == 6
    assert arithmetic.pool_output_size(13, 2, ceil_mode=True) == 7
    # torch drops a last window that would start in the right padding.
    assert arithmetic.pool_output_size(4, 2, stride=2, padding=1, ceil_mode=True) == 3


def test_output_size_rejects_impossible_layers():
    with pytest.raises(ValueError, match='larger than the padded input'):
        arithmetic.conv_output_size(3, 5)
    with pytest.raises(ValueError, match='stride must be >= 1'):
        arithmetic.conv_output_size(8, 3, stride=0)
    with pytest.raises(ValueError, match="'valid' or 'same'"):
        arithmetic.conv_output_size(8, 3, padding='full')


def test_same_padding_keeps_the_size():
    for k in (1, 3, 5, 7, 11):
        p = arithmetic.same_padding(k)
        assert p == (k - 1) // 2
        assert arithmetic.conv_output_size(17, k, padding=p) == 17
    assert arithmetic.same_padding(3, dilation=2) == 2
    with pytest.raises(ValueError, match='even kernel'):
        arithmetic.same_padding(4)
    assert arithmetic.same_padding_pair(17, 4) == (1, 2)
    assert arithmetic.conv_output_size(17, 4, padding=(1, 2)) == 17


def test_kernel_size_explains_the_output():
    assert arithmetic.kernel_size_for(28, 22) == 7
    assert arithmetic.kernel_size_for(32, 32, padding=2) == 5
    assert arithmetic.kernel_size_for(224, 112, stride=2, padding=3) == 8  # 7 floors to it too.
    for w, f, s, p in itertools.product((9, 16, 31), (1, 2, 3, 5), (1, 2, 3), (0, 1, 2)):
        o = arithmetic.conv_output_size(w, f, s, p)
        k = arithmetic.kernel_size_for(w, o, s, p)
        assert arithmetic.conv_output_size(w, k, s, p) == o
        assert f <= k < f + s
    with pytest.raises(ValueError, match='no kernel'):
        arithmetic.kernel_size_for(8, 20)


# Grid of input sizes, kernels, strides and paddings against what flax produces.
GRID = list(itertools.product((7, 8, 15), (1, 2, 3, 5), (1, 2, 3), (0, 1, 2, 'same', 'valid')))


def _flax_padding(p):
    return p.upper() if isinstance(p, str) else ((p, p), (p, p))


def test_conv_output_size_matches_flax_conv():
    # nn.Conv.init traced with jax.eval_shape: shapes only, no arithmetic on the CPU.
    for w, k, s, p in GRID:
        if isinstance(p, int) and w + 2 * p < k:
            continue
        conv = nn.Conv(1, (k, k), strides=(s, s), padding=_flax_padding(p))
        x = jax.ShapeDtypeStruct((1, w, w + 1, 1), jnp.float32)
        out = jax.eval_shape(lambda x, conv=conv: conv.init_with_output(jax.random.key(0), x)[0], x)
        expected = (
            arithmetic.conv_output_size(w, k, s, p),
            arithmetic.conv_output_size(w + 1, k, s, p),
        )
        assert out.shape[1:3] == expected, (w, k, s, p)


@pytest.mark.parametrize('pool', [nn.max_pool, nn.avg_pool])
def test_pool_output_size_matches_flax_pooling(pool):
    for w, k, s, p in GRID:
        if isinstance(p, int) and (w + 2 * p < k or p >= k):
            continue
        x = jax.ShapeDtypeStruct((1, w, w, 1), jnp.float32)
        out = jax.eval_shape(lambda x, k=k, s=s, p=p: pool(x, (k, k), (s, s), _flax_padding(p)), x)
        assert out.shape[1] == arithmetic.pool_output_size(w, k, s, p), (w, k, s, p)


# --- Parameter counts --------------------------------------------------------------


def test_parameter_formulas():
    assert arithmetic.conv_params(3, 3, 64) == 1_792  # VGG conv1_1.
    assert arithmetic.conv_params(7, 3, 64, use_bias=False) == 9_408  # ResNet stem.
    assert arithmetic.conv_params((1, 1), 256, 512, use_bias=False) == 131_072
    assert arithmetic.conv_params(3, 32, 32, groups=32) == 320  # Depthwise.
    assert arithmetic.dense_params(576, 120) == 69_240  # SimpleNN fc1.
    assert arithmetic.dense_params(512, 1000) == 513_000
    assert arithmetic.dense_params(10, 10, use_bias=False) == 100
    bn = arithmetic.batchnorm_params(64)
    assert (bn.trainable, bn.non_trainable, bn.total) == (128, 128, 256)
    assert arithmetic.batchnorm_params(64, use_scale=False) == (64, 128)
    with pytest.raises(ValueError, match='groups'):
        arithmetic.conv_params(3, 6, 4, groups=4)


def test_conv_and_dense_formulas_match_flax():
    for k, cin, cout, bias in [(3, 3, 8, True), (5, 4, 2, False), ((1, 3), 6, 5, True)]:
        ks = (k, k) if isinstance(k, int) else k
        params = jax.eval_shape(
            nn.Conv(cout, ks, use_bias=bias).init, jax.random.key(0), jnp.zeros((1, 8, 8, cin))
        )
        n = sum(np.prod(p.shape) for p in jax.tree.leaves(params))
        assert n == arithmetic.conv_params(k, cin, cout, bias)
    params = jax.eval_shape(nn.Dense(7).init, jax.random.key(0), jnp.zeros((1, 13)))
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == arithmetic.dense_params(13, 7)


# --- True convolution ---------------------------------------------------------------


def test_conv2d_worked_example_flips_the_kernel():
    image = np.arange(9).reshape(3, 3)
    kernel = np.array([[1, 0], [0, 0]])  # Convolution shifts by the 1's offset; no flip would not.
    np.testing.assert_array_equal(
        arithmetic.conv2d(image, kernel, padding='valid'), [[4, 5], [7, 8]]
    )
    np.testing.assert_array_equal(
        arithmetic.conv2d(image, np.array([[0, 0], [0, 1]]), padding='valid'), [[0, 1], [3, 4]]
    )
    full = arithmetic.conv2d(np.ones((2, 2), int), np.ones((2, 2), int), padding='full')
    np.testing.assert_array_equal(full, [[1, 2, 1], [2, 4, 2], [1, 2, 1]])


@pytest.mark.parametrize('seed', range(5))
def test_conv2d_matches_scipy_ndimage_convolve(seed):
    rng = np.random.default_rng(seed)
    for kh, kw in [(1, 1), (3, 3), (5, 3), (2, 2), (4, 3), (2, 5)]:
        image = rng.integers(-9, 10, size=(rng.integers(5, 12), rng.integers(5, 12)))
        kernel = rng.integers(-5, 6, size=(kh, kw))
        expected = scipy.ndimage.convolve(image, kernel, mode='constant', cval=0)
        got = arithmetic.conv2d(image, kernel, padding='same')
        assert got.dtype.kind == 'i'
        np.testing.assert_array_equal(got, expected)


def test_conv2d_stride_and_padding_shapes_follow_the_formula():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 5, size=(11, 11))
    kernel = rng.integers(0, 5, size=(3, 3))
    for stride, pad in itertools.product((1, 2, 3), (0, 1, 2)):
        out = arithmetic.conv2d(image, kernel, padding=pad, stride=stride)
        n = arithmetic.conv_output_size(11, 3, stride, pad)
        assert out.shape == (n, n)
    # Stride subsamples the stride-1 result.
    np.testing.assert_array_equal(
        arithmetic.conv2d(image, kernel, padding=1, stride=2),
        arithmetic.conv2d(image, kernel, padding=1)[::2, ::2],
    )


def test_conv2d_equals_flax_conv_with_flipped_kernel():
    # A deep-learning "conv" is a cross-correlation: it equals the true one on a flipped kernel.
    rng = np.random.default_rng(1)
    image = rng.normal(size=(9, 9)).astype(np.float32)
    kernel = rng.normal(size=(3, 3)).astype(np.float32)
    conv = nn.Conv(1, (3, 3), padding='SAME', use_bias=False)
    params = {'params': {'kernel': jnp.asarray(kernel[::-1, ::-1, None, None])}}
    out = conv.apply(params, jnp.asarray(image[None, :, :, None]))[0, :, :, 0]
    np.testing.assert_allclose(out, arithmetic.conv2d(image, kernel), rtol=1e-5, atol=1e-5)


# --- Softmax ------------------------------------------------------------------------

logits_strategy = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 4), st.integers(2, 10)),
    elements=st.floats(-50, 50, allow_nan=False),
)


@settings(max_examples=50, deadline=None)
@given(logits=logits_strategy, shift=st.floats(-1e3, 1e3, allow_nan=False))
def test_softmax_is_shift_invariant(logits, shift):
    p = arithmetic.softmax(logits)
    np.testing.assert_allclose(arithmetic.softmax(logits + shift), p, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(p.sum(axis=-1), 1.0, rtol=1e-12)
    # jax.nn.softmax, which the losses use, has the same invariance (float32 tolerance).
    q = jax.nn.softmax(jnp.asarray(logits + shift, jnp.float32))
    np.testing.assert_allclose(q, p, atol=1e-3)

"""The CPU formulation of ReLU equals nn.relu in values and gradients; chosen on CPU only."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cnn_jax.models import layers


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

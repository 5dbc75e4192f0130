"""The six-conv CIFAR-10 CNN of E4 and the options its four ablations vary.

conv1 3x3 6ch; max-pool 2x2; conv2 3x3 8ch; conv3..conv5 1x1 with 10, 12, 14ch; norm;
conv6 1x1 16ch; flatten (13x13x16 = 2704 at 32x32) -> Dense 1024 -> Dense 512 -> norm ->
Dense 256 -> Dense C. `activation` follows every conv (the ablation of E4.3);
`dense_activation` every hidden dense layer. `norm` is E4.2: 'batchnorm' (the reference
model) or 'dropout' (Dropout2d in place of the conv BN, Dropout in place of the dense BN).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.models.layers import Activation, FastConv, Flatten, normalize
from cnn_jax.models.pooling import MaxPool


class CifarCNN6(nn.Module):
    """E4's network; each norm sits between its layer and that layer's activation."""

    num_classes: int
    activation: str = 'relu'
    dense_activation: str = 'relu'
    norm: str = 'batchnorm'
    norm_rate: float = 0.5  # Dropout rate of norm='dropout' (torch's default p).
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        def norm(x: jax.Array) -> jax.Array:
            return normalize(x, self.norm, train=train, rate=self.norm_rate, dtype=self.dtype)

        conv = functools.partial(nn.Conv, dtype=self.dtype, conv_general_dilated_cls=FastConv)
        x = x.astype(self.dtype)
        x = conv(6, (3, 3), padding='VALID')(x)
        x = Activation(self.activation)(x)
        x = MaxPool()(x)
        x = conv(8, (3, 3), padding='VALID')(x)
        x = Activation(self.activation)(x)
        for f in (10, 12, 14):
            x = conv(f, (1, 1))(x)
            if f == 14:
                x = norm(x)
            x = Activation(self.activation)(x)
        x = conv(16, (1, 1))(x)
        x = Activation(self.activation)(x)
        x = Flatten()(x)
        for f in (1024, 512, 256):
            x = nn.Dense(f, dtype=self.dtype)(x)
            if f == 512:
                x = norm(x)
            x = Activation(self.dense_activation)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return x.astype(jnp.float32)

"""A small CNN for quick runs (the quickstart on 8x8 digits, tests)."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cnn_jax.models.batch_norm import batch_norm
from cnn_jax.models.layers import FastConv


class SmallCNN(nn.Module):
    """conv3x3(same)+BN+ReLU blocks, each followed by 2x2 max-pool while the map allows.

    Then flatten, a dense layer, dropout and a dense classifier.
    """

    num_classes: int
    features: Sequence[int] = (32, 64)
    dense: int = 128
    dropout_rate: float = 0.0
    use_bn: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        x = x.astype(self.dtype)
        for f in self.features:
            x = nn.Conv(
                f,
                (3, 3),
                padding='SAME',
                use_bias=not self.use_bn,
                dtype=self.dtype,
                conv_general_dilated_cls=FastConv,
            )(x)
            if self.use_bn:
                x = batch_norm(train, self.dtype)(x)
            x = nn.relu(x)
            if x.shape[1] >= 4:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(self.dense, dtype=self.dtype)(x)
        x = nn.relu(x)
        x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return x.astype(jnp.float32)

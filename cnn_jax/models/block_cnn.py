"""Plain CNNs of conv blocks and a dense head: SimpleNN (E6), the three-block CNN (E10)
and the improved CNN (E11) are three settings of one module.

Block i: conv kernel_sizes[i] with features[i] channels (padding 'same': torch's k // 2 on
each side, 'valid': none), norm, activation, 2x2 max-pool. Then flatten, one Dense per
entry of `hidden` (each followed by dense_norm, the activation and classifier dropout at
dropout_rate), and Dense C.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.errors import ConfigError
from cnn_jax.models.layers import Activation, FastConv, Flatten, dropout, normalize
from cnn_jax.models.pooling import MaxPool


class BlockCNN(nn.Module):
    """conv-norm-act-pool blocks, then dense-norm-act-dropout layers, then the classifier."""

    num_classes: int
    features: Sequence[int] = (32, 64, 128)
    kernel_sizes: Sequence[int] = (5, 5, 5)
    padding: str = 'same'  # 'same' | 'valid'
    hidden: Sequence[int] = (64,)
    activation: str = 'relu'
    norm: str = 'none'  # After each conv; see layers.NORMS ('dropout' = Dropout2d).
    norm_rate: float = 0.0
    dense_norm: str = 'none'  # After each hidden dense layer.
    dense_norm_rate: float = 0.0
    dropout_rate: float = 0.0  # Classifier dropout after each hidden activation.
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        if self.padding not in ('same', 'valid'):
            raise ConfigError(f"padding must be 'same' or 'valid', got {self.padding!r}")
        x = x.astype(self.dtype)
        conv = functools.partial(nn.Conv, dtype=self.dtype, conv_general_dilated_cls=FastConv)
        for f, k in zip(self.features, self.kernel_sizes, strict=True):
            p = k // 2 if self.padding == 'same' else 0
            x = conv(f, (k, k), padding=((p, p), (p, p)))(x)
            x = normalize(x, self.norm, train=train, rate=self.norm_rate, dtype=self.dtype)
            x = Activation(self.activation)(x)
            x = MaxPool()(x)
        x = Flatten()(x)
        for f in self.hidden:
            x = nn.Dense(f, dtype=self.dtype)(x)
            x = normalize(
                x, self.dense_norm, train=train, rate=self.dense_norm_rate, dtype=self.dtype
            )
            x = Activation(self.activation)(x)
            if self.dropout_rate:
                x = dropout(x, self.dropout_rate, train=train)
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return x.astype(jnp.float32)


# E6: conv 5x5 8ch, M, conv 3x3 16ch, M (VALID), 576 -> 120 -> 84 -> C. norm='batchnorm'
# is the BN ablation, activation='swish' the Swish one.
SimpleNN = functools.partial(
    BlockCNN, features=(8, 16), kernel_sizes=(5, 3), padding='valid', hidden=(120, 84)
)
# E10: three 5x5 'same' blocks of 32, 64, 128ch; 4x4x128 -> 64 -> C.
CifarCNN3 = functools.partial(
    BlockCNN, features=(32, 64, 128), kernel_sizes=(5, 5, 5), padding='same', hidden=(64,)
)
# E11: four 3x3 'same' blocks of 128..1024ch with BN + Dropout2d 0.05 + LeakyReLU;
# 2x2x1024 -> 512 -> 64 (each BN + Dropout 0.05 + LeakyReLU) -> C.
CifarCNN4 = functools.partial(
    BlockCNN,
    features=(128, 256, 512, 1024),
    kernel_sizes=(3, 3, 3, 3),
    padding='same',
    hidden=(512, 64),
    activation='leaky_relu',
    norm='batchnorm_dropout',
    norm_rate=0.05,
    dense_norm='batchnorm_dropout',
    dense_norm_rate=0.05,
)

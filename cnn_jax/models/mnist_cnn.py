"""The MNIST CNN of E3: three convs with shrinking channel counts and mixed pooling.

conv 7x7 16ch, max-pool 2x2 stride 1; conv 5x5 8ch, max-pool 2x2 stride 1; conv 3x3 4ch,
avg-pool 2x2 stride 2; flatten; Dense C. All convs VALID, each followed by the activation.
At 28x28x1 the maps are 22, 21, 17, 16, 14, 7 pixels wide, so Dense sees 7x7x4 = 196.
The report's softmax output is the loss's job here: the module returns logits.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.models.layers import Activation, FastConv, Flatten, normalize
from cnn_jax.models.pooling import AvgPool, MaxPool


class MnistCNN(nn.Module):
    """E3's CNN; `features` and `kernel_sizes` give the three convs."""

    num_classes: int
    features: Sequence[int] = (16, 8, 4)
    kernel_sizes: Sequence[int] = (7, 5, 3)
    activation: str = 'relu'
    norm: str = 'none'  # After each conv; see layers.NORMS.
    norm_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = x.astype(self.dtype)
        last = len(self.features) - 1
        for i, (f, k) in enumerate(zip(self.features, self.kernel_sizes, strict=True)):
            x = nn.Conv(
                f, (k, k), padding='VALID', dtype=self.dtype, conv_general_dilated_cls=FastConv
            )(x)
            x = normalize(x, self.norm, train=train, rate=self.norm_rate, dtype=self.dtype)
            x = Activation(self.activation)(x)
            # Overlapping max-pools keep the map large; the last pool halves it.
            x = AvgPool((2, 2), (2, 2))(x) if i == last else MaxPool((2, 2), (1, 1))(x)
        x = Flatten()(x)
        x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
        return x.astype(jnp.float32)

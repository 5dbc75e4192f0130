"""VGG-11/13/16/19 (Simonyan & Zisserman, 2015) for any input size and class count (E1).

The convolutional part is a layer list: an int is a 3x3 conv (padding 1) with that many
channels, 'M' a 2x2 max-pool. The classifier flattens the last map directly (2x2x512 at
64x64 input, as in E1; no adaptive pooling) into Dense 4096, act, Dropout, Dense 4096,
act, Dropout, Dense C.
"""

import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cnn_jax.models.layers import Activation, FastConv, Flatten, dropout, normalize
from cnn_jax.models.pooling import MaxPool

# torchvision's initialisation: without BN, VGG trains from scratch only if the signal keeps
# its scale through 13+ ReLU layers (flax's lecun_normal default halves it at each one).
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')
_dense_init = nn.initializers.normal(0.01)

# torchvision's configurations 'A', 'B', 'D', 'E': channels of 3x3 convs, M = max-pool.
_SPECS = {
    'vgg11': '64 M 128 M 256 256 M 512 512 M 512 512 M',
    'vgg13': '64 64 M 128 128 M 256 256 M 512 512 M 512 512 M',
    'vgg16': '64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512 M',
    'vgg19': '64 64 M 128 128 M 256 256 256 256 M 512 512 512 512 M 512 512 512 512 M',
}
VGG_LAYERS: dict[str, tuple[int | str, ...]] = {
    name: tuple(t if t == 'M' else int(t) for t in spec.split()) for name, spec in _SPECS.items()
}


class VGG(nn.Module):
    """VGG by layer list; `norm` after every conv ('batchnorm': torchvision's vgg*_bn).

    Convs keep their bias under BN, as torchvision's do, so counts match its models.
    """

    num_classes: int
    layers: Sequence[int | str] = VGG_LAYERS['vgg16']
    hidden: int = 4096
    dropout_rate: float = 0.5  # Classifier dropout; E1's base rung sets 0.
    norm: str = 'none'  # See layers.NORMS; 'dropout' is Dropout2d at rate norm_rate.
    norm_rate: float = 0.0
    activation: str = 'relu'
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        x = x.astype(self.dtype)
        for layer in self.layers:
            if layer == 'M':
                x = MaxPool()(x)
                continue
            x = nn.Conv(
                int(layer), (3, 3), padding=((1, 1), (1, 1)), kernel_init=_conv_init,
                dtype=self.dtype, conv_general_dilated_cls=FastConv,
            )(x)  # fmt: skip
            x = normalize(x, self.norm, train=train, rate=self.norm_rate, dtype=self.dtype)
            x = Activation(self.activation)(x)
        x = Flatten()(x)
        for _ in range(2):
            x = nn.Dense(self.hidden, kernel_init=_dense_init, dtype=self.dtype)(x)
            x = Activation(self.activation)(x)
            x = dropout(x, self.dropout_rate, train=train)
        x = nn.Dense(self.num_classes, kernel_init=_dense_init, dtype=self.dtype)(x)
        return x.astype(jnp.float32)


VGG11 = functools.partial(VGG, layers=VGG_LAYERS['vgg11'])
VGG13 = functools.partial(VGG, layers=VGG_LAYERS['vgg13'])
VGG16 = functools.partial(VGG, layers=VGG_LAYERS['vgg16'])
VGG19 = functools.partial(VGG, layers=VGG_LAYERS['vgg19'])

"""The model zoo: every network of the experiments, chosen by `config.model`.

Every model is a Flax linen module called as `model.apply(variables, images, train=...)`
on NHWC float images and returning float32 logits of shape (batch, num_classes).
Batch-norm statistics live in the 'batch_stats' collection; dropout draws from the
'dropout' RNG stream. `dtype` is the compute dtype; parameters stay float32.
"""

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from cnn_jax.errors import ConfigError
from cnn_jax.models import block_cnn, resnet, vgg
from cnn_jax.models.cifar_cnn6 import CifarCNN6
from cnn_jax.models.mnist_cnn import MnistCNN
from cnn_jax.models.small_cnn import SmallCNN

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}

# name -> module class or functools.partial alias; config.model picks one.
MODELS: dict[str, Callable[..., nn.Module]] = {
    'small_cnn': SmallCNN,
    'vgg': vgg.VGG,
    'vgg11': vgg.VGG11,
    'vgg13': vgg.VGG13,
    'vgg16': vgg.VGG16,
    'vgg19': vgg.VGG19,
    'resnet': resnet.ResNet,
    'resnet18': resnet.ResNet18,
    'resnet34': resnet.ResNet34,
    'resnet50': resnet.ResNet50,
    'resnet20': resnet.ResNet20,
    'resnet32': resnet.ResNet32,
    'resnet44': resnet.ResNet44,
    'resnet56': resnet.ResNet56,
    'resnet110': resnet.ResNet110,
    'mnist_cnn': MnistCNN,
    'cifar_cnn6': CifarCNN6,
    'block_cnn': block_cnn.BlockCNN,
    'simplenn': block_cnn.SimpleNN,
    'cifar_cnn3': block_cnn.CifarCNN3,
    'cifar_cnn4': block_cnn.CifarCNN4,
}


def create_model(
    name: str, num_classes: int, dtype: Any = jnp.float32, **options: Any
) -> nn.Module:
    """Builds model `name` with `num_classes` outputs; `options` are its fields."""
    if name not in MODELS:
        raise ConfigError(f'unknown model {name!r}; known models: {", ".join(sorted(MODELS))}')
    try:
        return MODELS[name](num_classes=num_classes, dtype=dtype, **options)
    except TypeError as e:
        raise ConfigError(f'bad model_options for model {name!r}: {e}') from None


def build_model(config: ml_collections.ConfigDict, num_classes: int) -> nn.Module:
    """The Flax module for config.model with config.model_options and config.dtype."""
    if config.dtype not in DTYPES:
        raise ConfigError(f'unknown dtype {config.dtype!r}; known: {", ".join(DTYPES)}')
    options = config.model_options.to_dict()
    return create_model(config.model, num_classes, DTYPES[config.dtype], **options)

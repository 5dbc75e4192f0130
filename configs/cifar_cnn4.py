"""E11: the improved CIFAR-10 CNN (four conv blocks with BN, Dropout2d 0.05, LeakyReLU).

Plain SGD, lr 0.05, batch 64, random crops (4-pixel padding) and horizontal flips, early
stopping on validation loss. Reported: test 0.811 (0.770 before the changes, E10).

    python launch.py --config=configs/cifar_cnn4.py --workdir=results/cifar_cnn4
    python launch.py --config=configs/cifar_cnn4.py --summary

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/cifar_cnn4.py --workdir=results/cifar_cnn4 \
        --config.dataset=folder:DIR
"""

import ml_collections

from cnn_jax.errors import ConfigError
from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ConfigError(f'cifar_cnn4.py has no variant {arg!r}')
    c = default.get_config()
    c.dataset = 'cifar10'
    c.val_fraction = 0.1
    c.augment.flip = True
    c.augment.crop_padding = 4

    c.model = 'cifar_cnn4'
    c.init = 'torch'  # The report's PyTorch layers, default-initialised.
    c.model_options.activation = 'leaky_relu'
    c.model_options.norm_rate = 0.05
    c.model_options.dense_norm_rate = 0.05

    c.num_epochs = 100
    c.batch_size = 64
    c.optimizer = 'sgd'
    c.learning_rate = 5e-2
    c.early_stopping.monitor = 'val_loss'
    c.early_stopping.patience = 5
    c.best_metric = 'val_loss'
    return c

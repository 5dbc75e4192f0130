"""E10: the three-block CIFAR-10 CNN with early stopping on validation loss.

Plain SGD, lr 0.05, batch 64; training stops when the validation loss has not improved
for 3 epochs (the report stopped after epoch 7: train 0.757, val 0.734, test 0.756).

    python launch.py --config=configs/cifar_cnn3.py --workdir=results/cifar_cnn3
    python launch.py --config=configs/cifar_cnn3.py --summary

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/cifar_cnn3.py --workdir=results/cifar_cnn3 \
        --config.dataset=folder:DIR
"""

import ml_collections

from cnn_jax.errors import ConfigError
from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ConfigError(f'cifar_cnn3.py has no variant {arg!r}')
    c = default.get_config()
    c.dataset = 'cifar10'
    c.val_fraction = 0.1

    c.model = 'cifar_cnn3'
    c.init = 'torch'  # The report's PyTorch layers, default-initialised.

    c.num_epochs = 50
    c.batch_size = 64
    c.optimizer = 'sgd'
    c.learning_rate = 5e-2
    c.early_stopping.monitor = 'val_loss'
    c.early_stopping.patience = 3
    c.best_metric = 'val_loss'
    return c

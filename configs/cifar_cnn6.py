"""E4: the six-conv CIFAR-10 CNN in its best combination (Adam, BN, ReLU, cross-entropy).

20 epochs, test accuracy and loss after every epoch. The four ablations (optimiser,
normalisation, activation, loss) are the studies configs/ablations/cifar_cnn6_*.py; by
hand, e.g. --config.model_options.norm=dropout, --config.model_options.activation=tanh,
--config.loss=mse, --config.optimizer=sgd --config.learning_rate=0.01.

    python launch.py --config=configs/cifar_cnn6.py --workdir=results/cifar_cnn6
    python launch.py --config=configs/cifar_cnn6.py --summary

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/cifar_cnn6.py --workdir=results/cifar_cnn6 \
        --config.dataset=folder:DIR
"""

import ml_collections

from cnn_jax.errors import ConfigError
from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ConfigError(f'cifar_cnn6.py has no variant {arg!r}')
    c = default.get_config()
    c.dataset = 'cifar10'

    c.model = 'cifar_cnn6'
    c.init = 'torch'  # The report's PyTorch layers, default-initialised.
    c.model_options.activation = 'relu'
    c.model_options.norm = 'batchnorm'
    c.model_options.norm_rate = 0.5  # Used by norm='dropout' only.

    c.num_epochs = 20
    c.batch_size = 64
    c.optimizer = 'adam'
    c.learning_rate = 1e-3
    c.loss = 'cross_entropy'
    c.eval_test_each_epoch = True
    return c

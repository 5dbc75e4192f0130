"""E6: SimpleNN on CIFAR-10 with a train/validation split, at the reported best setting.

SGD with momentum 0.9, learning rate 0.01, L2 1e-4 (best validation accuracy about 0.73).
The ablations of E6-E7 (augmentation, BN, BN at lr 0.1, Swish, learning rate and L2
sweeps) are the studies configs/ablations/simplenn_*.py; by hand, e.g.
--config.model_options.norm=batchnorm, --config.model_options.activation=swish,
--config.augment.flip=True --config.augment.crop_padding=4.

Schedule: 20 epochs. EXPERIMENTS.md states none; 20 is E4's, and the base model peaks
well inside it (best validation accuracy at epoch 13 of 20, then overfits; see
results/reproduction/E6-E7). Augmented variants still rise at epoch 20 (crop+flip 0.685):
their rows are lower bounds, as results/REPRODUCTION.md says.

    python launch.py --config=configs/simplenn.py --workdir=results/simplenn
    python launch.py --config=configs/simplenn.py --summary

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/simplenn.py --workdir=results/simplenn \
        --config.dataset=folder:DIR
"""

import ml_collections

from cnn_jax.errors import ConfigError
from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ConfigError(f'simplenn.py has no variant {arg!r}')
    c = default.get_config()
    c.dataset = 'cifar10'
    c.val_fraction = 0.1

    c.model = 'simplenn'
    c.init = 'torch'  # The report's PyTorch layers, default-initialised.
    c.model_options.activation = 'relu'
    c.model_options.norm = 'none'

    c.num_epochs = 20
    c.batch_size = 64
    c.optimizer = 'momentum'
    c.learning_rate = 0.01
    c.momentum = 0.9
    c.weight_decay = 1e-4
    return c

"""E8: ResNet-20 on CIFAR-10 (He et al., 2016, section 4.2; 1x1 projection shortcuts).

The paper's recipe: SGD momentum 0.9, lr 0.1 divided by 10 at 32k and 48k iterations,
weight decay 1e-4, batch 128, 64k iterations (about 182 epochs on a 45k/5k split), random
crops of the 4-pixel-padded image and horizontal flips. Reported: validation accuracy
0.907; the paper's test error is 8.75%.

    python launch.py --config=configs/resnet20.py --workdir=results/resnet20
    python launch.py --config=configs/resnet20.py --summary

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/resnet20.py --workdir=results/resnet20 \
        --config.dataset=folder:DIR

Deeper CIFAR ResNets: --config.model=resnet32 (44, 56, 110).
"""

import ml_collections

from cnn_jax.errors import ConfigError
from configs import default


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg:
        raise ConfigError(f'resnet20.py has no variant {arg!r}')
    c = default.get_config()
    c.dataset = 'cifar10'
    c.val_fraction = 0.1
    c.augment.crop_padding = 4
    c.augment.flip = True

    c.model = 'resnet20'

    c.num_epochs = 182
    c.batch_size = 128
    c.optimizer = 'momentum'
    c.momentum = 0.9
    c.learning_rate = 0.1
    c.weight_decay = 1e-4
    c.schedule = 'step'
    c.step_epochs = (91, 136)
    c.step_factor = 0.1
    return c

"""E1: the report's VGG on 64x64 images of three classes, and its regularisation ladder.

The report calls its network VGG-16, but EXPERIMENTS.md lists ten 3x3 convs, two per
stage (64,64,M,128,128,M,256,256,M,512,512,M,512,512,M), then 2x2x512 -> Dense 4096 ->
Dense 4096 -> Dense C: that is torchvision's configuration 'B', VGG-13, which is what
this config builds (`--config.model=vgg16` trains torchvision's VGG-16 instead).

Each rung adds one thing to the one before, on the same data and seed:
base (no dropout) -> l2 (+ weight decay) -> dropout (+ classifier dropout 0.5) ->
early_stopping (+ early stopping on validation loss) -> augment (+ flip, rotation, scale).
Reported test accuracy: 90%, 92%, 90%, 91%, 93%.

    python launch.py --config=configs/vgg.py --workdir=results/vgg_base
    python launch.py --config=configs/vgg.py:augment --workdir=results/vgg_augment
    python launch.py --config=configs/vgg.py --summary

The data is three CIFAR-10 classes (dog, automobile, ship) resized to 64x64 (any image
folder with train/ and test/ class sub-folders works: --config.dataset=folder:DIR
--config.classes=None). Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/vgg.py:l2 --workdir=results/vgg_l2 \
        --config.dataset=folder:DIR
"""

import ml_collections

from cnn_jax.errors import ConfigError
from configs import default

# The ladder in order; each rung includes every earlier one.
RUNGS = ('base', 'l2', 'dropout', 'early_stopping', 'augment')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    rung = arg or 'base'
    if rung not in RUNGS:
        raise ConfigError(f'unknown vgg.py variant {rung!r}; known variants: {", ".join(RUNGS)}')
    c = default.get_config()
    c.name = f'vgg_e1_{rung}'
    c.dataset = 'cifar10'
    c.classes = ('dog', 'automobile', 'ship')
    c.image_size = 64

    c.model = 'vgg13'  # E1's ten-conv list; see the docstring.
    c.model_options.dropout_rate = 0.0

    c.num_epochs = 30
    c.batch_size = 64
    c.optimizer = 'momentum'
    c.learning_rate = 0.01
    c.momentum = 0.9
    c.best_metric = 'val_accuracy'

    level = RUNGS.index(rung)
    if level >= RUNGS.index('l2'):
        c.weight_decay = 5e-4
    if level >= RUNGS.index('dropout'):
        c.model_options.dropout_rate = 0.5
    if level >= RUNGS.index('early_stopping'):
        c.early_stopping.monitor = 'val_loss'
        c.early_stopping.patience = 5
    if level >= RUNGS.index('augment'):
        c.augment.flip = True
        c.augment.rotation_degrees = 10.0
        c.augment.scale = 0.1
    return c

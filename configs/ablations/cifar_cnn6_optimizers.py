"""E4.1: the six-conv CIFAR-10 CNN trained with SGD, SGD with momentum and Adam.

20 epochs each, test accuracy and loss after every epoch, all three on one plot. Reported:
Adam wins. Learning rates are PyTorch's usual ones: 0.01 for SGD (with and without
momentum 0.9), 1e-3 for Adam.

    python launch.py --config=configs/ablations/cifar_cnn6_optimizers.py \
        --workdir=results/cifar_cnn6_optimizers

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/ablations/cifar_cnn6_optimizers.py \
        --workdir=results/cifar_cnn6_optimizers \
        --config.dataset=folder:DIR

Writes summary.md, summary.json and comparison.png in the workdir (one sub-folder per
variant); `--config.only=<variant>` runs one variant, `--config.study.seeds='(0,1,2)'`
gives mean +- std over seeds.
"""

import ml_collections

from configs import cifar_cnn6
from configs.ablations import make_study


def get_config() -> ml_collections.ConfigDict:
    return make_study(
        cifar_cnn6.get_config(),
        'cifar_cnn6_optimizers',
        [
            ('sgd', {'optimizer': 'sgd', 'learning_rate': 0.01}),
            ('momentum', {'optimizer': 'momentum', 'learning_rate': 0.01, 'momentum': 0.9}),
            ('adam', {'optimizer': 'adam', 'learning_rate': 1e-3}),
        ],
        plot_metric='test_accuracy',
        description='E4.1: which optimiser trains the six-conv CNN best? (Reported: Adam.)',
    )

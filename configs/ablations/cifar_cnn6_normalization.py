"""E4.2: the six-conv CIFAR-10 CNN with batch norm vs with dropout in its place.

`dropout` puts Dropout2d (p=0.5) where the conv BN was and Dropout (p=0.5) where the dense
BN was. 20 epochs each, test accuracy and loss per epoch. Reported: BN wins.

    python launch.py --config=configs/ablations/cifar_cnn6_normalization.py \
        --workdir=results/cifar_cnn6_normalization

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/ablations/cifar_cnn6_normalization.py \
        --workdir=results/cifar_cnn6_normalization \
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
        'cifar_cnn6_normalization',
        [
            ('batchnorm', {'model_options.norm': 'batchnorm'}),
            ('dropout', {'model_options.norm': 'dropout', 'model_options.norm_rate': 0.5}),
        ],
        plot_metric='test_accuracy',
        description='E4.2: batch norm or dropout in the six-conv CNN? (Reported: BN.)',
    )

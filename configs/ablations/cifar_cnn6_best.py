"""E4: the run of the best combination (Adam, BN, ReLU, cross-entropy), over three seeds.

The winners of the four ablations together (configs/cifar_cnn6.py is this combination; the
overrides spell it out). 20 epochs, test accuracy and loss per epoch; the table gives mean
+- std over seeds 0, 1, 2.

    python launch.py --config=configs/ablations/cifar_cnn6_best.py \
        --workdir=results/cifar_cnn6_best

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/ablations/cifar_cnn6_best.py \
        --workdir=results/cifar_cnn6_best \
        --config.dataset=folder:DIR

Writes summary.md, summary.json and comparison.png in the workdir (one sub-folder per
variant); `--config.only=<variant>` runs one variant, `--config.study.seeds='(0,1,2)'`
gives mean +- std over seeds.
"""

import ml_collections

from configs import cifar_cnn6
from configs.ablations import make_study

BEST = {
    'optimizer': 'adam',
    'learning_rate': 1e-3,
    'model_options.norm': 'batchnorm',
    'model_options.activation': 'relu',
    'loss': 'cross_entropy',
}


def get_config() -> ml_collections.ConfigDict:
    return make_study(
        cifar_cnn6.get_config(),
        'cifar_cnn6_best',
        [('adam_bn_relu_ce', BEST)],
        seeds=(0, 1, 2),
        plot_metric='test_accuracy',
        description='E4: the best combination of the four ablations, over three seeds.',
    )

"""E4.4: the six-conv CIFAR-10 CNN trained with cross-entropy, MSE and L1 losses.

MSE and L1 compare the softmax output with the one-hot target. 20 epochs each, test
accuracy and loss per epoch (each variant's loss is its own, so compare the accuracies).
Reported: cross-entropy wins.

    python launch.py --config=configs/ablations/cifar_cnn6_losses.py \
        --workdir=results/cifar_cnn6_losses

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/ablations/cifar_cnn6_losses.py \
        --workdir=results/cifar_cnn6_losses \
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
        'cifar_cnn6_losses',
        [(loss, {'loss': loss}) for loss in ('cross_entropy', 'mse', 'l1')],
        plot_metric='test_accuracy',
        description='E4.4: which training loss? (Reported: cross-entropy.)',
    )

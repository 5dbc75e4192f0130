"""E4.3: the activation between the conv layers of the six-conv CIFAR-10 CNN.

identity, ReLU, tanh and sigmoid after every conv (the dense layers keep ReLU). 20 epochs
each, test accuracy and loss per epoch. Reported: ReLU wins.

    python launch.py --config=configs/ablations/cifar_cnn6_activations.py \
        --workdir=results/cifar_cnn6_activations

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/ablations/cifar_cnn6_activations.py \
        --workdir=results/cifar_cnn6_activations \
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
        'cifar_cnn6_activations',
        [(a, {'model_options.activation': a}) for a in ('identity', 'relu', 'tanh', 'sigmoid')],
        plot_metric='test_accuracy',
        description='E4.3: which activation between the convs? (Reported: ReLU.)',
    )

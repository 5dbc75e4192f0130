"""E3: the MNIST CNN on the 10 digit classes vs on 4 merged classes.

`merged` maps {0,6}->0, {1,7}->1, {2,3,5,8}->2, {4,9}->3 (the variants of
configs/mnist_cnn.py). Adam, batch 20, 10 epochs; validation accuracy and loss per epoch.

    python launch.py --config=configs/ablations/mnist_cnn_merged.py \
        --workdir=results/mnist_cnn_merged

Offline, Fashion-MNIST from the Debian package dataset-fashion-mnist (MNIST's format and
shape; the merged groups then join clothing classes by index; `--config.dataset=digits` is a
smaller fallback):

    python launch.py --config=configs/ablations/mnist_cnn_merged.py \
        --workdir=results/mnist_cnn_merged \
        --config.dataset=idx:/usr/share/datasets/fashion-mnist

Writes summary.md, summary.json and comparison.png in the workdir (one sub-folder per
variant); `--config.only=<variant>` runs one variant, `--config.study.seeds='(0,1,2)'`
gives mean +- std over seeds.
"""

import ml_collections

from configs import mnist_cnn
from configs.ablations import config_diff, make_study


def get_config() -> ml_collections.ConfigDict:
    base = mnist_cnn.get_config()
    return make_study(
        base,
        'mnist_cnn_merged',
        [(v, config_diff(base, mnist_cnn.get_config(v))) for v in mnist_cnn.VARIANTS],
        description='E3: the MNIST CNN on 10 classes and on 4 merged classes.',
    )

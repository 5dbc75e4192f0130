"""E6-E7: SimpleNN with ReLU vs Swish (SiLU).

SimpleNN (configs/simplenn.py: SGD momentum 0.9, lr 0.01, L2 1e-4) on CIFAR-10 with a
train/validation split; each variant reports its best validation accuracy.

    python launch.py --config=configs/ablations/simplenn_activation.py \
        --workdir=results/simplenn_activation

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/ablations/simplenn_activation.py \
        --workdir=results/simplenn_activation \
        --config.dataset=folder:DIR

Writes summary.md, summary.json and comparison.png in the workdir (one sub-folder per
variant); `--config.only=<variant>` runs one variant, `--config.study.seeds='(0,1,2)'`
gives mean +- std over seeds.
"""

import ml_collections

from configs import simplenn
from configs.ablations import make_study


def get_config() -> ml_collections.ConfigDict:
    return make_study(
        simplenn.get_config(),
        'simplenn_activation',
        [(a, {'model_options.activation': a}) for a in ('relu', 'swish')],
        description='E6-E7: Swish or ReLU in SimpleNN?',
    )

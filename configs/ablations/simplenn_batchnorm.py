"""E6-E7: SimpleNN with and without batch norm after each conv.

SimpleNN (configs/simplenn.py: SGD momentum 0.9, lr 0.01, L2 1e-4) on CIFAR-10 with a
train/validation split; each variant reports its best validation accuracy.

    python launch.py --config=configs/ablations/simplenn_batchnorm.py \
        --workdir=results/simplenn_batchnorm

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/ablations/simplenn_batchnorm.py \
        --workdir=results/simplenn_batchnorm \
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
        'simplenn_batchnorm',
        [
            ('none', {'model_options.norm': 'none'}),
            ('batchnorm', {'model_options.norm': 'batchnorm'}),
        ],
        description='E6-E7: does batch norm after each conv help SimpleNN?',
    )

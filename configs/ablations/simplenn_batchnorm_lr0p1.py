"""E6-E7: SimpleNN with and without batch norm at the high learning rate 0.1.

SimpleNN (configs/simplenn.py: SGD momentum 0.9, lr 0.01, L2 1e-4) on CIFAR-10 with a
train/validation split; each variant reports its best validation accuracy. Reported: BN at
lr 0.1 beats no-BN by about 16 points.

    python launch.py --config=configs/ablations/simplenn_batchnorm_lr0p1.py \
        --workdir=results/simplenn_batchnorm_lr0p1

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/ablations/simplenn_batchnorm_lr0p1.py \
        --workdir=results/simplenn_batchnorm_lr0p1 \
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
        'simplenn_batchnorm_lr0p1',
        [
            ('none_lr0.1', {'model_options.norm': 'none', 'learning_rate': 0.1}),
            ('batchnorm_lr0.1', {'model_options.norm': 'batchnorm', 'learning_rate': 0.1}),
        ],
        description='E6-E7: does batch norm make lr 0.1 trainable? (Reported: +16 points.)',
    )

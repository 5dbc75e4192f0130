"""E6-E7: SimpleNN with and without augmentation (4-pixel padded random crop + flip).

SimpleNN (configs/simplenn.py: SGD momentum 0.9, lr 0.01, L2 1e-4) on CIFAR-10 with a
train/validation split; each variant reports its best validation accuracy.

    python launch.py --config=configs/ablations/simplenn_augmentation.py \
        --workdir=results/simplenn_augmentation

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/ablations/simplenn_augmentation.py \
        --workdir=results/simplenn_augmentation \
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
        'simplenn_augmentation',
        [
            ('none', {'augment.flip': False, 'augment.crop_padding': 0}),
            ('crop_flip', {'augment.flip': True, 'augment.crop_padding': 4}),
        ],
        description='E6-E7: does crop + flip augmentation help SimpleNN?',
    )

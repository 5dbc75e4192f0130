"""E6-E7: SimpleNN L2 (weight decay) sweep over {1e-2, 1e-3, 1e-4, 1e-5, 0}.

SimpleNN (configs/simplenn.py: SGD momentum 0.9, lr 0.01, L2 1e-4) on CIFAR-10 with a
train/validation split; each variant reports its best validation accuracy. Also writes
sweep.png (accuracy against the L2 strength, log axis; 0 is drawn one decade below 1e-5).
Reported: best at 1e-4.

    python launch.py --config=configs/ablations/simplenn_l2_sweep.py \
        --workdir=results/simplenn_l2_sweep

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/ablations/simplenn_l2_sweep.py \
        --workdir=results/simplenn_l2_sweep \
        --config.dataset=folder:DIR

Writes summary.md, summary.json and comparison.png in the workdir (one sub-folder per
variant); `--config.only=<variant>` runs one variant, `--config.study.seeds='(0,1,2)'`
gives mean +- std over seeds.
"""

import ml_collections

from configs import simplenn
from configs.ablations import make_study, sweep

WEIGHT_DECAYS = (1e-2, 1e-3, 1e-4, 1e-5, 0.0)


def get_config() -> ml_collections.ConfigDict:
    return make_study(
        simplenn.get_config(),
        'simplenn_l2_sweep',
        sweep('weight_decay', WEIGHT_DECAYS),
        sweep_key='weight_decay',
        description='E6-E7: which L2 strength? (Reported: 1e-4.)',
    )

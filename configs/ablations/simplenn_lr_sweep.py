"""E6-E7: SimpleNN learning-rate sweep over {1.0, 0.1, 0.05, 0.01, 0.005, 0.001}.

SimpleNN (configs/simplenn.py: SGD momentum 0.9, lr 0.01, L2 1e-4) on CIFAR-10 with a
train/validation split; each variant reports its best validation accuracy. Also writes
sweep.png (accuracy against the learning rate, log axis). Reported: best about 0.73 at
0.01; 1.0 diverges (the table shows it as diverged at step N, or at chance accuracy).

    python launch.py --config=configs/ablations/simplenn_lr_sweep.py \
        --workdir=results/simplenn_lr_sweep

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/ablations/simplenn_lr_sweep.py \
        --workdir=results/simplenn_lr_sweep \
        --config.dataset=folder:DIR

Writes summary.md, summary.json and comparison.png in the workdir (one sub-folder per
variant); `--config.only=<variant>` runs one variant, `--config.study.seeds='(0,1,2)'`
gives mean +- std over seeds.
"""

import ml_collections

from configs import simplenn
from configs.ablations import make_study, sweep

LEARNING_RATES = (1.0, 0.1, 0.05, 0.01, 0.005, 0.001)


def get_config() -> ml_collections.ConfigDict:
    return make_study(
        simplenn.get_config(),
        'simplenn_lr_sweep',
        sweep('learning_rate', LEARNING_RATES),
        sweep_key='learning_rate',
        description='E6-E7: which learning rate? (Reported: 0.01 best; 1.0 diverges.)',
    )

"""E1: the regularisation ladder of the report's VGG (ten convs, see configs/vgg.py).

Each rung adds one thing to the one before:

base (no dropout) -> l2 (+ weight decay 5e-4) -> dropout (+ classifier dropout 0.5) ->
early_stopping (+ patience 5 on validation loss) -> augment (+ flip, rotation 10 degrees,
scale 0.1), on three CIFAR-10 classes (dog, automobile, ship) at 64x64. The rungs are
those of configs/vgg.py. Reported test accuracy: 90%, 92%, 90%, 91%, 93%.

    python launch.py --config=configs/ablations/vgg_regularization.py \
        --workdir=results/vgg_regularization

Offline, with CIFAR-10 as an image folder DIR (README.md, Data):

    python launch.py --config=configs/ablations/vgg_regularization.py \
        --workdir=results/vgg_regularization \
        --config.dataset=folder:DIR

Writes summary.md, summary.json and comparison.png in the workdir (one sub-folder per
variant); `--config.only=<variant>` runs one variant, `--config.study.seeds='(0,1,2)'`
gives mean +- std over seeds.
"""

import ml_collections

from configs import vgg
from configs.ablations import config_diff, make_study


def get_config() -> ml_collections.ConfigDict:
    base = vgg.get_config()
    return make_study(
        base,
        'vgg_regularization',
        [(rung, config_diff(base, vgg.get_config(rung))) for rung in vgg.RUNGS],
        description="E1: what does each regulariser add to the report's VGG? (Reported test "
        'accuracy 90%, 92%, 90%, 91%, 93%.)',
    )

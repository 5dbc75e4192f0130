"""E5b: ImageNet-pretrained ResNet-50 fine-tuned on CIFAR-10 vs the same network from scratch.

Same data, resolution (224x224), augmentation and epochs (10); the variants are exactly
configs/transfer_resnet50.py's `finetune` and `scratch` (pretrained weights, backbone at
0.1x the learning rate vs random initialisation with its own learning rate). Each run's
report.md and summary.json hold per-class test accuracy and the confusion matrix. Reported
per-class accuracy: from scratch 50-84%, fine-tuned 70-88%.

    python launch.py --config=configs/ablations/transfer_finetune_vs_scratch.py \
        --workdir=results/transfer_finetune_vs_scratch

Offline, with CIFAR-10 as an image folder DIR (README.md, Data) and torchvision's
resnet50-0676ba61.pth:

    python launch.py --config=configs/ablations/transfer_finetune_vs_scratch.py \
        --workdir=results/transfer_finetune_vs_scratch \
        --config.dataset=folder:DIR \
        --config.pretrained=/path/to/resnet50-0676ba61.pth

A --config.pretrained flag changes the base config, so it applies to `finetune` only:
`scratch` sets pretrained=None itself. Then the per-class accuracies side by side
(per_class_accuracy.md and .png in the same folder):

    python -m cnn_jax.transfer.compare results/transfer_finetune_vs_scratch
"""

from typing import Any

import ml_collections

from configs import transfer_resnet50
from configs.ablations import make_study


def _flat(c: ml_collections.ConfigDict, prefix: str = '') -> dict[str, Any]:
    out = {}
    for k, v in c.items():
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flat(v, f'{prefix}{k}.'))
        else:
            out[f'{prefix}{k}'] = v
    return out


def _overrides(variant: str, base: ml_collections.ConfigDict) -> dict[str, Any]:
    """The keys where transfer_resnet50.py:<variant> differs from `base`."""
    new, old = _flat(transfer_resnet50.get_config(variant)), _flat(base)
    return {k: v for k, v in new.items() if k != 'name' and old.get(k) != v}


def get_config() -> ml_collections.ConfigDict:
    base = transfer_resnet50.get_config('finetune')
    return make_study(
        base,
        'transfer_finetune_vs_scratch',
        [('finetune', {}), ('scratch', _overrides('scratch', base))],
        plot_metric='test_accuracy',
        description='E5b: does ImageNet pretraining help ResNet-50 on CIFAR-10, class by class? '
        '(reported per-class accuracy: scratch 50-84%, fine-tuned 70-88%)',
    )

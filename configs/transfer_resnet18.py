"""E12: ImageNet-pretrained ResNet-18 (torchvision weights) on CIFAR-10 at 224x224.

Adam, learning rate 5e-4, batch 32. Reported: train 0.969, val 0.891, test 0.889.

Variants (`--config=configs/transfer_resnet18.py:<variant>`): finetune (default, every
layer trained), scratch (same network and recipe from random initialisation), partial
(stem, layer1 and layer2 frozen), linear (only the new head trained), svm (frozen
features -> linear SVM, bird vs rest, as E5a).

The weights are torchvision's IMAGENET1K_V1 state_dict; by default the file torchvision
downloads to ~/.cache/torch/hub/checkpoints/ (any .pth/.pt, .safetensors or .npz with
torchvision's tensor names works: --config.pretrained=PATH):

    python -c "import torchvision; torchvision.models.resnet18(weights='IMAGENET1K_V1')"
    python launch.py --config=configs/transfer_resnet18.py --workdir=results/e12

Offline, with CIFAR-10 as an image folder DIR (README.md, Data): add
--config.dataset=folder:DIR.
"""

import ml_collections
from ml_collections import config_dict

from cnn_jax.errors import ConfigError
from configs import default

VARIANTS = ('finetune', 'scratch', 'partial', 'linear', 'svm')
WEIGHTS = '~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth'  # IMAGENET1K_V1.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or 'finetune'
    if variant not in VARIANTS:
        raise ConfigError(
            f'unknown transfer_resnet18.py variant {variant!r}; known: {", ".join(VARIANTS)}'
        )
    c = default.get_config()
    c.name = f'transfer_resnet18_{variant}'
    c.dataset = 'cifar10'
    c.image_size = 224
    c.normalize = 'imagenet'
    c.model = 'resnet18'
    c.pretrained = WEIGHTS
    c.eval_batch_size = 256

    if variant == 'svm':
        c.task = 'svm'
        c.one_vs_rest = 'bird'
        c.val_fraction = 0.0
        c.svm = ml_collections.ConfigDict()
        c.svm.C = 1.0
        c.svm.class_weight = config_dict.placeholder(str)  # None | 'balanced'.
        c.svm.max_iter = 5000
        return c

    c.num_epochs = 5
    c.batch_size = 32
    c.optimizer = 'adam'
    c.learning_rate = 5e-4
    c.augment.flip = True
    c.best_metric = 'val_accuracy'
    if variant == 'partial':
        c.freeze = ('conv1', 'bn1', 'layer1', 'layer2')
    elif variant == 'linear':
        c.freeze = ('backbone',)
    elif variant == 'scratch':
        c.pretrained = None
    return c

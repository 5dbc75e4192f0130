"""E5: ImageNet-pretrained ResNet-50 (torchvision weights) on CIFAR-10.

Variants (`--config=configs/transfer_resnet50.py:<variant>`):
- svm: (a) frozen pooled features -> linear SVM for bird vs rest (reported accuracy 89.14%):
  accuracy, confusion matrix, ROC curve with AUC, precision/recall/F1.
- finetune (default): (b) every layer trained, the backbone at 0.1x the head's learning rate.
- scratch: (b) the same network, data and schedule from random initialisation.
- partial: the stem, layer1 and layer2 frozen; layer3, layer4 and the head trained.
- linear: the whole backbone frozen, only the new 10-class head trained.
Reported per-class test accuracy after 10 epochs: from scratch 50-84%, fine-tuned 70-88%
(configs/ablations/transfer_finetune_vs_scratch.py runs both side by side).

Images are resized on the device to 224x224 and normalised with ImageNet's mean/std.
The weights are torchvision's IMAGENET1K_V1 state_dict; by default the file torchvision
downloads to ~/.cache/torch/hub/checkpoints/ (any .pth/.pt, .safetensors or .npz with
torchvision's tensor names works: --config.pretrained=PATH):

    python -c "import torchvision; torchvision.models.resnet50(weights='IMAGENET1K_V1')"
    python launch.py --config=configs/transfer_resnet50.py:svm --workdir=results/e5_svm
    python launch.py --config=configs/transfer_resnet50.py --workdir=results/e5_finetune

Offline, with CIFAR-10 as an image folder DIR (README.md, Data): add
--config.dataset=folder:DIR. On a GPU,
--config.dtype=bfloat16 roughly halves the time.
"""

import ml_collections
from ml_collections import config_dict

from cnn_jax.errors import ConfigError
from configs import default

VARIANTS = ('finetune', 'scratch', 'partial', 'linear', 'svm')
WEIGHTS = '~/.cache/torch/hub/checkpoints/resnet50-0676ba61.pth'  # IMAGENET1K_V1.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or 'finetune'
    if variant not in VARIANTS:
        raise ConfigError(
            f'unknown transfer_resnet50.py variant {variant!r}; known: {", ".join(VARIANTS)}'
        )
    c = default.get_config()
    c.name = f'transfer_resnet50_{variant}'
    c.dataset = 'cifar10'
    c.image_size = 224
    c.normalize = 'imagenet'
    c.model = 'resnet50'
    c.pretrained = WEIGHTS
    c.eval_batch_size = 256

    if variant == 'svm':
        c.task = 'svm'
        c.one_vs_rest = 'bird'
        c.val_fraction = 0.0  # No model selection: the SVM trains on all 50,000 images.
        c.svm = ml_collections.ConfigDict()
        c.svm.C = 1.0
        c.svm.class_weight = config_dict.placeholder(str)  # None | 'balanced'.
        c.svm.max_iter = 5000
        return c

    c.num_epochs = 10
    c.batch_size = 128
    c.optimizer = 'momentum'
    c.momentum = 0.9
    c.learning_rate = 0.01
    c.weight_decay = 5e-4
    c.schedule = 'cosine'
    c.augment.flip = True
    c.augment.crop_padding = 28  # CIFAR's 4-pixel crop, at 224/32 = 7x the resolution.
    c.best_metric = 'val_accuracy'
    if variant == 'finetune':
        c.backbone_lr_factor = 0.1
    elif variant == 'partial':
        c.freeze = ('conv1', 'bn1', 'layer1', 'layer2')
        c.backbone_lr_factor = 0.1
    elif variant == 'linear':
        c.freeze = ('backbone',)
    elif variant == 'scratch':
        c.pretrained = None
        c.learning_rate = 0.1
        c.schedule = 'warmup_cosine'
        c.warmup_epochs = 1.0
    return c

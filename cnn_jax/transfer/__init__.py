"""Transfer learning from torchvision ResNets (E5, E12).

- `weights`: import torchvision state_dicts (.pth/.pt, .safetensors, .npz) into the Flax
  ResNets of cnn_jax.models.resnet, and export them back;
- `svm`: the frozen-feature + linear SVM task (`config.task='svm'`);
- `compare`: per-class accuracy of a study's variants side by side.
Fine-tuning itself is ordinary training with `config.pretrained`, `config.freeze` and
`config.backbone_lr_factor` (see cnn_jax.steps and cnn_jax.optim).
"""

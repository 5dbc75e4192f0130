"""E3: the three-conv MNIST CNN, on 10 classes or on 4 merged ones (`:merged`).

Adam, cross-entropy, batch 20, 10 epochs. The merged variant maps {0,6}->0, {1,7}->1,
{2,3,5,8}->2, {4,9}->3. The report lists each layer's parameter count by formula next to
the model's own (the layer table; `--summary` prints it).

    python launch.py --config=configs/mnist_cnn.py --workdir=results/mnist_cnn
    python launch.py --config=configs/mnist_cnn.py:merged --workdir=results/mnist_cnn_merged
    python launch.py --config=configs/mnist_cnn.py --summary

Offline, Fashion-MNIST from the Debian package dataset-fashion-mnist (MNIST's format and
shape, harder; the merged groups then join clothing classes by index):

    python launch.py --config=configs/mnist_cnn.py --workdir=results/mnist_cnn \
        --config.dataset=idx:/usr/share/datasets/fashion-mnist
"""

import ml_collections

from cnn_jax.errors import ConfigError
from configs import default

VARIANTS = ('digits10', 'merged')


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or 'digits10'
    if variant not in VARIANTS:
        raise ConfigError(
            f'unknown mnist_cnn.py variant {variant!r}; known variants: {", ".join(VARIANTS)}'
        )
    c = default.get_config()
    c.name = 'mnist_cnn' if variant == 'digits10' else 'mnist_cnn_merged'
    c.dataset = 'mnist'

    c.model = 'mnist_cnn'
    c.init = 'torch'  # The report's PyTorch layers, default-initialised.

    c.num_epochs = 10
    c.batch_size = 20
    c.optimizer = 'adam'
    c.learning_rate = 1e-3
    c.loss = 'cross_entropy'
    if variant == 'merged':
        c.label_groups = ((0, 6), (1, 7), (2, 3, 5, 8), (4, 9))
        c.label_group_names = ('0/6', '1/7', '2/3/5/8', '4/9')
    return c

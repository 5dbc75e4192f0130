"""Quickstart: a small CNN on scikit-learn's bundled 8x8 digits, offline, in about a minute.

    python launch.py --config=configs/quickstart.py

Writes results/quickstart/{report.md,summary.json,curves.png,confusion_matrix.png,
metrics.jsonl}, TensorBoard events and checkpoints. Test accuracy is about 0.98.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.dataset = 'digits'
    c.model = 'small_cnn'
    c.model_options.features = (32, 64)
    c.model_options.dense = 128
    c.model_options.dropout_rate = 0.1
    c.num_epochs = 15
    c.batch_size = 32
    c.eval_batch_size = 128
    c.optimizer = 'adam'
    c.learning_rate = 2e-3
    c.schedule = 'cosine'
    c.val_fraction = 0.1
    c.log_every_steps = 20
    return c

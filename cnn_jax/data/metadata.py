"""What a dataset looks like (image shape, class names) without loading it.

`--summary` needs only the model's input shape and class count. Reading them costs a
file header, a directory listing or TFDS's static feature description: no image is
decoded, nothing is downloaded, and a TFDS dataset need not be prepared.
"""

from __future__ import annotations

from typing import Any

import ml_collections
import numpy as np

from cnn_jax.data import apply_class_options
from cnn_jax.data.resolve import config_source
from cnn_jax.data.sources import Metadata, RawData
from cnn_jax.errors import ConfigError


def dataset_metadata(config: ml_collections.ConfigDict) -> Metadata:
    """Shape and class names after config's class options (classes, groups, one-vs-rest)."""
    meta = config_source(config).describe()
    if not meta.names_known:  # Nothing to check class options against before download.
        if config.classes:
            return Metadata(meta.image_shape, [str(c) for c in config.classes], False)
        if config.one_vs_rest:
            return Metadata(meta.image_shape, ['rest', str(config.one_vs_rest)], False)
    # The same relabelling load_dataset applies, on no examples: same names, same errors.
    empty = np.zeros((0, 1, 1, meta.image_shape[-1]), np.uint8), np.zeros((0,), np.int32)
    raw = apply_class_options(RawData(*empty, *empty, meta.class_names), config)
    return Metadata(meta.image_shape, list(raw.class_names), meta.names_known)


def model_input_shape(config: ml_collections.ConfigDict, meta: Any) -> tuple[int, int, int]:
    """The (H, W, C) the model sees: config.image_size when set, else the stored size.

    `meta`: anything with an `image_shape`, a Metadata or a loaded Dataset.
    """
    h, w, c = meta.image_shape
    if config.image_size:
        return config.image_size, config.image_size, c
    if h is None or w is None:
        raise ConfigError(f'{config.dataset} has images of varying size: set --config.image_size')
    return h, w, c

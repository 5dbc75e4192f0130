"""Datasets: read, relabel, split and subsample, device-resident or streamed.

`load_dataset(config)` reads config.dataset (cnn_jax.data.resolve) into host arrays, or
opens streams of it (cnn_jax.data.stream) where config.input_mode says so. Both kinds of
split share one API, and `on_devices(mesh)` gives what the training loop asks for batches.
Images stay uint8 on the host; they are converted, resized, augmented and normalised on
the device (see `augment.py`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np
from jax.sharding import Mesh

from cnn_jax import parallel
from cnn_jax.data import stream
from cnn_jax.data.resolve import Source, config_source
from cnn_jax.data.sources import RawData
from cnn_jax.errors import ConfigError, DataError
from cnn_jax.records import Reporter

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class Split:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray  # (N,) int32

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, index: np.ndarray) -> Split:
        return Split(self.images[index], self.labels[index])

    def examples(self, index: np.ndarray) -> np.ndarray:
        return self.images[index]

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def on_devices(self, mesh: Mesh) -> stream.ResidentSplit:
        """The split replicated on every device of `mesh`."""
        put = parallel.put_replicated
        return stream.ResidentSplit(put(self.images, mesh), put(self.labels, mesh), mesh)


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Splits on the host, or streams of them with the same API."""

    name: str
    train: Split | stream.Stream
    val: Split | stream.Stream | None
    test: Split | stream.Stream
    class_names: list[str]
    mean: np.ndarray  # (C,) float32, in [0, 1] pixel units
    std: np.ndarray

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.train.image_shape

    def splits(self) -> dict[str, Split | stream.Stream]:
        """{'train', 'val' (when there is one), 'test'}: each split by name."""
        named = {'train': self.train, 'val': self.val, 'test': self.test}
        return {name: split for name, split in named.items() if split is not None}


def _class_index(names: Sequence[str], c: str | int) -> int:
    if isinstance(c, (int, np.integer)) and 0 <= c < len(names):
        return int(c)
    if str(c) in names:
        return list(names).index(str(c))
    raise ConfigError(f'unknown class {c!r}; the dataset has classes: {", ".join(names)}')


def relabel(raw: RawData, table: np.ndarray, names: list[str]) -> RawData:
    """Maps labels through `table` (old -> new, -1 drops the example)."""

    def apply(images, labels):
        new = table[labels]
        keep = new >= 0
        return images[keep], new[keep].astype(np.int32)

    return RawData(
        *apply(raw.train_images, raw.train_labels), *apply(raw.test_images, raw.test_labels), names
    )


def select_classes(raw: RawData, classes: Sequence[str | int]) -> RawData:
    """Keeps `classes` (names or indices), relabelled 0..k-1 in the given order."""
    table = np.full(len(raw.class_names), -1, np.int64)
    for new, c in enumerate(classes):
        table[_class_index(raw.class_names, c)] = new
    return relabel(raw, table, [raw.class_names[_class_index(raw.class_names, c)] for c in classes])


def merge_classes(
    raw: RawData, groups: Sequence[Sequence[str | int]], names: Sequence[str] | None = None
) -> RawData:
    """Merges labels: group g's old labels all become label g. Every label must be placed."""
    table = np.full(len(raw.class_names), -1, np.int64)
    for g, members in enumerate(groups):
        for c in members:
            i = _class_index(raw.class_names, c)
            if table[i] >= 0:
                raise ConfigError(f'label_groups: class {c!r} is in groups {table[i]} and {g}')
            table[i] = g
    missing = [raw.class_names[i] for i in np.flatnonzero(table < 0)]
    if missing:
        raise ConfigError(f'label_groups leaves classes {missing} in no group')
    if names is not None and len(names) != len(groups):
        raise ConfigError(f'label_group_names has {len(names)} names for {len(groups)} groups')
    if not names:
        names = [
            '+'.join(raw.class_names[_class_index(raw.class_names, c)] for c in m) for m in groups
        ]
    return relabel(raw, table, list(names))


def one_vs_rest(raw: RawData, positive: str | int) -> RawData:
    """Label 1 for `positive`, 0 for every other class."""
    i = _class_index(raw.class_names, positive)
    table = np.zeros(len(raw.class_names), np.int64)
    table[i] = 1
    return relabel(raw, table, [f'not {raw.class_names[i]}', raw.class_names[i]])


def validation_split(
    images: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> tuple[Split, Split | None]:
    """A deterministic random split of train into (train, val)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f'val_fraction must be in [0, 1), got {fraction}')
    n_val = int(round(fraction * len(labels)))
    if n_val == 0:
        return Split(images, labels), None
    perm = np.random.default_rng(seed).permutation(len(labels))
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    return Split(images[train], labels[train]), Split(images[val], labels[val])


def subsample(split: Split, n: int | None, seed: int) -> Split:
    """A deterministic random subset of `n` examples (all of them when n is None)."""
    if not n or n >= len(split):
        return split
    return split.take(np.sort(np.random.default_rng(seed).permutation(len(split))[:n]))


def stats_sample(n: int) -> slice:
    """The strided sample of n training images the statistics read: cheap on large sets."""
    return slice(None, None, max(1, n // 10000))


def channel_stats(images: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in [0, 1] units for normalisation `mode`."""
    c = images.shape[-1]
    if mode == 'dataset':
        sample = images[stats_sample(len(images))].astype(np.float64) / 255.0
        mean = sample.mean(axis=(0, 1, 2))
        std = np.maximum(sample.std(axis=(0, 1, 2)), 1e-3)
    elif mode == 'imagenet':
        if c != 3:
            raise ConfigError(f'normalize=imagenet needs 3-channel images, got {c} channel(s)')
        mean, std = np.asarray(IMAGENET_MEAN), np.asarray(IMAGENET_STD)
    elif mode == 'none':
        mean, std = np.zeros(c), np.ones(c)
    else:
        raise ConfigError(f"unknown normalize {mode!r}; known: 'dataset', 'imagenet', 'none'")
    return mean.astype(np.float32), std.astype(np.float32)


def apply_class_options(raw: RawData, config: ml_collections.ConfigDict) -> RawData:
    """config.classes, label_groups or one_vs_rest (at most one) applied to `raw`."""
    options = [k for k in ('classes', 'label_groups', 'one_vs_rest') if config.get(k)]
    if len(options) > 1:
        raise ConfigError(f'choose one of classes, label_groups, one_vs_rest; got {options}')
    if config.get('classes'):
        return select_classes(raw, config.classes)
    if config.get('label_groups'):
        return merge_classes(raw, config.label_groups, config.get('label_group_names'))
    if config.get('one_vs_rest'):
        return one_vs_rest(raw, config.one_vs_rest)
    return raw


def open_streams(config: ml_collections.ConfigDict, source: Source) -> list | None:
    """The (train, test) streams where config.input_mode streams, else None.

    'auto' opens the streams (a file listing; TFDS's split sizes), reads one image header,
    and streams when the dataset's bytes exceed the device memory budget.
    """
    mode = config.input_mode
    if mode == 'device' or (mode == 'auto' and not source.streamable):
        return None
    image_size = config.image_size or None
    streams = [source.stream(split, image_size=image_size) for split in ('train', 'test')]
    # As the device path holds them: as stored (resized on the device) where sizes agree.
    h, w, c = source.describe().image_shape
    shape = (h or config.image_size or 1, w or config.image_size or 1, c)
    needed = stream.dataset_bytes(sum(len(s) for s in streams), shape)
    budget = stream.device_memory_budget(config.device_memory_budget_gb)
    why = f'{needed / 2**30:.3g} GiB of images, device memory budget {budget / 2**30:.3g} GiB'
    if mode == 'auto':
        mode = 'device' if needed <= budget else 'stream'
    else:
        why = f'input_mode=stream; {why}'
    kind = 'streamed from the host' if mode == 'stream' else 'device-resident'
    Reporter().line(f'Input: {kind} ({why}).')
    return streams if mode == 'stream' else None


def load_dataset(config: ml_collections.ConfigDict, allow_streams: bool = False) -> Dataset:
    """Reads config.dataset and applies the class options, split and subsampling.

    With `allow_streams` (training), the splits are streams where config.input_mode says
    so (`open_streams`): they are selected from by example number, the same selection as
    the arrays', and only the statistics' sample is decoded.
    """
    source = config_source(config)
    streams = open_streams(config, source) if allow_streams else None
    if streams is None:
        raw = source.read(config.image_size or None)
    else:  # Example numbers in place of the images.
        number = [np.arange(len(s)) for s in streams]
        raw = RawData(number[0], streams[0].labels, number[1], streams[1].labels,
                      streams[0].class_names)  # fmt: skip
    raw = apply_class_options(raw, config)
    if len(raw.train_labels) == 0 or len(raw.test_labels) == 0:
        raise DataError(f'{config.dataset}: no training or test examples left after selection')
    seed = config.data_seed
    train, val = validation_split(raw.train_images, raw.train_labels, config.val_fraction, seed)
    test = Split(raw.test_images, raw.test_labels)
    train = subsample(train, config.max_train_examples, seed + 1)
    val = subsample(val, config.max_eval_examples, seed + 2) if val else None
    test = subsample(test, config.max_eval_examples, seed + 3)
    sample = train.images
    if streams is not None:
        if config.normalize == 'dataset':
            sample = streams[0].examples(train.images[stats_sample(len(train))])
        else:
            sample = np.zeros((1, 1, 1, streams[0].image_shape[-1]), np.uint8)
        train, test = (streams[i].take(s.images, s.labels) for i, s in ((0, train), (1, test)))
        val = val and streams[0].take(val.images, val.labels)
    mean, std = channel_stats(sample, config.normalize)
    return Dataset(config.dataset, train, val, test, list(raw.class_names), mean, std)

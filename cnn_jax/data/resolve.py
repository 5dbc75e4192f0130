"""The one place a `config.dataset` string is understood: `parse_source`.

    'digits'                 scikit-learn's bundled 8x8 digits
    'idx:DIR'                MNIST-format IDX files
    'folder:DIR'             DIR/{train,test}/<class>/*.jpg|png, or a .tar(.gz) of one
    any other name           a TFDS dataset

The source it returns reads the train and test splits into host arrays, describes them
(shape and classes, nothing decoded or downloaded) and opens them as streams.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, ClassVar

import ml_collections

from cnn_jax.data import folder, sources, stream
from cnn_jax.data import images as images_lib
from cnn_jax.data.sources import Metadata, RawData
from cnn_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Source:
    """A dataset string resolved, with where its files live; subclasses per kind."""

    spec: str  # config.dataset
    data_dir: str | None = None  # TFDS's.
    manual_dir: str | None = None  # TFDS's manual downloads.
    cache_dir: str | None = None  # Extracted archives and decoded folders.
    streamable: ClassVar[bool] = False

    @property
    def path(self) -> pathlib.Path:
        return pathlib.Path(self.spec.partition(':')[2]).expanduser()

    def read(self, image_size: int | None = None) -> RawData:
        """The train and test splits as host arrays, their labels checked."""
        raw = self._read(image_size)
        for split, labels in (('train', raw.train_labels), ('test', raw.test_labels)):
            sources.check_labels(labels, len(raw.class_names), f'{self.spec} ({split})')
        return raw

    def describe(self) -> Metadata:
        raise NotImplementedError

    def stream(self, split: str, **options: Any) -> stream.Stream:
        """A stream of `split` ('train' | 'test'); `options` are stream.Stream's."""
        raise ConfigError(
            f'{self.spec!r} cannot stream: streaming reads folder:DIR or a TFDS name '
            "(digits and idx: datasets fit in memory: use input_mode='device')"
        )

    def _read(self, image_size: int | None) -> RawData:
        raise NotImplementedError


class Digits(Source):
    def _read(self, image_size: int | None) -> RawData:
        return sources.read_digits()

    def describe(self) -> Metadata:
        return Metadata((8, 8, 1), [str(i) for i in range(10)])


class Idx(Source):
    def _read(self, image_size: int | None) -> RawData:
        return sources.read_idx(str(self.path))

    def describe(self) -> Metadata:
        return sources.idx_metadata(self.path)


class Folder(Source):
    streamable = True

    def _read(self, image_size: int | None) -> RawData:
        return folder.read_folder(str(self.path), cache_dir=self.cache_dir, image_size=image_size)

    def describe(self) -> Metadata:
        return folder.folder_metadata(self.path, self.cache_dir)

    def stream(self, split: str, **options: Any) -> stream.FolderStream:
        """The split in tfds.ImageFolder's order."""
        root = folder.folder_root(str(self.path), cache_dir=self.cache_dir)
        class_names = folder.check_folder(root)
        paths, labels = images_lib.list_examples(root, split, class_names)
        return stream.FolderStream(paths, labels, class_names, **options)


class Tfds(Source):
    streamable = True

    def _read(self, image_size: int | None) -> RawData:
        return sources.read_tfds(self.spec, data_dir=self.data_dir, manual_dir=self.manual_dir)

    def describe(self) -> Metadata:
        return sources.tfds_metadata(self.spec, self.data_dir)

    def stream(self, split: str, **options: Any) -> stream.TfdsStream:
        builder = sources.tfds_builder(
            self.spec, data_dir=self.data_dir, manual_dir=self.manual_dir
        )
        return stream.TfdsStream(builder, split, **options)


def parse_source(
    dataset: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    cache_dir: str | None = None,
) -> Source:
    """The source `dataset` names (see the module doc); DataError for an unknown kind."""
    kind, colon, _ = dataset.partition(':')
    if dataset == 'digits':
        cls = Digits
    elif colon and kind in ('idx', 'folder'):
        cls = Idx if kind == 'idx' else Folder
    elif colon or '/' in dataset:
        raise sources.unknown_dataset(dataset)
    else:
        cls = Tfds
    return cls(dataset, data_dir=data_dir, manual_dir=manual_dir, cache_dir=cache_dir)


def config_source(config: ml_collections.ConfigDict) -> Source:
    """config.dataset's source, with config's data_dir, manual_dir and cache_dir."""
    return parse_source(
        config.dataset,
        data_dir=config.data_dir,
        manual_dir=config.manual_dir,
        cache_dir=config.cache_dir,
    )

"""What a dataset looks like (image shape, class names) without loading it.

`--summary` needs only the model's input shape and class count. Reading them costs a
file header, a directory listing or TFDS's static feature description: no image is
decoded, nothing is downloaded, and a TFDS dataset need not be prepared.
"""

from __future__ import annotations

import io
import pathlib
import struct
import tarfile
from typing import Any, NamedTuple

import ml_collections
import numpy as np

from cnn_jax.data import apply_class_options, sources
from cnn_jax.data.sources import (
    IMAGE_EXTENSIONS,
    RawData,
    _archive_key,
    check_folder,
    default_cache_dir,
    extracted_root,
    unknown_dataset,
)
from cnn_jax.errors import ConfigError, DataError


class Metadata(NamedTuple):
    # (H, W, C) as stored, before config.image_size; H and W are None when they vary.
    image_shape: tuple[int | None, int | None, int]
    class_names: list[str]
    # False where only the class count is known (TFDS names some classes at download).
    names_known: bool = True


def source_metadata(dataset: str, *, data_dir: str | None = None) -> Metadata:
    """The shape and classes of `dataset` (a config.dataset string), read cheaply."""
    if dataset == 'digits':
        return Metadata((8, 8, 1), [str(i) for i in range(10)])
    if dataset.startswith('idx:'):
        return _idx_metadata(pathlib.Path(dataset[4:]).expanduser())
    if dataset.startswith('folder:'):
        return _folder_metadata(pathlib.Path(dataset[7:]).expanduser())
    if ':' in dataset or '/' in dataset:
        raise unknown_dataset(dataset)
    return _tfds_metadata(dataset, data_dir)


def dataset_metadata(config: ml_collections.ConfigDict) -> Metadata:
    """Shape and class names after config's class options (classes, groups, one-vs-rest)."""
    meta = source_metadata(config.dataset, data_dir=config.data_dir)
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


def _idx_metadata(root: pathlib.Path) -> Metadata:
    path = sources.idx_file(root, 'train_images')
    with sources.open_maybe_gz(path) as f:
        (magic,) = struct.unpack('>I', f.read(4))
        ndim = magic & 0xFF
        dims = struct.unpack(f'>{ndim}I', f.read(4 * ndim))
    if len(dims) != 3:
        raise DataError(f'{path}: expected (N, H, W) images, found dimensions {dims}')
    return Metadata((dims[1], dims[2], 1), sources.idx_class_names(root))


def _image_shape(data: bytes | pathlib.Path) -> tuple[int, int, int]:
    """(H, W, C) from an image header (PIL reads the header only; RGB unless grey)."""
    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        w, h = im.size
        return h, w, 1 if im.mode in ('L', 'I', 'I;16', '1') else 3


def _folder_metadata(path: pathlib.Path) -> Metadata:
    if path.is_file() and path.name.endswith(('.tar.gz', '.tgz', '.tar')):
        return _archive_metadata(path)
    names = check_folder(path)
    split = path / 'train' / names[0]
    first = next(p for p in sorted(split.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS)
    return Metadata(_image_shape(first), names)


def _archive_metadata(archive: pathlib.Path) -> Metadata:
    """Class folders and one image's shape from the member list of a tarball."""
    extracted = default_cache_dir() / f'extracted-{_archive_key(archive)}'
    if (extracted / '.complete').exists():  # Already extracted by a run: list the folder.
        return _folder_metadata(extracted_root(extracted))
    classes: dict[str, set[str]] = {'train': set(), 'test': set()}
    shape = None
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = pathlib.PurePosixPath(member.name).parts
                if 'train' not in parts and 'test' not in parts:
                    continue
                split = 'train' if 'train' in parts else 'test'
                rest = parts[parts.index(split) + 1 :]
                if len(rest) != 2 or pathlib.PurePosixPath(rest[1]).suffix.lower() not in (
                    IMAGE_EXTENSIONS
                ):
                    continue
                classes[split].add(rest[0])
                if shape is None and member.isfile():
                    shape = _image_shape(tar.extractfile(member).read())
    except (tarfile.TarError, OSError) as e:
        raise DataError(f'cannot read {archive}: {e}') from None
    if shape is None or not classes['train'] or classes['train'] != classes['test']:
        raise DataError(
            f'{archive} does not hold train/<class>/*.jpg and test/<class>/*.jpg with the '
            'same class folders'
        )
    return Metadata(shape, sorted(classes['train']))


def _tfds_metadata(name: str, data_dir: str | None) -> Metadata:
    """TFDS's feature description: the builder's code states it, no download needed."""
    features = sources.tfds_builder(name, data_dir=data_dir, prepare=False).info.features
    image_key = next((k for k in ('image', 'img') if k in features), None)
    if image_key is None or 'label' not in features:
        raise ConfigError(f'TFDS dataset {name!r} has no image and label features')
    h, w, c = features[image_key].shape
    # Before download, CIFAR-10's ClassLabel holds placeholder names '0'..'9'.
    names = list(features['label'].names)
    return Metadata((h, w, c), names, names != [str(i) for i in range(len(names))])

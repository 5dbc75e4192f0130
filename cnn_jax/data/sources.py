"""Readers of the dataset sources: uint8 NHWC arrays on the host, or a cheap description.

'digits' (scikit-learn's bundled 8x8 digits: no download, no TensorFlow), 'idx:DIR'
(MNIST-format IDX files, e.g. Fashion-MNIST from the Debian package) and TFDS names are
here; 'folder:DIR' is cnn_jax.data.folder. cnn_jax.data.resolve.parse_source tells them
apart. TensorFlow and TFDS are imported only by the TFDS functions.
"""

from __future__ import annotations

import gzip
import os
import pathlib
import socket
import struct
import threading
from typing import NamedTuple

import numpy as np

from cnn_jax.errors import ConfigError, DataError

OFFLINE_HINT = (
    'Offline, use one of: --config.dataset=digits (bundled with scikit-learn); '
    '--config.dataset=idx:DIR (MNIST-format IDX files, e.g. '
    'idx:/usr/share/datasets/fashion-mnist from the Debian package dataset-fashion-mnist); '
    '--config.dataset=folder:DIR with DIR/{train,test}/<class>/*.jpg, or a .tar.gz of '
    'such a folder; or prepare the TFDS dataset elsewhere and '
    'pass --config.data_dir (and --config.manual_dir for manual downloads).'
)

NETWORK_PROBE = ('storage.googleapis.com', 443)  # TFDS's own download host.


def default_cache_dir() -> pathlib.Path:
    """Where extracted archives, decoded folders and compiled programs are kept."""
    return pathlib.Path(os.environ.get('CNN_JAX_CACHE', '~/.cache/cnn_jax')).expanduser()


class RawData(NamedTuple):
    """Train and test arrays as read, before any split or label change."""

    train_images: np.ndarray  # (N, H, W, C) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


class Metadata(NamedTuple):
    """What a source looks like, read without loading it."""

    # (H, W, C) as stored, before config.image_size; H and W are None when they vary.
    image_shape: tuple[int | None, int | None, int]
    class_names: list[str]
    # False where only the class count is known (TFDS names some classes at download).
    names_known: bool = True


def unknown_dataset(name: str, e: Exception | None = None) -> DataError:
    """The error for a config.dataset that names no source (`e`: TFDS's own error)."""
    return DataError(
        f'unknown dataset {name!r}{f" ({type(e).__name__})" if e else ""}: known kinds are '
        'digits, idx:DIR, folder:DIR and TFDS names such as cifar10, mnist, fashion_mnist'
    )


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Raises DataError naming the first label outside [0, num_classes)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f'{where}: label {int(labels[i])} at index {i} is outside the class range '
            f'0..{num_classes - 1} ({bad.size} such labels)'
        )


# --- digits ---------------------------------------------------------------------------


def read_digits(test_fraction: float = 0.2) -> RawData:
    """scikit-learn's 1,797 8x8 digits, split once with a fixed seed (20% test)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    # Pixel values are 0..16; scale to the usual 0..255 byte range.
    images = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(labels))
    n_test = int(round(test_fraction * len(labels)))
    test, train = perm[:n_test], perm[n_test:]
    names = [str(i) for i in range(10)]
    return RawData(images[train], labels[train], images[test], labels[test], names)


# --- IDX --------------------------------------------------------------------------------

IDX_FILES = {
    'train_images': 'train-images-idx3-ubyte',
    'train_labels': 'train-labels-idx1-ubyte',
    'test_images': 't10k-images-idx3-ubyte',
    'test_labels': 't10k-labels-idx1-ubyte',
}


def open_maybe_gz(path: pathlib.Path):
    return gzip.open(path, 'rb') if path.suffix == '.gz' else open(path, 'rb')


def idx_file(root: pathlib.Path, key: str) -> pathlib.Path:
    """The file of IDX_FILES[key] in `root`, gzipped or not; DataError if there is none."""
    if not root.is_dir():
        raise DataError(f'IDX directory {root} does not exist. {OFFLINE_HINT}')
    stem = IDX_FILES[key]
    found = [p for p in (root / stem, root / (stem + '.gz')) if p.exists()]
    if not found:
        raise DataError(f'{root}: missing {stem} (or {stem}.gz)')
    return found[0]


def idx_class_names(root: pathlib.Path) -> list[str]:
    """The lines of root/classes.txt, or '0'..'9' without one."""
    names_file = root / 'classes.txt'
    if not names_file.exists():
        return [str(i) for i in range(10)]
    return [n.strip() for n in names_file.read_text().splitlines() if n.strip()]


def read_idx_file(path: str | os.PathLike) -> np.ndarray:
    """Reads one IDX file (optionally gzipped) into an array of its declared shape."""
    path = pathlib.Path(path)
    try:
        with open_maybe_gz(path) as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f'cannot read IDX file {path}: {e}') from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise DataError(f'{path} is not an IDX file (bad magic number)')
    dtype_code, ndim = data[2], data[3]
    dtypes = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}
    if dtype_code not in dtypes:
        raise DataError(f'{path}: unknown IDX data type 0x{dtype_code:02x}')
    shape = struct.unpack(f'>{ndim}I', data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise DataError(
            f'{path}: header declares shape {shape} ({int(np.prod(shape))} values) but the '
            f'file holds {body.size}'
        )
    return body.reshape(shape)


def read_idx(directory: str) -> RawData:
    """MNIST-format IDX files in `directory`; optional classes.txt names the classes."""
    root = pathlib.Path(directory).expanduser()
    arrays = {key: read_idx_file(idx_file(root, key)) for key in IDX_FILES}
    for split in ('train', 'test'):
        images, labels = arrays[f'{split}_images'], arrays[f'{split}_labels']
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(
                f'{root}: {split} images {images.shape} and labels {labels.shape} do not match '
                '(expected (N, H, W) and (N,))'
            )
        arrays[f'{split}_images'] = images.astype(np.uint8)[..., None]
        arrays[f'{split}_labels'] = labels.astype(np.int32)
    return RawData(**arrays, class_names=idx_class_names(root))


def idx_metadata(root: pathlib.Path) -> Metadata:
    """Shape and classes from the train images' header and classes.txt."""
    path = idx_file(root, 'train_images')
    with open_maybe_gz(path) as f:
        (magic,) = struct.unpack('>I', f.read(4))
        ndim = magic & 0xFF
        dims = struct.unpack(f'>{ndim}I', f.read(4 * ndim))
    if len(dims) != 3:
        raise DataError(f'{path}: expected (N, H, W) images, found dimensions {dims}')
    return Metadata((dims[1], dims[2], 1), idx_class_names(root))


# --- TFDS -------------------------------------------------------------------------------


def _missing_module(name: str, e: ImportError) -> DataError:
    # An install problem, not an offline one: the offline hint would send the user astray.
    return DataError(
        f'TFDS dataset {name!r} needs the Python module {e.name or e}, which is not installed; '
        'run `pip install -r requirements.txt`.'
    )


def network_error(timeout: float = 3.0) -> str | None:
    """Why the internet is unreachable, or None: one short connect, checked before a TFDS
    download. CNN_JAX_OFFLINE=1 says it is unreachable, =0 skips the check."""
    forced = os.environ.get('CNN_JAX_OFFLINE', '')
    if forced in ('0', '1'):
        return 'CNN_JAX_OFFLINE=1' if forced == '1' else None
    result = [f'no answer within {timeout:g} s']

    def probe() -> None:  # In a thread: name resolution has no timeout of its own.
        try:
            socket.create_connection(NETWORK_PROBE, timeout=timeout).close()
            result[0] = None
        except OSError as e:
            result[0] = str(e) or type(e).__name__

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1)
    return result[0]


def tfds_builder(
    name: str, *, data_dir: str | None, manual_dir: str | None = None, prepare: bool = True
):
    """The TFDS builder for `name`, downloaded and prepared in `data_dir` if it is not yet
    (unless `prepare` is False: its static description needs neither)."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except ImportError as e:
        raise _missing_module(name, e) from None
    except Exception as e:  # DatasetNotFoundError and friends.
        raise unknown_dataset(name, e) from None
    if not prepare:
        return builder
    if not builder.is_prepared() and manual_dir is None and builder.url_infos:  # Downloads.
        offline = network_error()  # Not minutes of TFDS's download retries.
        if offline is not None:
            raise _offline_error(name, ConnectionError(f'no network: {offline}'))
    try:
        download_config = tfds.download.DownloadConfig(manual_dir=manual_dir)
        builder.download_and_prepare(download_config=download_config)
    except ImportError as e:
        raise _missing_module(name, e) from None
    except Exception as e:  # Offline: connection errors deep inside TFDS.
        raise _offline_error(name, e) from None
    return builder


def _offline_error(name: str, e: Exception) -> DataError:
    msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
    return DataError(f'could not download or prepare TFDS dataset {name!r} ({msg}). {OFFLINE_HINT}')


def read_tfds(name: str, *, data_dir: str | None, manual_dir: str | None) -> RawData:
    """A TFDS dataset with 'train' and 'test' splits, loaded whole into memory."""
    import tensorflow_datasets as tfds

    builder = tfds_builder(name, data_dir=data_dir, manual_dir=manual_dir)
    arrays = []
    try:
        for split in ('train', 'test'):
            # Batched iteration, not batch_size=-1 (which aborts TF 2.21 on generated data).
            ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
            xs, ys = zip(*tfds.as_numpy(ds.batch(4096)), strict=True)
            arrays += [np.concatenate(xs).astype(np.uint8), np.concatenate(ys).astype(np.int32)]
    except ImportError as e:
        raise _missing_module(name, e) from None
    except Exception as e:
        raise _offline_error(name, e) from None
    return RawData(*arrays, list(builder.info.features['label'].names))


def tfds_metadata(name: str, data_dir: str | None) -> Metadata:
    """TFDS's feature description: the builder's code states it, no download needed."""
    features = tfds_builder(name, data_dir=data_dir, prepare=False).info.features
    image_key = next((k for k in ('image', 'img') if k in features), None)
    if image_key is None or 'label' not in features:
        raise ConfigError(f'TFDS dataset {name!r} has no image and label features')
    h, w, c = features[image_key].shape
    # Before download, CIFAR-10's ClassLabel holds placeholder names '0'..'9'.
    names = list(features['label'].names)
    return Metadata((h, w, c), names, names != [str(i) for i in range(len(names))])

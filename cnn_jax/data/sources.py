"""Readers that turn a `config.dataset` string into uint8 NHWC arrays on the host.

Four kinds of source, chosen by the string:
- 'digits': scikit-learn's bundled 8x8 digits (no download, no TensorFlow);
- 'idx:DIR': MNIST-format IDX files (e.g. Fashion-MNIST from the Debian package);
- 'folder:DIR' (or 'folder:ARCHIVE.tar.gz'): DIR/{train,test}/<class>/*.jpg|png, read with
  TFDS's ImageFolder, or with Pillow where TensorFlow is not installed (same arrays);
- any other name: a TFDS dataset.
TensorFlow and TFDS are imported only by the last two.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import struct
import tarfile
from typing import NamedTuple

import numpy as np

from cnn_jax.data import images as images_lib
from cnn_jax.data.images import IMAGE_EXTENSIONS
from cnn_jax.errors import DataError

OFFLINE_HINT = (
    'Offline, use one of: --config.dataset=digits (bundled with scikit-learn); '
    '--config.dataset=idx:DIR (MNIST-format IDX files, e.g. '
    'idx:/usr/share/datasets/fashion-mnist from the Debian package dataset-fashion-mnist); '
    '--config.dataset=folder:DIR with DIR/{train,test}/<class>/*.jpg (e.g. '
    'folder:../shared/data/cifar10-jpeg.tar.gz); or prepare the TFDS dataset elsewhere and '
    'pass --config.data_dir (and --config.manual_dir for manual downloads).'
)


class RawData(NamedTuple):
    """Train and test arrays as read, before any split or label change."""

    train_images: np.ndarray  # (N, H, W, C) uint8
    train_labels: np.ndarray  # (N,) int32
    test_images: np.ndarray
    test_labels: np.ndarray
    class_names: list[str]


def read_source(
    dataset: str,
    *,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    cache_dir: str | None = None,
    image_size: int | None = None,
) -> RawData:
    """Reads `dataset` (see the module docstring) and checks its labels."""
    if dataset == 'digits':
        raw = read_digits()
    elif dataset.startswith('idx:'):
        raw = read_idx(dataset[4:])
    elif dataset.startswith('folder:'):
        raw = read_folder(dataset[7:], cache_dir=cache_dir, image_size=image_size)
    elif ':' in dataset or '/' in dataset:
        raise unknown_dataset(dataset)
    else:
        raw = read_tfds(dataset, data_dir=data_dir, manual_dir=manual_dir)
    for split, labels in (('train', raw.train_labels), ('test', raw.test_labels)):
        check_labels(labels, len(raw.class_names), f'{dataset} ({split})')
    return raw


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
    return RawData(
        arrays['train_images'].astype(np.uint8)[..., None],
        arrays['train_labels'].astype(np.int32),
        arrays['test_images'].astype(np.uint8)[..., None],
        arrays['test_labels'].astype(np.int32),
        idx_class_names(root),
    )


# --- image folder -----------------------------------------------------------------------


def default_cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get('CNN_JAX_CACHE', '~/.cache/cnn_jax')).expanduser()


def _archive_key(archive: pathlib.Path, chunk: int = 1 << 20) -> str:
    """A key for the archive's content: its size and first and last MiB.

    Not its path or mtime: a copy, or the same file provisioned afresh, must not pay for
    another extraction and decode (minutes for CIFAR-10's 60,000 JPEGs). Not a hash of
    every byte either, which would read a 150 GB ImageNet tarball on every start.
    """
    size = archive.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with open(archive, 'rb') as f:
        digest.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            digest.update(f.read(chunk))
    return digest.hexdigest()[:12]


def _extract_archive(archive: pathlib.Path, cache_dir: pathlib.Path) -> pathlib.Path:
    """Extracts a .tar(.gz) once into the cache; returns the folder with train/ and test/."""
    target = cache_dir / f'extracted-{_archive_key(archive)}'
    if not (target / '.complete').exists():
        print(f'Extracting {archive} to {target} (once) ...', flush=True)
        target.mkdir(parents=True, exist_ok=True)
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(target, filter='data')
        except (tarfile.TarError, OSError) as e:
            raise DataError(f'cannot extract {archive}: {e}') from None
        (target / '.complete').touch()
    return extracted_root(target)


def extracted_root(target: pathlib.Path) -> pathlib.Path:
    """The folder with train/ and test/ in an extraction: itself or its one sub-folder."""
    if (target / 'train').is_dir():
        return target
    subdirs = [p for p in target.iterdir() if p.is_dir()]  # Not the .complete marker.
    if len(subdirs) == 1 and (subdirs[0] / 'train').is_dir():
        return subdirs[0]
    return target  # check_folder() explains what is missing.


def check_folder(root: pathlib.Path) -> list[str]:
    """Checks the layout root/{train,test}/<class>/<images>; returns the class names."""
    if not root.exists():
        raise DataError(f'image folder {root} does not exist. {OFFLINE_HINT}')
    classes = None
    for split in ('train', 'test'):
        split_dir = root / split
        if not split_dir.is_dir():
            raise DataError(
                f'image folder {root} has no {split}/ sub-folder; expected '
                f'{root}/train/<class>/*.jpg and {root}/test/<class>/*.jpg'
            )
        names = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if not names:
            raise DataError(f'{split_dir} is empty: expected one sub-folder per class')
        for name in names:
            if not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in (split_dir / name).iterdir()):
                raise DataError(
                    f'class folder {split_dir / name} has no images ({", ".join(IMAGE_EXTENSIONS)})'
                )
        if classes is not None and names != classes:
            raise DataError(
                f'{root}: train/ and test/ have different class folders: {classes} vs {names}'
            )
        classes = names
    return classes


def _find_unreadable_image(split_dir: pathlib.Path) -> str:
    """Names the first file PIL cannot decode (used only after TensorFlow failed)."""
    from PIL import Image

    for path in sorted(split_dir.rglob('*')):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            try:
                with Image.open(path) as im:
                    im.load()
            except Exception as e:  # noqa: BLE001 - any decoder failure names the file.
                return f'{path}: {e}'
    return 'no single file could be blamed'


def _to_rgb_array(images: list[np.ndarray], image_size: int | None, where: str) -> np.ndarray:
    shapes = {im.shape for im in images}
    if len(shapes) == 1:
        return np.stack(images)
    if image_size is None:
        examples = ', '.join(str(s[:2]) for s in list(shapes)[:3])
        raise DataError(
            f'{where}: images have different sizes ({examples}, ...); set '
            '--config.image_size to resize them to one square size'
        )
    return np.stack([images_lib.resize(im, image_size) for im in images])


def tensorflow_available() -> bool:
    """Whether TensorFlow imports (a GPU machine may have JAX and PyTorch but no TF)."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return False
    return True


def _decode_split_tf(root: pathlib.Path, split: str) -> tuple[list[np.ndarray], list[int]]:
    import tensorflow as tf
    import tensorflow_datasets as tfds

    builder = tfds.ImageFolder(str(root))
    images, labels = [], []
    try:
        ds = builder.as_dataset(
            split=split,
            shuffle_files=False,
            as_supervised=True,
            decoders={'image': tfds.decode.SkipDecoding()},
        )
        ds = ds.map(
            lambda data, label: (images_lib.tf_decode(data), label),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        for image, label in tfds.as_numpy(ds):
            images.append(image)
            labels.append(label)
    except Exception as e:  # TF decode errors do not name the file: find it.
        culprit = _find_unreadable_image(root / split)
        raise DataError(
            f'unreadable image in {root / split}: {culprit} ({type(e).__name__})'
        ) from None
    return images, labels


def _decode_split_pil(
    root: pathlib.Path, split: str, class_names: list[str]
) -> tuple[list[np.ndarray], list[int]]:
    paths, labels = images_lib.list_examples(root, split, class_names)
    try:
        return images_lib.load_all(paths), list(labels)
    except DataError as e:
        raise DataError(f'unreadable image in {root / split}: {e}') from None


def folder_root(path: str, *, cache_dir: str | None = None) -> pathlib.Path:
    """The image folder of folder:PATH: PATH itself, or a .tar(.gz) extracted once."""
    root = pathlib.Path(path).expanduser()
    if root.is_file() and (root.name.endswith(('.tar.gz', '.tgz', '.tar'))):
        cache = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
        root = _extract_archive(root, cache)
    return root


def read_folder(
    path: str,
    *,
    cache_dir: str | None = None,
    image_size: int | None = None,
    decoder: str = 'auto',
) -> RawData:
    """An image folder (or a .tar.gz of one), decoded once and cached as .npz.

    `decoder`: 'tf' (TFDS ImageFolder), 'pil' (Pillow threads), or 'auto' (TF when it is
    installed). Both give the same class order, example order and pixels.
    """
    if decoder not in ('auto', 'tf', 'pil'):
        raise ValueError(f"decoder must be 'auto', 'tf' or 'pil', got {decoder!r}")
    cache = pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    root = folder_root(path, cache_dir=cache_dir)
    class_names = check_folder(root)
    files = sorted(str(p) for p in root.rglob('*') if p.suffix.lower() in IMAGE_EXTENSIONS)
    newest = max(os.stat(f).st_mtime for f in files)

    def cache_file(size: int | None) -> pathlib.Path:
        # 'islow': caches from before both decoders used the accurate JPEG DCT are stale.
        key = hashlib.sha1(f'{root.resolve()}:{len(files)}:{newest}:{size}:islow'.encode())
        return cache / f'folder-{key.hexdigest()[:12]}.npz'

    # Images of one size are cached as they are (any image_size resizes on the device);
    # mixed sizes are cached after the host resize to image_size.
    for cached in (cache_file(None), cache_file(image_size)):
        if cached.exists():
            with np.load(cached) as z:
                return RawData(
                    z['train_images'],
                    z['train_labels'],
                    z['test_images'],
                    z['test_labels'],
                    list(z['class_names']),
                )
    use_tf = decoder == 'tf' or (decoder == 'auto' and tensorflow_available())
    arrays, resized = {}, False
    for split in ('train', 'test'):
        if use_tf:
            images, labels = _decode_split_tf(root, split)
        else:
            images, labels = _decode_split_pil(root, split, class_names)
        resized |= len({im.shape for im in images}) > 1
        arrays[f'{split}_images'] = _to_rgb_array(images, image_size, str(root / split))
        arrays[f'{split}_labels'] = np.asarray(labels, np.int32)
    raw = RawData(**arrays, class_names=class_names)
    cached = cache_file(image_size if resized else None)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f'.{os.getpid()}-{os.urandom(4).hex()}.tmp.npz')  # One per writer.
    np.savez(tmp, **arrays, class_names=np.asarray(class_names))
    os.replace(tmp, cached)
    return raw


# --- TFDS -------------------------------------------------------------------------------


def _missing_module(name: str, e: ImportError) -> DataError:
    # An install problem, not an offline one: the offline hint would send the user astray.
    return DataError(
        f'TFDS dataset {name!r} needs the Python module {e.name or e}, which is not installed; '
        'run `pip install -r requirements.txt`.'
    )


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
    try:
        arrays = {}
        for split in ('train', 'test'):
            # Batched iteration, not batch_size=-1 (which aborts TF 2.21 on generated data).
            ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
            xs, ys = zip(*tfds.as_numpy(ds.batch(4096)), strict=True)
            arrays[split] = (np.concatenate(xs), np.concatenate(ys))
    except ImportError as e:
        raise _missing_module(name, e) from None
    except Exception as e:
        raise _offline_error(name, e) from None
    (train_x, train_y), (test_x, test_y) = arrays['train'], arrays['test']
    names = builder.info.features['label'].names
    return RawData(
        np.asarray(train_x, np.uint8),
        np.asarray(train_y, np.int32),
        np.asarray(test_x, np.uint8),
        np.asarray(test_y, np.int32),
        list(names),
    )

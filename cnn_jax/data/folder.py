"""The 'folder:DIR' source: an image folder (or a .tar(.gz) of one) read into arrays.

DIR/{train,test}/<class>/*.jpg|png, decoded with Pillow as TFDS's ImageFolder would
decode it (same arrays, no TensorFlow) and cached as .npz; an archive is extracted once
into the cache. `folder_metadata` describes one from a listing and a header.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pathlib
import shutil
import tarfile
import tempfile

import numpy as np

from cnn_jax.data import images as images_lib
from cnn_jax.data.images import IMAGE_EXTENSIONS
from cnn_jax.data.sources import OFFLINE_HINT, Metadata, RawData, default_cache_dir
from cnn_jax.errors import DataError
from cnn_jax.records import Reporter


def _cache(cache_dir: str | None) -> pathlib.Path:
    return pathlib.Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def archive_key(archive: pathlib.Path, chunk: int = 1 << 20) -> str:
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
    """Extracts a .tar(.gz) once into the cache; returns the folder with train/ and test/.
    Each process extracts into a folder of its own and renames it into place (the first
    rename wins), so none reads another's half-written files."""
    target = cache_dir / f'extracted-{archive_key(archive)}'
    if not (target / '.complete').exists():
        Reporter().line(f'Extracting {archive} to {target} (once) ...')
        cache_dir.mkdir(parents=True, exist_ok=True)
        mine = pathlib.Path(tempfile.mkdtemp(prefix=target.name, suffix='.tmp', dir=cache_dir))
        try:
            with tarfile.open(archive) as tar:
                tar.extractall(mine, filter='data')
            (mine / '.complete').touch()
            if target.exists() and not (target / '.complete').exists():
                # Left by an interrupted extraction of an older cnn_jax.
                shutil.rmtree(target, ignore_errors=True)
            with contextlib.suppress(OSError):  # Another process's extraction is in place.
                os.rename(mine, target)
        except (tarfile.TarError, OSError) as e:
            raise DataError(f'cannot extract {archive}: {e}') from None
        finally:
            shutil.rmtree(mine, ignore_errors=True)
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


def folder_root(path: str, *, cache_dir: str | None = None) -> pathlib.Path:
    """The image folder of folder:PATH: PATH itself, or a .tar(.gz) extracted once."""
    root = pathlib.Path(path).expanduser()
    if root.is_file() and (root.name.endswith(('.tar.gz', '.tgz', '.tar'))):
        root = _extract_archive(root, _cache(cache_dir))
    return root


def read_folder(
    path: str, *, cache_dir: str | None = None, image_size: int | None = None
) -> RawData:
    """An image folder (or a .tar.gz of one), decoded once by Pillow threads and cached as
    .npz: tfds.ImageFolder's class order, example order and pixels (cnn_jax.data.images)."""
    cache = _cache(cache_dir)
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
                arrays = {k: z[k] for k in z.files}
            return RawData(**{**arrays, 'class_names': list(arrays['class_names'])})
    arrays, resized = {}, False
    for split in ('train', 'test'):
        paths, labels = images_lib.list_examples(root, split, class_names)
        try:
            images = images_lib.load_all(paths)
        except DataError as e:
            raise DataError(f'unreadable image in {root / split}: {e}') from None
        resized |= len({im.shape for im in images}) > 1
        arrays[f'{split}_images'] = _to_rgb_array(images, image_size, str(root / split))
        arrays[f'{split}_labels'] = np.asarray(labels, np.int32)
    cached = cache_file(image_size if resized else None)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f'.{os.getpid()}-{os.urandom(4).hex()}.tmp.npz')  # One per writer.
    np.savez(tmp, **arrays, class_names=np.asarray(class_names))
    os.replace(tmp, cached)
    return RawData(**arrays, class_names=class_names)


def _image_shape(data: bytes | pathlib.Path) -> tuple[int, int, int]:
    """(H, W, C) from an image header (PIL reads the header only; RGB unless grey)."""
    from PIL import Image

    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as im:
        w, h = im.size
        return h, w, 1 if im.mode in ('L', 'I', 'I;16', '1') else 3


def folder_metadata(path: pathlib.Path, cache_dir: str | None = None) -> Metadata:
    """Class folders and one image's shape: a listing and a header, nothing decoded."""
    if path.is_file() and path.name.endswith(('.tar.gz', '.tgz', '.tar')):
        return _archive_metadata(path, cache_dir)
    names = check_folder(path)
    split = path / 'train' / names[0]
    first = next(p for p in sorted(split.iterdir()) if p.suffix.lower() in IMAGE_EXTENSIONS)
    return Metadata(_image_shape(first), names)


def _archive_metadata(archive: pathlib.Path, cache_dir: str | None) -> Metadata:
    """Class folders and one image's shape from the member list of a tarball."""
    extracted = _cache(cache_dir) / f'extracted-{archive_key(archive)}'
    if (extracted / '.complete').exists():  # Already extracted by a run: list the folder.
        return folder_metadata(extracted_root(extracted))
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
                suffix = pathlib.PurePosixPath(rest[-1]).suffix.lower() if rest else ''
                if len(rest) != 2 or suffix not in IMAGE_EXTENSIONS:
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

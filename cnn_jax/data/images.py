"""Image files on the host: TFDS ImageFolder's example order and a decoder without TF.

`list_examples` and `decode_image` give what `tfds.ImageFolder` gives, with Pillow alone:
the same class order, example order and pixels. JPEGs are decoded with libjpeg's accurate
integer DCT, the default of Pillow and of torchvision, which TensorFlow gives with
dct_method='INTEGER_ACCURATE' (its default INTEGER_FAST differs by up to 5 per value).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from cnn_jax.errors import DataError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
# Pillow modes of 16-bit greyscale PNGs; TensorFlow keeps their high byte.
_SIXTEEN_BIT_MODES = ('I;16', 'I;16B', 'I;16L', 'I;16N', 'I')


def list_examples(
    root: str | os.PathLike, split: str, class_names: Sequence[str]
) -> tuple[list[str], np.ndarray]:
    """(paths, int32 labels) of root/split/<class>/*, in tfds.ImageFolder's order.

    ImageFolder lists sorted class folders, each one's sorted image paths, then shuffles
    the split with `random.Random(split)` (seeded by the string: the same in every
    process and Python run).
    """
    examples = []
    for label, name in enumerate(class_names):
        folder = os.path.join(os.path.expanduser(str(root)), split, name)
        paths = sorted(
            os.path.join(folder, f)
            for f in os.listdir(folder)
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        examples.extend((p, label) for p in paths)
    random.Random(split).shuffle(examples)
    return [p for p, _ in examples], np.asarray([label for _, label in examples], np.int32)


def decode_image(path: str | os.PathLike) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a JPEG or PNG, as TensorFlow's decode with channels=3.

    Greyscale is repeated over the channels and alpha is dropped (not composited), as
    TensorFlow does; only the first frame of an animation is read.
    """
    from PIL import Image

    with Image.open(path) as im:
        if im.mode in _SIXTEEN_BIT_MODES:
            grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=-1)
        return np.asarray(im.convert('RGB'))


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """A square `size` x `size` copy of a uint8 HWC image (Pillow bilinear)."""
    if image.shape[:2] == (size, size):
        return image
    from PIL import Image

    # Pillow's greyscale images have no channel axis.
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    resized = np.asarray(pil.resize((size, size), Image.BILINEAR))
    return resized.reshape(size, size, image.shape[-1])


def load(path: str, image_size: int | None = None) -> np.ndarray:
    """decode_image, resized to `image_size` when given; errors name the file."""
    try:
        image = decode_image(path)
    except Exception as e:  # noqa: BLE001 - any decoder failure names the file.
        raise DataError(f'cannot decode image {path}: {e}') from None
    return image if image_size is None else resize(image, image_size)


def default_workers() -> int:
    """Decode threads: Pillow releases the GIL while it decodes and resizes."""
    return min(32, (os.cpu_count() or 1) + 2)


def load_all(paths: Sequence[str]) -> list[np.ndarray]:
    """`load` over `paths` in a thread pool, in the order given."""
    with ThreadPoolExecutor(default_workers()) as pool:
        return list(pool.map(load, paths))

"""`folder:` reads the same arrays with TensorFlow (TFDS ImageFolder) and without (Pillow)."""

import pathlib
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from cnn_jax.data import folder as folder_lib
from cnn_jax.errors import DataError

REPO = pathlib.Path(__file__).resolve().parents[1]
CIFAR_ARCHIVE = REPO.parent / 'shared' / 'data' / 'cifar10-jpeg.tar.gz'

# Runs read_folder in a Python where TensorFlow cannot be imported, as on a GPU machine
# with JAX, PyTorch and Pillow only; saves what it read.
NO_TF_SCRIPT = """
import sys
for name in ('tensorflow', 'tensorflow_datasets'):
    sys.modules[name] = None  # `import tensorflow` now raises ImportError.
import numpy as np
from cnn_jax.data import folder as folder_lib
raw = folder_lib.read_folder(sys.argv[1], cache_dir=sys.argv[2])
np.savez(sys.argv[3], **raw._asdict())
"""

# (mode, extension) of the files make_folder writes, cycled over each class's images.
KINDS = [
    ('RGB', 'jpg'),
    ('L', 'jpeg'),
    ('RGBA', 'png'),
    ('P', 'png'),
    ('L', 'png'),
    ('I;16', 'png'),
    ('RGB', 'png'),
]


def make_folder(root, classes=('ant', 'bee', 'cat'), per_class=7, size=(12, 10)):
    """Every KINDS entry in every class; pixels differ per image so the order shows."""
    rng = np.random.default_rng(0)
    h, w = size
    ramp = np.add.outer(np.arange(h) * 9, np.arange(w) * 13)
    for split in ('train', 'test'):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for j in range(per_class):
                mode, ext = KINDS[j % len(KINDS)]
                noise = rng.integers(0, 60, (h, w, 3))
                rgb = ((ramp[..., None] + 70 * c + noise) % 256).astype(np.uint8)
                if mode == 'I;16':
                    im = Image.fromarray(rgb[..., 0].astype(np.uint16) * 257 + j)
                elif mode == 'RGBA':
                    im = Image.fromarray(np.dstack([rgb, rgb[..., :1]]), 'RGBA')
                else:
                    im = Image.fromarray(rgb).convert(mode)
                im.save(folder / f'{j:03d}.{ext}')
    return root


def read_without_tensorflow(root, tmp_path):
    out = tmp_path / 'no_tf.npz'
    subprocess.run(
        [sys.executable, '-c', NO_TF_SCRIPT, str(root), str(tmp_path / 'cache_pil'), str(out)],
        cwd=REPO,
        check=True,
        timeout=300,
    )
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


def read_with_tfds_image_folder(root):
    """The reference: TFDS ImageFolder's order, TensorFlow's decode with the accurate DCT."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    def decode(data):
        return tf.cond(
            tf.io.is_jpeg(data),
            lambda: tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
            lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
        )

    builder = tfds.ImageFolder(str(root))
    arrays = {'class_names': builder.info.features['label'].names}
    for split in ('train', 'test'):
        ds = builder.as_dataset(
            split=split,
            shuffle_files=False,
            as_supervised=True,
            decoders={'image': tfds.decode.SkipDecoding()},
        )
        pairs = list(tfds.as_numpy(ds.map(lambda data, label: (decode(data), label))))
        arrays[f'{split}_images'] = np.stack([image for image, _ in pairs])
        arrays[f'{split}_labels'] = np.asarray([label for _, label in pairs], np.int32)
    return folder_lib.RawData(**arrays)


def assert_same_arrays(raw, other):
    assert list(raw.class_names) == list(other['class_names'])
    for key in ('train_labels', 'test_labels', 'train_images', 'test_images'):
        np.testing.assert_array_equal(getattr(raw, key), other[key], err_msg=key)


def test_folder_without_tensorflow_equals_tfds_image_folder(tmp_path):
    root = make_folder(tmp_path / 'imgs')
    no_tf = read_without_tensorflow(root, tmp_path)
    with_tf = read_with_tfds_image_folder(root)
    assert with_tf.train_images.shape == (21, 12, 10, 3)
    # ImageFolder's shuffled order, not class by class: a sorted reader would fail here.
    assert list(with_tf.train_labels) != sorted(with_tf.train_labels)
    assert_same_arrays(with_tf, no_tf)


def test_pil_decoder_names_the_unreadable_file(tmp_path):
    root = make_folder(tmp_path / 'imgs')
    (root / 'train' / 'bee' / 'bad.jpg').write_bytes(b'not a jpeg at all')
    with pytest.raises(DataError, match=r'unreadable image in .*train: .*train/bee/bad\.jpg'):
        folder_lib.read_folder(str(root), cache_dir=str(tmp_path / 'c'))


def extract_sample(archive, target, per_class):
    """The first `per_class` JPEGs of every class and split of the CIFAR-10 archive."""
    counts = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            parts = pathlib.PurePosixPath(member.name).parts
            if not member.isfile() or len(parts) < 4:
                continue
            key = parts[-3:-1]  # (split, class)
            if counts.get(key, 0) < per_class:
                counts[key] = counts.get(key, 0) + 1
                tar.extract(member, target, filter='data')
    return target / pathlib.PurePosixPath(member.name).parts[0]


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_ARCHIVE.exists(), reason=f'{CIFAR_ARCHIVE} not present')
def test_real_cifar10_jpegs_read_without_tensorflow_as_with_it(tmp_path):
    """Measured on all 60,000 CIFAR-10 JPEGs: Pillow equals TensorFlow's INTEGER_ACCURATE
    decode exactly (TF's default INTEGER_FAST differs by up to 5). Here 2,000 of them, as an
    archive read in a Python without TensorFlow (extracted, listed, decoded by Pillow)."""
    root = extract_sample(CIFAR_ARCHIVE, tmp_path / 'x', per_class=100)
    archive = tmp_path / 'sample.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        tar.add(root, arcname=root.name)
    with_tf = read_with_tfds_image_folder(root)
    assert with_tf.train_images.shape == (1000, 32, 32, 3)
    assert 'airplane' in with_tf.class_names
    assert np.bincount(with_tf.test_labels).tolist() == [100] * 10
    assert_same_arrays(with_tf, read_without_tensorflow(archive, tmp_path))

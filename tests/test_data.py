"""Every dataset kind loads; every bad input ends with a message naming the path or value."""

import gzip
import os
import pathlib
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cnn_jax import data
from cnn_jax.data import sources
from cnn_jax.errors import ConfigError, DataError
from tests.conftest import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def write_idx(path, array, gz=True):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[np.uint8], array.ndim]) + struct.pack(
        f'>{array.ndim}I', *array.shape
    )
    payload = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + '.gz', 'wb') as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def make_idx_dir(root, train_labels=(0, 1, 2, 3, 4, 5), test_labels=(9, 8)):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    write_idx(root / 'train-images-idx3-ubyte', rng.integers(0, 255, (len(train_labels), 28, 28)))
    write_idx(root / 'train-labels-idx1-ubyte', np.asarray(train_labels), gz=False)
    write_idx(root / 't10k-images-idx3-ubyte', rng.integers(0, 255, (len(test_labels), 28, 28)))
    write_idx(root / 't10k-labels-idx1-ubyte', np.asarray(test_labels))
    return root


def make_folder(root, classes=('cat', 'dog'), per_class=3, size=(12, 10)):
    rng = np.random.default_rng(0)
    for split in ('train', 'test'):
        for i, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for j in range(per_class):
                pixels = np.zeros((*size, 3), np.uint8)
                pixels[..., 0] = 40 * i  # Class-dependent red channel, checked below.
                pixels[..., 1] = rng.integers(100, 140)
                ext = 'png' if j % 2 else 'jpg'
                Image.fromarray(pixels).save(d / f'{j}.{ext}')
    return root


def test_digits_as_shipped():
    ds = data.load_dataset(tiny_config(val_fraction=0.1))
    assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
    assert len(ds.train) + len(ds.val) + len(ds.test) == 1797
    assert ds.train.images.dtype == np.uint8 and ds.train.images.max() == 255
    # The split is deterministic and disjoint.
    again = data.load_dataset(tiny_config(val_fraction=0.1))
    np.testing.assert_array_equal(ds.val.labels, again.val.labels)


def test_idx_reads_gzipped_and_plain(tmp_path):
    make_idx_dir(tmp_path / 'idx')
    ds = data.load_dataset(tiny_config(dataset=f'idx:{tmp_path / "idx"}', val_fraction=0.0))
    assert ds.train.images.shape == (6, 28, 28, 1)
    np.testing.assert_array_equal(ds.train.labels, [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(ds.test.labels, [9, 8])
    assert ds.val is None


def test_idx_label_outside_range_names_value(tmp_path):
    make_idx_dir(tmp_path / 'idx', train_labels=(0, 1, 12))
    with pytest.raises(DataError, match=r'label 12 at index 2 is outside the class range 0\.\.9'):
        data.load_dataset(tiny_config(dataset=f'idx:{tmp_path / "idx"}'))


def test_idx_missing_file_named(tmp_path):
    root = make_idx_dir(tmp_path / 'idx')
    (root / 't10k-labels-idx1-ubyte.gz').unlink()
    with pytest.raises(DataError, match='missing t10k-labels-idx1-ubyte'):
        data.load_dataset(tiny_config(dataset=f'idx:{root}'))


def test_folder_reads_images_with_class_names(tmp_path):
    root = make_folder(tmp_path / 'imgs')
    ds = data.load_dataset(tiny_config(dataset=f'folder:{root}', val_fraction=0.0))
    assert ds.class_names == ['cat', 'dog']
    assert ds.train.images.shape == (6, 12, 10, 3)
    # The red channel carries the class (jpeg is lossy: compare means).
    for label, red in ((0, 0), (1, 40)):
        mean_red = ds.train.images[ds.train.labels == label][..., 0].mean()
        assert abs(mean_red - red) < 4


def test_folder_archive_is_extracted_and_cached(tmp_path):
    import tarfile

    root = make_folder(tmp_path / 'imgs')
    archive = tmp_path / 'imgs.tar.gz'
    with tarfile.open(archive, 'w:gz') as tar:
        tar.add(root, arcname='imgs')
    cfg = tiny_config(dataset=f'folder:{archive}', val_fraction=0.0, cache_dir=str(tmp_path / 'c'))
    first = data.load_dataset(cfg)
    second = data.load_dataset(cfg)  # From the .npz cache.
    np.testing.assert_array_equal(first.train.images, second.train.images)
    assert list((tmp_path / 'c').glob('folder-*.npz'))
    # A copy elsewhere with another mtime is the same content: no second extraction.
    copy = tmp_path / 'elsewhere' / 'copy.tar.gz'
    copy.parent.mkdir()
    copy.write_bytes(archive.read_bytes())
    os.utime(copy, (1e9, 1e9))
    cfg.dataset = f'folder:{copy}'
    third = data.load_dataset(cfg)
    np.testing.assert_array_equal(first.train.images, third.train.images)
    assert len(list((tmp_path / 'c').glob('extracted-*'))) == 1
    assert len(list((tmp_path / 'c').glob('folder-*.npz'))) == 1


@pytest.mark.parametrize(
    'breakage, match',
    [
        ('missing', 'does not exist'),
        ('no_test', 'has no test/ sub-folder'),
        ('empty_split', 'is empty: expected one sub-folder per class'),
        ('empty_class', r'class folder .*train/dog has no images'),
        ('corrupt', r'unreadable image in .*: .*train/cat/bad\.jpg'),
    ],
)
def test_folder_errors_name_the_path(tmp_path, breakage, match):
    root = tmp_path / 'imgs'
    if breakage != 'missing':
        make_folder(root)
    if breakage == 'no_test':
        for f in (root / 'test').rglob('*.*'):
            f.unlink()
        for d in sorted((root / 'test').rglob('*'), reverse=True):
            d.rmdir()
        (root / 'test').rmdir()
    elif breakage == 'empty_split':
        for d in ('cat', 'dog'):
            for f in (root / 'test' / d).iterdir():
                f.unlink()
            (root / 'test' / d).rmdir()
    elif breakage == 'empty_class':
        for f in (root / 'train' / 'dog').iterdir():
            f.unlink()
    elif breakage == 'corrupt':
        (root / 'train' / 'cat' / 'bad.jpg').write_bytes(b'not a jpeg at all')
    with pytest.raises(DataError, match=match):
        data.load_dataset(tiny_config(dataset=f'folder:{root}'))


def test_tfds_by_name_through_mock_data(monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setenv('CNN_JAX_OFFLINE', '0')  # The mock downloads nothing.

    with tfds.testing.mock_data(num_examples=20):
        ds = data.load_dataset(tiny_config(dataset='mnist', val_fraction=0.25))
    assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
    assert len(ds.train) == 15 and len(ds.val) == 5 and len(ds.test) == 20


def test_tfds_offline_failure_names_alternatives(monkeypatch):
    import tensorflow_datasets as tfds

    def no_network(self, *args, **kwargs):
        raise ConnectionError('Failed to establish a new connection')

    monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', no_network)
    with pytest.raises(DataError, match=r"could not download .*'cifar10'.*digits.*idx:.*folder:"):
        data.load_dataset(tiny_config(dataset='cifar10', data_dir='/nonexistent-tfds'))


def test_tfds_unprepared_name_offline_reaches_download_and_names_alternatives(
    tmp_path, monkeypatch
):
    """The real TFDS download path, not a mock: it must import, try the network, and fail
    with the offline hint (a missing importlib_resources used to end it before that)."""
    import socket

    from tensorflow_datasets.core.download import downloader

    def no_network(*args, **kwargs):
        raise OSError('network disabled by the test')

    monkeypatch.setattr(socket.socket, 'connect', no_network)
    monkeypatch.setattr(socket, 'getaddrinfo', no_network)
    # urllib3 would back off for ~3.5 minutes over TFDS's 10 retries before giving up.
    monkeypatch.setattr(downloader, 'MAX_RETRIES', 0)
    with pytest.raises(DataError) as info:
        data.load_dataset(tiny_config(dataset='mnist', data_dir=str(tmp_path / 'tfds')))
    message = str(info.value)
    assert "could not download or prepare TFDS dataset 'mnist'" in message
    assert 'network disabled by the test' in message or 'Connection' in message
    assert 'folder:DIR' in message and '--config.manual_dir' in message
    assert 'No module named' not in message


def test_tfds_missing_module_is_an_install_error_not_offline(monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.setenv('CNN_JAX_OFFLINE', '0')  # Online, the download step imports it.

    def missing(self, *args, **kwargs):
        raise ModuleNotFoundError(
            "No module named 'importlib_resources'", name='importlib_resources'
        )

    monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', missing)
    with pytest.raises(DataError, match='needs the Python module importlib_resources.*pip install'):
        data.load_dataset(tiny_config(dataset='mnist', data_dir='/nonexistent-tfds'))


def test_offline_launch_of_a_tfds_config_fails_at_once_with_the_hint(tmp_path):
    """The project's headline command offline: the hint and exit 2, not TFDS's retries.
    CNN_JAX_OFFLINE=1 makes the network check fail as a machine without one does."""
    r = subprocess.run(
        [sys.executable, 'launch.py', '--config=configs/vgg.py', f'--workdir={tmp_path / "w"}'],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, 'CNN_JAX_OFFLINE': '1', 'TFDS_DATA_DIR': str(tmp_path / 'tfds')},
    )
    assert r.returncode == 2, r.stderr[-2000:]
    assert "error: could not download or prepare TFDS dataset 'cifar10' (no network" in r.stderr
    assert '--config.dataset=folder:DIR' in r.stderr and 'Traceback' not in r.stderr
    assert 'Retrying' not in r.stderr


def test_unknown_dataset_lists_known_kinds():
    with pytest.raises(DataError, match='unknown dataset .*digits, idx:DIR, folder:DIR'):
        data.load_dataset(tiny_config(dataset='no_such_dataset_xyz'))


def test_class_subset_merge_and_one_vs_rest():
    ds = data.load_dataset(tiny_config(classes=('3', 7), val_fraction=0.0))
    assert ds.class_names == ['3', '7'] and set(np.unique(ds.test.labels)) == {0, 1}
    merged = data.load_dataset(
        tiny_config(label_groups=((0, 6), (1, 7), (2, 3, 5, 8), (4, 9)), val_fraction=0.0)
    )
    full = data.load_dataset(tiny_config(val_fraction=0.0))
    table = np.array([0, 1, 2, 2, 3, 2, 0, 1, 2, 3])
    np.testing.assert_array_equal(merged.test.labels, table[full.test.labels])
    assert merged.class_names == ['0+6', '1+7', '2+3+5+8', '4+9']
    ovr = data.load_dataset(tiny_config(one_vs_rest='4', val_fraction=0.0))
    np.testing.assert_array_equal(ovr.test.labels, (full.test.labels == 4).astype(int))
    assert ovr.class_names == ['not 4', '4']


def test_label_option_errors():
    with pytest.raises(ConfigError, match="unknown class 'eleven'"):
        data.load_dataset(tiny_config(classes=('1', 'eleven')))
    with pytest.raises(ConfigError, match='leaves classes'):
        data.load_dataset(tiny_config(label_groups=((0, 1), (2, 3))))


def test_normalisation_stats():
    ds = data.load_dataset(tiny_config())
    x = ds.train.images.astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(ds.std, x.std(axis=(0, 1, 2)), rtol=1e-5)


def test_read_idx_rejects_wrong_magic(tmp_path):
    p = tmp_path / 'x-idx3-ubyte'
    p.write_bytes(b'\x01\x02\x03\x04')
    with pytest.raises(DataError, match='bad magic number'):
        sources.read_idx_file(p)


def test_quick_run_subsets_are_deterministic_and_sized():
    cfg = tiny_config(max_train_examples=100, max_eval_examples=50)
    a, b = data.load_dataset(cfg), data.load_dataset(cfg)
    assert (len(a.train), len(a.val), len(a.test)) == (100, 50, 50)
    np.testing.assert_array_equal(a.test.images, b.test.images)
    full = data.load_dataset(tiny_config())
    # A subset of the full test split, not new data.
    assert {x.tobytes() for x in a.test.images} <= {x.tobytes() for x in full.test.images}

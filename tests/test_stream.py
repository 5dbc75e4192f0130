"""The streaming input: shares, order, resumption, eval padding, pixels, devices, budget.

Processes are played by passing process_index/process_count; no real multi-process run.
"""

import threading

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cnn_jax import data, parallel
from cnn_jax.data import folder as folder_lib
from cnn_jax.data import sources, stream
from cnn_jax.data.resolve import parse_source
from cnn_jax.errors import ConfigError, DataError
from tests.conftest import tiny_config
from tests.test_folder_decode import make_folder

N_TRAIN = 21  # make_folder: 3 classes x 7 images per split.


def open_stream(dataset, split, data_dir=None, **options):
    """A stream of `split` of the dataset string, as the training loads it."""
    return parse_source(dataset, data_dir=data_dir).stream(split, **options)


class StreamToy(tfds.core.GeneratorBasedBuilder):
    """A tiny TFDS dataset prepared offline: unique random pixels, labels i % 3."""

    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {
                    'image': tfds.features.Image(shape=(6, 5, 3)),
                    'label': tfds.features.ClassLabel(num_classes=3),
                }
            ),
            supervised_keys=('image', 'label'),
        )

    def _split_generators(self, dl_manager):
        return {'train': self._generate_examples(40, 0), 'test': self._generate_examples(13, 1)}

    def _generate_examples(self, n, seed):
        rng = np.random.default_rng(seed)
        for i in range(n):
            image = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
            yield i, {'image': image, 'label': i % 3}


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp('stream') / 'imgs')


@pytest.fixture(scope='module')
def toy_dir(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp('tfds')
    sources.tfds_builder('stream_toy', data_dir=str(data_dir), manual_dir=None)
    return str(data_dir)


def folder_stream(root, split='train', **kwargs):
    """A stream of the folder `root` with 2 decode threads."""
    kwargs.setdefault('workers', 2)
    return open_stream(f'folder:{root}', split, **kwargs)


def stacked(batches):
    """(index, images, labels, mask) of a list of batches, concatenated."""
    return (
        np.concatenate([b.index for b in batches]),
        np.concatenate([b.images for b in batches]),
        np.concatenate([b.labels for b in batches]),
        np.concatenate([b.mask for b in batches]),
    )


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        for field in ('images', 'labels', 'mask', 'index'):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field), err_msg=field)


# --- order ------------------------------------------------------------------------------


def epoch_order(n=N_TRAIN, batch_size=4, seed=0):
    """A (steps, B) global order, as the training loop's steps.permutation gives one."""
    return (
        np.random.default_rng(seed)
        .permutation(n)[: n // batch_size * batch_size]
        .reshape(-1, batch_size)
    )


@pytest.mark.parametrize('n, processes', [(21, 1), (21, 2), (21, 3), (10, 4), (3, 4)])
def test_shard_bounds_partition_the_examples(n, processes):
    bounds = [stream.shard_bounds(n, p, processes) for p in range(processes)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize('processes, batch_size', [(1, 4), (2, 4), (3, 6)])
def test_shares_are_disjoint_and_their_union_is_the_epoch(folder, processes, batch_size):
    order = epoch_order(batch_size=batch_size)
    shares = []
    for p in range(processes):
        s = folder_stream(folder, process_index=p, process_count=processes)
        batches = list(s.train(order))
        assert [len(b.index) for b in batches] == [batch_size // processes] * len(order)
        shares.append(np.stack([b.index for b in batches]))
    everything = np.concatenate([share.ravel() for share in shares])
    assert len(np.unique(everything)) == len(everything)  # Disjoint.
    # Global batch s is the shares of row s in process order: the order itself.
    np.testing.assert_array_equal(np.concatenate(shares, axis=1), order)


@pytest.mark.parametrize('start_step', [1, 3])
def test_resuming_mid_epoch_yields_the_remaining_batches(folder, start_step):
    order = epoch_order()
    for p in range(2):
        s = folder_stream(folder, process_index=p, process_count=2)
        whole = list(s.train(order))
        assert_same_batches(list(s.train(order, start_step=start_step)), whole[start_step:])


@pytest.mark.parametrize('processes, batch_size', [(1, 4), (2, 4), (3, 6), (4, 8)])
def test_eval_padding_counts_every_example_once(folder, processes, batch_size):
    resident = folder_lib.read_folder(str(folder))
    counted, steps = [], set()
    for p in range(processes):
        s = folder_stream(folder, 'test', process_index=p, process_count=processes)
        batches = list(s.eval(batch_size))
        steps.add(len(batches))
        for b in batches:
            assert b.images.shape == (batch_size // processes, 12, 10, 3)
            real = b.mask == 1
            assert (b.index[~real] == -1).all() and (b.images[~real] == 0).all()
            np.testing.assert_array_equal(b.labels[real], resident.test_labels[b.index[real]])
            counted.extend(b.index[real])
    assert steps == {-(-N_TRAIN // batch_size)}  # Global batches, the same on all.
    np.testing.assert_array_equal(np.sort(counted), np.arange(N_TRAIN))


# --- pixels -----------------------------------------------------------------------------


def test_pixels_equal_the_device_resident_loader(folder):
    resident = folder_lib.read_folder(str(folder))  # TensorFlow's decode where installed.
    s = folder_stream(folder, process_index=1, process_count=2)
    index, images, labels, _ = stacked(list(s.train(epoch_order())))
    np.testing.assert_array_equal(images, resident.train_images[index])
    np.testing.assert_array_equal(labels, resident.train_labels[index])
    index, images, _, mask = stacked(list(folder_stream(folder, 'test').eval(8)))
    real = mask == 1
    np.testing.assert_array_equal(images[real], resident.test_images[index[real]])


def make_mixed_sizes(root):
    rng = np.random.default_rng(1)
    for split in ('train', 'test'):
        for c in ('a', 'b'):
            (root / split / c).mkdir(parents=True)
            for j, size in enumerate([(9, 7), (12, 12), (5, 16)]):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f'{j}.png')
    return root


def test_mixed_sizes_resize_on_the_host_as_the_resident_loader(tmp_path):
    root = make_mixed_sizes(tmp_path / 'mixed')
    resident = folder_lib.read_folder(str(root), cache_dir=str(tmp_path / 'c'), image_size=8)
    s = folder_stream(root, image_size=8)
    index, images, _, _ = stacked(list(s.train(epoch_order(6, 2))))
    assert images.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(images, resident.train_images[index])
    with pytest.raises(DataError, match=r'\.png: image is .* set --config.image_size'):
        list(folder_stream(root).train(epoch_order(6, 2)))


# --- TFDS -------------------------------------------------------------------------------


def test_tfds_stream_shards_order_resume_selection_and_pixels(toy_dir):
    resident = sources.read_tfds('stream_toy', data_dir=toy_dir, manual_dir=None)
    seen = []
    for p in range(2):
        s = open_stream('stream_toy', 'train', data_dir=toy_dir, process_index=p, process_count=2)
        np.testing.assert_array_equal(s.labels, resident.train_labels)
        batches = list(s.train(epoch_order(40, 6, seed=1)))
        assert len(batches) == 6 and batches[0].images.shape == (3, 6, 5, 3)
        assert_same_batches(list(s.train(epoch_order(40, 6, seed=1))), batches)  # Same epoch.
        assert_same_batches(list(s.train(epoch_order(40, 6, seed=1), 4)), batches[4:])
        index, images, labels, _ = stacked(batches)
        start, stop = stream.shard_bounds(40, p, 2)
        assert ((index >= start) & (index < stop)).all()  # Only its own shard.
        np.testing.assert_array_equal(images, resident.train_images[index])  # Same decode.
        np.testing.assert_array_equal(labels, resident.train_labels[index])
        other = stacked(list(s.train(epoch_order(40, 6, seed=2))))[0]
        assert list(other) != list(index)  # Another epoch, another order.
        seen.append(set(index))
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 36  # 2 x 6 steps x 3.
    # A selection (a validation split's, relabelled) reads only its examples.
    chosen = np.arange(1, 40, 3)
    s = open_stream('stream_toy', 'train', data_dir=toy_dir, process_count=1)
    part = s.take(chosen, labels=np.arange(len(chosen)) % 2)
    index, images, labels, _ = stacked(list(part.train(epoch_order(len(chosen), 2))))
    np.testing.assert_array_equal(images, resident.train_images[chosen[index]])
    np.testing.assert_array_equal(labels, index % 2)
    np.testing.assert_array_equal(part.examples(np.array([0, 5])), resident.train_images[[1, 16]])


def test_tfds_eval_counts_every_example_once(toy_dir):
    resident = sources.read_tfds('stream_toy', data_dir=toy_dir, manual_dir=None)
    counted = []
    for p in range(3):
        s = open_stream('stream_toy', 'test', data_dir=toy_dir, process_index=p, process_count=3)
        batches = list(s.eval(6))
        assert len(batches) == 3  # ceil(13 / 6) global batches.
        for b in batches:
            assert b.images.shape == (2, 6, 5, 3)
            real = b.mask == 1
            np.testing.assert_array_equal(b.images[real], resident.test_images[b.index[real]])
            counted.extend(b.index[real])
    np.testing.assert_array_equal(np.sort(counted), np.arange(13))


# --- prefetch and devices ---------------------------------------------------------------


def test_prefetch_keeps_order_and_raises_the_producers_error():
    def items():
        yield from range(5)
        raise KeyError('broken file')

    got = []
    with pytest.raises(KeyError, match='broken file'):
        for x in stream.prefetch(items(), 2):
            got.append(x)
    assert got == [0, 1, 2, 3, 4]


def test_leaving_a_prefetched_loop_early_stops_its_thread_and_source():
    closed = threading.Event()

    def endless():
        try:
            i = 0
            while True:
                yield i
                i += 1
        finally:
            closed.set()

    def prefetchers():
        return [t for t in threading.enumerate() if t.name == 'cnn_jax-prefetch']

    it = stream.prefetch(endless(), 3)
    assert [next(it) for _ in range(4)] == [0, 1, 2, 3]
    assert len(prefetchers()) == 1
    it.close()
    assert closed.is_set() and not prefetchers()


def test_to_device_shards_the_global_batch_over_the_data_axis(folder):
    mesh = parallel.make_mesh()
    n = mesh.devices.size
    batch = next(iter(folder_stream(folder).train(epoch_order(batch_size=n))))
    arrays = stream.to_device(batch, mesh)
    assert arrays['image'].shape == (n, 12, 10, 3) and arrays['image'].dtype == np.uint8
    assert arrays['image'].sharding.is_equivalent_to(parallel.data_sharding(mesh), 4)
    for shard in arrays['image'].addressable_shards:  # Row i on device i.
        np.testing.assert_array_equal(shard.data, batch.images[shard.index])
    for key, field in (('label', 'labels'), ('mask', 'mask')):
        np.testing.assert_array_equal(jax.device_get(arrays[key]), getattr(batch, field))


def test_open_stream_by_dataset_string(folder, toy_dir):
    s = open_stream(f'folder:{folder}', 'test', process_count=1)
    assert isinstance(s, stream.FolderStream) and s.class_names == ['ant', 'bee', 'cat']
    t = open_stream('stream_toy', 'train', data_dir=toy_dir)
    assert isinstance(t, stream.TfdsStream) and len(t) == 40
    with pytest.raises(ConfigError, match="cannot stream.*input_mode='device'"):
        open_stream('digits', 'train')
    three = open_stream(f'folder:{folder}', 'train', process_count=3, process_index=0)
    with pytest.raises(ConfigError, match='does not divide over 3 processes'):
        three.train(epoch_order(batch_size=4))


# --- memory budget ----------------------------------------------------------------------


class ReportingDevice:
    """A device whose runtime reports a memory limit, as GPUs and TPUs do."""

    def memory_stats(self):
        return {'bytes_limit': 16 * 2**30, 'bytes_in_use': 0}


def test_dataset_bytes_and_budget():
    assert stream.dataset_bytes(60000, (32, 32, 3)) == 60000 * (3072 + 4)
    assert stream.device_memory_budget(1.5) == int(1.5 * 2**30)
    assert stream.device_memory_budget(device=ReportingDevice()) == 8 * 2**30
    # The CPU backend reports no limit: the fixed default.
    assert jax.local_devices()[0].memory_stats() is None
    assert stream.device_memory_budget() == stream.CPU_BUDGET_BYTES


def test_auto_streams_what_exceeds_the_budget(folder, capsys):
    config = tiny_config(dataset=f'folder:{folder}', val_fraction=0.25, max_eval_examples=9)
    resident = data.load_dataset(config)
    # Tiny: 'auto' keeps it on the devices.
    assert isinstance(data.load_dataset(config, allow_streams=True).train, data.Split)
    assert 'Input: device-resident (1.' in capsys.readouterr().out
    config.device_memory_budget_gb = 1e-6
    streamed = data.load_dataset(config, allow_streams=True)
    assert 'Input: streamed from the host (1.' in capsys.readouterr().out
    # The same examples in the same splits (validation held out alike), the same statistics.
    for split in ('train', 'val', 'test'):
        got, want = getattr(streamed, split), getattr(resident, split)
        assert isinstance(got, stream.FolderStream)
        np.testing.assert_array_equal(got.examples(np.arange(len(got))), want.images)
        np.testing.assert_array_equal(got.labels, want.labels)
    np.testing.assert_array_equal(streamed.mean, resident.mean)
    np.testing.assert_array_equal(streamed.std, resident.std)


def test_strided_subset_caps_a_split_and_keeps_every_class(folder):
    """The capped final train evaluation (max_eval_examples) of a class-sorted folder,
    through the split interface both kinds of split share."""
    config = tiny_config(dataset=f'folder:{folder}')
    resident = data.load_dataset(config).train
    config.device_memory_budget_gb = 1e-6
    streamed = data.load_dataset(config, allow_streams=True).train
    mesh = parallel.make_mesh()
    device, placed = resident.on_devices(mesh), streamed.on_devices(mesh)
    assert device.strided(None) is device
    assert placed.strided(100) is placed
    part = device.strided(8)
    labels = np.asarray(part.labels)
    np.testing.assert_array_equal(labels, resident.labels[::3])  # 21 examples, stride 3.
    assert sorted(set(labels.tolist())) == [0, 1, 2]
    streamed_part = placed.strided(8)
    np.testing.assert_array_equal(streamed_part.labels, labels)
    images = streamed_part.examples(np.arange(len(streamed_part)))
    np.testing.assert_array_equal(images, np.asarray(part.images))
    # Both serve the same evaluation batches (the resident one by index), padding masked.
    for a, b in zip(part.eval_inputs(8), streamed_part.eval_inputs(8), strict=True):
        index, mask = np.asarray(a[2]), np.asarray(a[3])
        np.testing.assert_array_equal(mask, np.asarray(b[3]))
        real = mask.astype(bool)
        np.testing.assert_array_equal(np.asarray(a[0])[index][real], np.asarray(b[0])[real])
        np.testing.assert_array_equal(np.asarray(a[1])[index][real], np.asarray(b[1])[real])

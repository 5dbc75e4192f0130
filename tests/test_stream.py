"""The streaming input: shards, order, resumption, eval padding, pixels, devices, budget.

Processes are played by passing process_index/process_count; no real multi-process run.
"""

import threading

import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cnn_jax import parallel
from cnn_jax.data import budget, sources, stream
from cnn_jax.errors import ConfigError, DataError
from tests.test_folder_decode import make_folder

N_TRAIN = 21  # make_folder: 3 classes x 7 images per split.


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
    kwargs.setdefault('workers', 2)
    return stream.FolderStream.from_folder(str(root), split, **kwargs)


def stacked(batches):
    """(index, images, labels, mask) of a list of batches, concatenated."""
    index = [b.index for b in batches] if batches[0].index is not None else None
    return (
        None if index is None else np.concatenate(index),
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


@pytest.mark.parametrize('n, processes', [(21, 1), (21, 2), (21, 3), (10, 4), (3, 4)])
def test_shard_bounds_partition_the_examples(n, processes):
    bounds = [stream.shard_bounds(n, p, processes) for p in range(processes)]
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(stop == start for (_, stop), (start, _) in zip(bounds, bounds[1:], strict=False))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize('processes, batch_size', [(1, 4), (2, 4), (3, 6)])
def test_shards_are_disjoint_and_an_epoch_is_their_batches(folder, processes, batch_size):
    seen = []
    for p in range(processes):
        s = folder_stream(folder, batch_size=batch_size, process_index=p, process_count=processes)
        batches = list(s.train(seed=5, epoch=2))
        assert (
            len(batches) == s.steps_per_epoch == (N_TRAIN // processes) // (batch_size // processes)
        )
        index = stacked(batches)[0]
        start, stop = stream.shard_bounds(N_TRAIN, p, processes)
        assert ((index >= start) & (index < stop)).all()  # Only its own shard.
        seen.append(index)
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == len(everything)  # Disjoint, no repeats.
    assert len(everything) == len(batches) * batch_size


def test_when_batches_divide_the_shards_the_epoch_is_every_example():
    index = np.concatenate(
        [
            stream.train_order(
                24, batch_size=6, seed=1, epoch=0, process_index=p, process_count=3
            ).ravel()
            for p in range(3)
        ]
    )
    np.testing.assert_array_equal(np.sort(index), np.arange(24))


def test_order_is_a_function_of_seed_and_epoch(folder):
    def epoch(seed, e, p=1):
        s = folder_stream(folder, batch_size=4, process_index=p, process_count=2)
        return list(s.train(seed=seed, epoch=e))

    first = epoch(3, 1)
    assert_same_batches(first, epoch(3, 1))  # A fresh stream, the same batches.
    order = stacked(first)[0]
    assert not np.array_equal(order, stacked(epoch(3, 2))[0])
    assert not np.array_equal(order, stacked(epoch(4, 1))[0])
    assert not np.array_equal(order, stacked(epoch(3, 1, p=0))[0])


@pytest.mark.parametrize('start_step', [1, 3])
def test_resuming_mid_epoch_yields_the_remaining_batches(folder, start_step):
    for p in range(2):
        s = folder_stream(folder, batch_size=4, process_index=p, process_count=2)
        whole = list(s.train(seed=7, epoch=4))
        assert_same_batches(
            list(s.train(seed=7, epoch=4, start_step=start_step)), whole[start_step:]
        )


@pytest.mark.parametrize('processes, batch_size', [(1, 4), (2, 4), (3, 6), (4, 8)])
def test_eval_padding_counts_every_example_once(folder, processes, batch_size):
    resident = sources.read_folder(str(folder))
    counted, steps = [], set()
    for p in range(processes):
        s = folder_stream(
            folder, 'test', batch_size=batch_size, process_index=p, process_count=processes
        )
        batches = list(s.eval())
        steps.add(len(batches))
        for b in batches:
            assert b.images.shape == (batch_size // processes, 12, 10, 3)
            real = b.mask == 1
            assert (b.index[~real] == -1).all() and (b.images[~real] == 0).all()
            np.testing.assert_array_equal(b.labels[real], resident.test_labels[b.index[real]])
            counted.extend(b.index[real])
    assert steps == {stream.eval_steps(N_TRAIN, batch_size, processes)}  # Same on all.
    np.testing.assert_array_equal(np.sort(counted), np.arange(N_TRAIN))


# --- pixels -----------------------------------------------------------------------------


def test_pixels_equal_the_device_resident_loader(folder):
    resident = sources.read_folder(str(folder))  # TensorFlow's decode where installed.
    s = folder_stream(folder, batch_size=4, process_index=1, process_count=2)
    index, images, labels, _ = stacked(list(s.train(seed=0, epoch=0)))
    np.testing.assert_array_equal(images, resident.train_images[index])
    np.testing.assert_array_equal(labels, resident.train_labels[index])
    index, images, _, mask = stacked(list(folder_stream(folder, 'test', batch_size=8).eval()))
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
    resident = sources.read_folder(str(root), cache_dir=str(tmp_path / 'c'), image_size=8)
    s = folder_stream(root, batch_size=2, image_size=8)
    index, images, _, _ = stacked(list(s.train(seed=0, epoch=0)))
    assert images.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(images, resident.train_images[index])
    with pytest.raises(DataError, match=r'\.png: image is .* set --config.image_size'):
        list(folder_stream(root, batch_size=2).train(seed=0, epoch=0))


# --- TFDS -------------------------------------------------------------------------------


def test_tfds_stream_shards_order_resume_and_pixels(toy_dir):
    resident = sources.read_tfds('stream_toy', data_dir=toy_dir, manual_dir=None)
    label_of = {
        im.tobytes(): label
        for im, label in zip(resident.train_images, resident.train_labels, strict=True)
    }
    assert len(label_of) == 40
    seen = []
    for p in range(2):
        s = stream.TfdsStream.from_name(
            'stream_toy', 'train', data_dir=toy_dir, batch_size=6, process_index=p, process_count=2
        )
        batches = list(s.train(seed=1, epoch=0))
        assert len(batches) == s.steps_per_epoch == 6
        assert_same_batches(list(s.train(seed=1, epoch=0)), batches)  # Deterministic.
        assert_same_batches(list(s.train(seed=1, epoch=0, start_step=4)), batches[4:])
        _, images, labels, _ = stacked(batches)
        assert [label_of[im.tobytes()] for im in images] == list(labels)  # Same decode.
        seen.append({im.tobytes() for im in images})
        other = stacked(list(s.train(seed=1, epoch=1)))[1]
        assert [im.tobytes() for im in other] != [im.tobytes() for im in images]
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 36  # 2 x 6 steps x 3.


def test_tfds_eval_counts_every_example_once(toy_dir):
    resident = sources.read_tfds('stream_toy', data_dir=toy_dir, manual_dir=None)
    counted = []
    for p in range(3):
        s = stream.TfdsStream.from_name(
            'stream_toy', 'test', data_dir=toy_dir, batch_size=6, process_index=p, process_count=3
        )
        batches = list(s.eval())
        assert len(batches) == stream.eval_steps(13, 6, 3) == 3
        for b in batches:
            assert b.images.shape == (2, 6, 5, 3)
            counted.extend(im.tobytes() for im in b.images[b.mask == 1])
    assert sorted(counted) == sorted(im.tobytes() for im in resident.test_images)


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
    batch = next(iter(folder_stream(folder, batch_size=n).train(seed=0, epoch=0)))
    arrays = stream.to_device(batch, mesh)
    assert arrays['image'].shape == (n, 12, 10, 3) and arrays['image'].dtype == np.uint8
    assert arrays['image'].sharding.is_equivalent_to(parallel.data_sharding(mesh), 4)
    for shard in arrays['image'].addressable_shards:  # Row i on device i.
        np.testing.assert_array_equal(shard.data, batch.images[shard.index])
    np.testing.assert_array_equal(jax.device_get(arrays['label']), batch.labels)
    np.testing.assert_array_equal(jax.device_get(arrays['mask']), batch.mask)


def test_open_stream_by_dataset_string(folder, toy_dir):
    s = stream.open_stream(f'folder:{folder}', 'test', batch_size=4, process_count=1)
    assert isinstance(s, stream.FolderStream) and s.class_names == ['ant', 'bee', 'cat']
    t = stream.open_stream('stream_toy', 'train', batch_size=4, data_dir=toy_dir)
    assert isinstance(t, stream.TfdsStream) and t.num_examples == 40
    with pytest.raises(ConfigError, match="cannot stream.*input_mode='device'"):
        stream.open_stream('digits', 'train', batch_size=4)
    with pytest.raises(ConfigError, match='does not divide over 3 processes'):
        stream.open_stream(
            f'folder:{folder}', 'train', batch_size=4, process_count=3, process_index=0
        )


# --- memory budget ----------------------------------------------------------------------


class ReportingDevice:
    """A device whose runtime reports a memory limit, as GPUs and TPUs do."""

    def memory_stats(self):
        return {'bytes_limit': 16 * 2**30, 'bytes_in_use': 0}


def test_dataset_bytes_and_budget():
    assert budget.dataset_bytes(60000, (32, 32, 3)) == 60000 * (3072 + 4)
    assert budget.device_memory_budget(1.5) == int(1.5 * 2**30)
    assert budget.device_memory_budget(device=ReportingDevice()) == 8 * 2**30
    # The CPU backend reports no limit: the fixed default.
    assert jax.local_devices()[0].memory_stats() is None
    assert budget.device_memory_budget() == budget.CPU_BUDGET_BYTES
    with pytest.raises(ConfigError, match='must be positive'):
        budget.device_memory_budget(0)


def test_input_mode_auto_streams_what_does_not_fit():
    assert budget.choose_input_mode('auto', 100, 100) == 'device'
    assert budget.choose_input_mode('auto', 101, 100) == 'stream'
    assert budget.choose_input_mode('device', 10**15, 1) == 'device'
    assert budget.choose_input_mode('stream', 1, 10**15) == 'stream'
    with pytest.raises(ConfigError, match="unknown input_mode 'disk'"):
        budget.choose_input_mode('disk', 1, 1)
    config = ml_collections.ConfigDict({'input_mode': 'auto', 'device_memory_budget_gb': 0.1})
    assert budget.input_mode(config, 60000, (32, 32, 3)) == 'stream'  # CIFAR-10: 184 MB.
    config.device_memory_budget_gb = 0.2
    assert budget.input_mode(config, 60000, (32, 32, 3)) == 'device'

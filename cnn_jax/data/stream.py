"""Streaming host input for datasets past one device's memory.

A device-resident split (`ResidentSplit`) is copied to every device. A stream instead has
each process read, decode and batch only its own share of each batch; `to_device` makes
the shares one global batch sharded over the 'data' mesh axis. Both serve the training
loop through `train_inputs`, `eval_inputs` and `strided`; cnn_jax.data.load_dataset
chooses between them (config.input_mode).

Order. A stream follows the device path's (steps, B) epoch order, a function of (seed,
epoch): process p of P reads columns [p B/P, (p+1) B/P) of each row, so global batch s is
the device-resident batch s for any process count, and `train(order, start_step=k)`
resumes at batch k. A TFDS stream cannot follow an order (TFRecords give no random
access): each process reads a contiguous shard through a shuffle buffer seeded from the
order's first row, which resumes exactly but is not the device path's order. Evaluation
batches are the examples in order, the last padded (mask 0, index -1).

Decoding. Folders are decoded by Pillow threads (it releases the GIL), with the pixels of
`images.decode_image`; with config.image_size a stream resizes on the host (Pillow
bilinear) where the device path resizes one-size folders on the device, so the two agree
exactly only without a resize. TFDS images are decoded by the dataset's image feature.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh

from cnn_jax import parallel
from cnn_jax.data import images as images_lib
from cnn_jax.errors import ConfigError, DataError

T = TypeVar('T')
INPUT_MODES = ('auto', 'device', 'stream')
# Share of a device's memory the dataset may take: the rest is for the model's training.
DEVICE_MEMORY_FRACTION = 0.5
# When the device reports no memory limit (the CPU backend): per device, and the CPU
# devices of a host share its memory, each holding a copy.
CPU_BUDGET_BYTES = 2 * 2**30
PREFETCH = 4  # Batches a stream decodes ahead of the step.


@dataclasses.dataclass(frozen=True)
class Batch:
    """One process's share of a global batch."""

    images: np.ndarray  # (b, H, W, C) uint8
    labels: np.ndarray  # (b,) int32
    mask: np.ndarray  # (b,) float32: 1 for an example, 0 for padding
    index: np.ndarray  # (b,) int32 example numbers in the stream, -1 = padding


# --- order ------------------------------------------------------------------------------


def shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of a process's contiguous shard; the first n % P shards hold one more."""
    base, extra = divmod(num_examples, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (process_index < extra)


def process_share(order: np.ndarray, process_index: int, process_count: int) -> np.ndarray:
    """Columns [p b, (p+1) b) of a (steps, B) global order: process p's part of each batch."""
    b, rest = divmod(order.shape[1], process_count)
    if rest:
        raise ConfigError(
            f'batch_size={order.shape[1]} does not divide over {process_count} processes'
        )
    return order[:, process_index * b : (process_index + 1) * b]


def eval_order(num_examples: int, batch_size: int) -> np.ndarray:
    """(steps, B) global evaluation batches: the examples in order, then -1 (padding)."""
    index = np.arange(-(-num_examples // batch_size) * batch_size)
    return np.where(index < num_examples, index, -1).reshape(-1, batch_size)


# --- prefetch and devices ---------------------------------------------------------------

_ITEM, _END, _ERROR = range(3)


def prefetch(iterable: Iterable[T], size: int) -> Iterator[T]:
    """Runs `iterable` in a background thread, up to `size` items ahead of the consumer.

    An exception in the thread is raised here; closing this generator (or leaving a for
    loop early) stops the thread and closes `iterable`.
    """
    items: queue.Queue = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(kind: int, value: Any) -> bool:
        while not stop.is_set():
            try:
                items.put((kind, value), timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(iterable)
        try:
            for item in iterator:
                if not put(_ITEM, item):
                    return
            put(_END, None)
        except BaseException as e:  # noqa: BLE001 - re-raised in the consumer.
            put(_ERROR, e)
        finally:
            close = getattr(iterator, 'close', None)
            if close is not None:
                close()

    thread = threading.Thread(target=produce, name='cnn_jax-prefetch', daemon=True)
    thread.start()
    try:
        while True:
            kind, value = items.get()
            if kind == _END:
                return
            if kind == _ERROR:
                raise value
            yield value
    finally:
        stop.set()
        thread.join()


def to_device(batch: Batch, mesh: Mesh) -> dict[str, jax.Array]:
    """The global batch: each process's rows on its own devices along the 'data' axis.

    Every process calls this with its own batch of the same step; the global batch is
    the processes' batches concatenated in process order.
    """
    sharding = parallel.data_sharding(mesh)
    arrays = {'image': batch.images, 'label': batch.labels, 'mask': batch.mask}
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in arrays.items()}


# --- streams ----------------------------------------------------------------------------


class Stream:
    """What both stream kinds share: `index` (the split's examples it serves) and their
    `labels`, evaluation, decoding. Options: `image_size` (a square resize on the host),
    `process_index` and `process_count` (JAX's by default)."""

    index: np.ndarray
    _labels: np.ndarray
    class_names: list[str]
    image_shape: tuple[int, int, int]

    def __init__(
        self,
        *,
        image_size: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
    ):
        self.image_size = image_size
        # JAX's own process where not given (tests pass them to play a process).
        count = jax.process_count() if process_count is None else process_count
        index = jax.process_index() if process_index is None else process_index
        if not 0 <= index < count:
            raise ValueError(f'process_index {index} is outside 0..{count - 1}')
        self._process = index, count

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    def eval(self, batch_size: int) -> Iterator[Batch]:
        """This process's share of every example in order, padded (module doc)."""
        share = process_share(eval_order(len(self), batch_size), *self._process)
        return prefetch(self._batches(share), PREFETCH)

    def examples(self, index: np.ndarray) -> np.ndarray:
        """The decoded images of `index` (ascending for TFDS), e.g. a statistics sample."""
        return next(self._batches(np.asarray(index)[None])).images

    def take(self, index: np.ndarray, labels: np.ndarray) -> Stream:
        """The examples `index` (e.g. a validation split's), relabelled to `labels`."""
        part = copy.copy(self)
        part.index, part._labels = self.index[index], np.asarray(labels, np.int32)
        return part

    # The split interface the training loop uses (ResidentSplit's too).

    def on_devices(self, mesh: Mesh) -> Stream:
        """This stream, its batches put on `mesh`'s devices as they are read."""
        placed = copy.copy(self)
        placed.mesh = mesh
        return placed

    def train_inputs(self, perm: jax.Array, first_step: int) -> Iterator[tuple]:
        """(images, labels, perm, step_in_epoch) of the steps from `first_step` on: the
        batches of `perm`'s order, sharded where the step uses them (perm None: no gather),
        put on the devices a step ahead."""
        if perm.ndim != 2:
            raise ConfigError('a stream serves one order: a sweep over seed cannot stream')
        arrays = (to_device(b, self.mesh) for b in self.train(parallel.to_host(perm), first_step))
        for a in prefetch(arrays, 1):
            yield a['image'], a['label'], None, np.int32(0)

    def eval_inputs(self, batch_size: int) -> Iterator[tuple]:
        """(images, labels, indices, mask) of each evaluation batch (padding masked)."""
        batches = prefetch((to_device(b, self.mesh) for b in self.eval(batch_size)), 1)
        return ((a['image'], a['label'], None, a['mask']) for a in batches)

    def strided(self, n: int | None) -> Stream:
        """At most `n` evenly spaced examples (module function `strided_index`)."""
        index = strided_index(len(self), n)
        return self if index is None else self.take(index, self.labels[index])

    def _batches(self, order: np.ndarray) -> Iterator[Batch]:
        """Batches of `order`'s rows (-1 = padding: zeros, mask 0)."""
        with self._decoder(order[order >= 0]) as decode:
            for index in order:
                real = index >= 0
                images = np.zeros((len(index), *self.image_shape), np.uint8)
                if real.any():
                    images[real] = np.stack(decode(index[real]))
                labels = np.where(real, self.labels[np.maximum(index, 0)], 0).astype(np.int32)
                yield Batch(images, labels, real.astype(np.float32), index.astype(np.int32))

    def _decoder(self, examples: np.ndarray) -> contextlib.AbstractContextManager:
        """A context giving decode(index) -> images, to be called on `examples` in order."""
        raise NotImplementedError


class FolderStream(Stream):
    """Batches of an image folder's split, decoded by Pillow threads as they are needed;
    without `image_size` (a host resize, as for `folder.read_folder`'s mixed sizes) every
    image must have the first one's size."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: np.ndarray,
        class_names: Sequence[str],
        *,
        workers: int | None = None,
        **options: Any,
    ):
        super().__init__(**options)
        self.paths, self.index = list(paths), np.arange(len(paths))
        self._labels, self.class_names = np.asarray(labels, np.int32), list(class_names)
        self.workers = workers or images_lib.default_workers()

    @functools.cached_property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every batch's images (the first image's, without image_size)."""
        return tuple(images_lib.load(self.paths[0], self.image_size).shape)

    def train(self, order: np.ndarray, start_step: int = 0) -> Iterator[Batch]:
        """This process's share of the (steps, B) global `order`'s rows from `start_step`."""
        share = process_share(order, *self._process)[start_step:]
        return prefetch(self._batches(share), PREFETCH)

    def _load(self, path: str) -> np.ndarray:
        image = images_lib.load(path, self.image_size)
        if image.shape != self.image_shape:
            raise DataError(
                f'{path}: image is {image.shape[:2]}, not {self.image_shape[:2]} as '
                'the first one; set --config.image_size to resize them to one square size'
            )
        return image

    @contextlib.contextmanager
    def _decoder(self, examples: np.ndarray) -> Iterator[Callable]:
        with ThreadPoolExecutor(self.workers) as pool:
            yield lambda index: list(
                pool.map(self._load, [self.paths[i] for i in self.index[index]])
            )


class TfdsStream(Stream):
    """Batches of a prepared TFDS split; each process reads only its shard's records.

    `take` selects (ascending) and relabels examples: the rest are skipped undecoded. The
    shard's order is the module doc's; resuming skips the steps already run undecoded.
    """

    def __init__(self, builder: Any, split: str, *, shuffle_buffer: int = 10_000, **options: Any):
        super().__init__(**options)
        self.builder, self.split, self.shuffle_buffer = builder, split, shuffle_buffer
        self.index = np.arange(builder.info.splits[split].num_examples)
        self._labels: np.ndarray | None = None
        self.class_names = list(builder.info.features['label'].names)

    @property
    def labels(self) -> np.ndarray:
        """The labels, read (not decoding any image) on first use."""
        if self._labels is None:
            ds = self._records(np.arange(len(self))).map(lambda i, image, label: label)
            self._labels = np.fromiter(ds.as_numpy_iterator(), np.int32, len(self))
        return self._labels

    @property
    def image_shape(self) -> tuple[int, int, int]:
        shape = tuple(self.builder.info.features['image'].shape)
        if self.image_size:
            return (self.image_size, self.image_size, shape[-1])
        if None in shape:
            raise DataError(f'{self.builder.name}: images vary in size; set --config.image_size')
        return shape

    def _records(self, positions: np.ndarray, shuffle_seed: int | None = None):
        """(position, encoded image, label) of the ascending `positions` of this stream, in
        order (the files are read in order so that positions are known before a shuffle)."""
        import tensorflow as tf
        import tensorflow_datasets as tfds

        first, last = self.index[positions[0]], self.index[positions[-1]] + 1
        position = np.full(last - first, -1, np.int64)
        position[self.index[positions] - first] = positions
        ds = self.builder.as_dataset(
            split=f'{self.split}[{first}:{last}]',
            as_supervised=True,
            decoders={'image': tfds.decode.SkipDecoding()},
        )
        ds = ds.enumerate().map(lambda i, r: (tf.gather(position, i), *r))
        ds = ds.filter(lambda p, image, label: p >= 0)
        if shuffle_seed is not None:
            ds = ds.shuffle(self.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        return ds

    def _decoded(self, ds):
        """(position, image, label): decoded, resized, relabelled to this stream's labels."""
        import tensorflow as tf

        feature = self.builder.info.features['image']
        size, channels, labels = self.image_size, feature.shape[-1], self.labels

        def decode(position, data, label):
            image = feature.decode_example(data)
            if size:
                image = tf.numpy_function(
                    lambda x: images_lib.resize(x, size), [image], tf.uint8, stateful=False
                )
                image.set_shape((size, size, channels))
            return tf.cast(position, tf.int32), image, tf.gather(labels, position)

        return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def train(self, order: np.ndarray, start_step: int = 0) -> Iterator[Batch]:
        """len(order) batches of this process's shard from `start_step` (the module doc)."""
        b = process_share(order, *self._process).shape[1]
        entropy = [*order[0, :8].tolist(), self._process[0]]
        seed = int(np.random.SeedSequence(entropy).generate_state(1)[0] & 0x7FFFFFFF)
        ds = self._records(np.arange(*shard_bounds(len(self), *self._process)), seed)
        ds = ds.take(len(order) * b).skip(start_step * b)
        ds = self._decoded(ds).batch(b, drop_remainder=True).prefetch(2)
        batches = (
            Batch(images, labels, np.ones(b, np.float32), index)
            for index, images, labels in ds.as_numpy_iterator()
        )
        return prefetch(batches, PREFETCH)

    @contextlib.contextmanager
    def _decoder(self, examples: np.ndarray) -> Iterator[Callable]:
        """One pass over the records: `examples` must ascend."""
        if np.any(np.diff(examples) <= 0):
            raise ValueError('a TFDS stream reads examples in ascending order only')
        records = (
            self._decoded(self._records(examples)).as_numpy_iterator() if examples.size else None
        )
        yield lambda index: [next(records)[1] for _ in index]


# --- device-resident or streamed --------------------------------------------------------


def strided_index(size: int, n: int | None) -> np.ndarray | None:
    """At most `n` evenly spaced example numbers of `size` (None: keep all): every class of
    a class-sorted folder, for a capped evaluation of the training split."""
    return None if not n or n >= size else np.arange(0, size, -(-size // n))


class ResidentSplit:
    """A split replicated on every device (cnn_jax.data.Split.on_devices): each step
    gathers its batch there. It serves the training loop as a placed Stream does."""

    def __init__(self, images: jax.Array, labels: jax.Array, mesh: Mesh):
        self.images, self.labels, self.mesh = images, labels, mesh

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def train_inputs(self, perm: jax.Array, first_step: int) -> Iterator[tuple]:
        """(images, labels, perm, step_in_epoch): the step gathers perm[step_in_epoch]."""
        for s in range(first_step, perm.shape[-2]):
            yield self.images, self.labels, perm, np.int32(s)

    def eval_inputs(self, batch_size: int) -> Iterator[tuple]:
        """(images, labels, indices, mask) of each batch; the last batch is padded with
        example 0, masked out."""
        shard = parallel.data_sharding(self.mesh)
        for index in eval_order(len(self), batch_size):  # -1: padding.
            mask = jax.device_put((index >= 0).astype(np.float32), shard)
            indices = jax.device_put(np.maximum(index, 0).astype(np.int32), shard)
            yield self.images, self.labels, indices, mask

    def strided(self, n: int | None) -> ResidentSplit:
        index = strided_index(len(self), n)
        if index is None:
            return self
        return ResidentSplit(self.images[index], self.labels[index], self.mesh)


def dataset_bytes(num_examples: int, image_shape: Sequence[int], label_bytes: int = 4) -> int:
    """Bytes of `num_examples` uint8 images of `image_shape` and their int32 labels."""
    return num_examples * (math.prod(image_shape) + label_bytes)


def device_memory_budget(budget_gb: float = 0, device: Any = None) -> int:
    """Bytes the device-resident dataset may use on each device.

    `budget_gb` when given (> 0); else DEVICE_MEMORY_FRACTION of the device's
    `memory_stats()['bytes_limit']` (GPUs and TPUs report it); else CPU_BUDGET_BYTES.
    """
    if budget_gb:
        return int(budget_gb * 2**30)
    device = jax.local_devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - backends without statistics raise or return None.
        stats = None
    if stats and stats.get('bytes_limit'):
        return int(stats['bytes_limit'] * DEVICE_MEMORY_FRACTION)
    return CPU_BUDGET_BYTES

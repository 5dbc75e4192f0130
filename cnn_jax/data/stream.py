"""Streaming host input for data past one device's memory.

The device-resident path (`training_loop.device_splits`) copies every split to every
device. A stream instead has each process read, decode and batch only its own shard of
the examples, and `to_device` assembles the processes' batches into one global batch
sharded over the 'data' mesh axis.

Order. Process p of P owns a fixed, contiguous shard of the examples (sizes differ by at
most one, as `tfds.even_splits`). An epoch of global batch size B has
`(n // P) // (B // P)` steps, the same on every process; in epoch e process p visits its
shard in an order drawn from (seed, e, p) and yields local batches of B // P examples.
Global batch s is the processes' batches s in process order, which is how
`jax.make_array_from_process_local_data` lays them out on a mesh over `jax.devices()`.
So for a given process count the global order is a pure function of (seed, epoch), and
`train(seed, epoch, start_step=k)` yields exactly the batches k, k+1, ... of the
uninterrupted epoch. Evaluation visits each shard in order and pads the last batches
(mask 0) so that every process runs the same number of steps and each example counts
exactly once.

Decoding. Image folders are decoded by Pillow in a thread pool: Pillow releases the GIL
while it decodes and resizes, so threads scale without TensorFlow (a GPU machine with
JAX, PyTorch and Pillow can stream), the order needs no care (`pool.map` keeps it), and
the pixels are those of `images.decode_image`, which the device-resident `folder:`
reader also gives. TFDS datasets are read with tf.data (TFDS needs TensorFlow anyway)
and decoded by the dataset's own image feature, as `sources.read_tfds` does.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import Mesh

from cnn_jax import parallel
from cnn_jax.data import images as images_lib
from cnn_jax.data import sources
from cnn_jax.errors import ConfigError, DataError

T = TypeVar('T')


@dataclasses.dataclass(frozen=True)
class Batch:
    """One process's share of a global batch."""

    images: np.ndarray  # (b, H, W, C) uint8
    labels: np.ndarray  # (b,) int32
    mask: np.ndarray  # (b,) float32: 1 for an example, 0 for padding
    index: np.ndarray | None = None  # (b,) int64 example numbers (folders), -1 = padding


# --- order ------------------------------------------------------------------------------


def resolve_processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(index, count), JAX's own where not given (tests pass them to play a process)."""
    count = jax.process_count() if process_count is None else process_count
    index = jax.process_index() if process_index is None else process_index
    if not 0 <= index < count:
        raise ValueError(f'process_index {index} is outside 0..{count - 1}')
    return index, count


def shard_bounds(num_examples: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[start, stop) of a process's contiguous shard; the first n % P shards hold one more."""
    base, extra = divmod(num_examples, process_count)
    start = process_index * base + min(process_index, extra)
    return start, start + base + (process_index < extra)


def local_batch_size(batch_size: int, process_count: int) -> int:
    if batch_size % process_count:
        raise ConfigError(f'batch_size={batch_size} does not divide over {process_count} processes')
    return batch_size // process_count


def steps_per_epoch(num_examples: int, batch_size: int, process_count: int) -> int:
    """Full global batches per epoch: every process has at least n // P examples."""
    steps = (num_examples // process_count) // local_batch_size(batch_size, process_count)
    if steps == 0:
        raise ConfigError(
            f'batch_size={batch_size} is larger than the {num_examples} training examples'
        )
    return steps


def epoch_seed(seed: int, epoch: int, process_index: int) -> int:
    """A 31-bit seed for (seed, epoch, process), for tf.data and numpy alike."""
    state = np.random.SeedSequence([seed, epoch, process_index]).generate_state(1)
    return int(state[0] & 0x7FFFFFFF)


def train_order(
    num_examples: int,
    *,
    batch_size: int,
    seed: int,
    epoch: int,
    process_index: int,
    process_count: int,
) -> np.ndarray:
    """(steps, B // P) example numbers this process reads in `epoch`, a batch per row."""
    start, stop = shard_bounds(num_examples, process_index, process_count)
    steps = steps_per_epoch(num_examples, batch_size, process_count)
    b = batch_size // process_count
    rng = np.random.default_rng(epoch_seed(seed, epoch, process_index))
    return (start + rng.permutation(stop - start))[: steps * b].reshape(steps, b)


def eval_steps(num_examples: int, batch_size: int, process_count: int) -> int:
    """Batches that hold the largest shard: every process runs this many."""
    b = local_batch_size(batch_size, process_count)
    largest = -(-num_examples // process_count)  # Integer ceilings, exact for any n.
    return -(-largest // b)


def eval_order(
    num_examples: int, *, batch_size: int, process_index: int, process_count: int
) -> np.ndarray:
    """(steps, B // P) example numbers of this process's shard in order, -1 = padding."""
    start, stop = shard_bounds(num_examples, process_index, process_count)
    steps = eval_steps(num_examples, batch_size, process_count)
    index = start + np.arange(steps * (batch_size // process_count))
    return np.where(index < stop, index, -1).reshape(steps, -1)


# --- prefetch and devices ---------------------------------------------------------------

_ITEM, _END, _ERROR = range(3)


def prefetch(iterable: Iterable[T], size: int) -> Iterator[T]:
    """Runs `iterable` in a background thread, up to `size` items ahead of the consumer.

    An exception in the thread is raised here; closing this generator (or leaving a for
    loop early) stops the thread and closes `iterable`.
    """
    if size <= 0:
        yield from iterable
        return
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


# --- image folders ----------------------------------------------------------------------


class _StepCounts:
    """Steps per epoch and evaluation steps of a stream's shard (both stream kinds)."""

    num_examples: int
    batch_size: int
    process_count: int

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_examples, self.batch_size, self.process_count)

    @property
    def eval_steps(self) -> int:
        return eval_steps(self.num_examples, self.batch_size, self.process_count)


class FolderStream(_StepCounts):
    """Batches of an image folder's split, decoded by Pillow threads as they are needed.

    `image_size` resizes every image to a square of that size on the host (Pillow
    bilinear, as `sources.read_folder` does for folders of mixed sizes); None keeps each
    image's size, which must then be the same for all.
    """

    def __init__(
        self,
        paths: Sequence[str],
        labels: np.ndarray,
        class_names: Sequence[str],
        *,
        batch_size: int,
        image_size: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        workers: int | None = None,
        prefetch: int = 4,
    ):
        if len(paths) != len(labels):
            raise ValueError(f'{len(paths)} paths but {len(labels)} labels')
        self.paths = list(paths)
        self.labels = np.asarray(labels, np.int32)
        self.class_names = list(class_names)
        self.batch_size = batch_size
        self.image_size = image_size
        self.process_index, self.process_count = resolve_processes(process_index, process_count)
        local_batch_size(batch_size, self.process_count)
        self.workers = workers or images_lib.default_workers()
        self.prefetch = prefetch
        self._image_shape: tuple[int, int, int] | None = None
        self._options = dict(
            batch_size=batch_size,
            image_size=image_size,
            process_index=self.process_index,
            process_count=self.process_count,
            workers=self.workers,
            prefetch=prefetch,
        )

    @classmethod
    def from_folder(
        cls, path: str, split: str, *, cache_dir: str | None = None, **kwargs: Any
    ) -> FolderStream:
        """`split` ('train' or 'test') of folder:PATH, in tfds.ImageFolder's order."""
        root = sources.folder_root(path, cache_dir=cache_dir)
        class_names = sources.check_folder(root)
        paths, labels = images_lib.list_examples(root, split, class_names)
        return cls(paths, labels, class_names, **kwargs)

    def take(self, index: np.ndarray) -> FolderStream:
        """The examples `index` (e.g. a validation split's), same settings."""
        paths = [self.paths[i] for i in index]
        return FolderStream(paths, self.labels[index], self.class_names, **self._options)

    @property
    def num_examples(self) -> int:
        return len(self.paths)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of every batch's images (the first image's, without image_size)."""
        if self._image_shape is None:
            first = images_lib.load(self.paths[0], self.image_size)
            self._image_shape = tuple(first.shape)
        return self._image_shape

    def train(self, seed: int, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This process's batches of `epoch` from `start_step` on (see the module doc)."""
        order = train_order(
            self.num_examples,
            batch_size=self.batch_size,
            seed=seed,
            epoch=epoch,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        return prefetch(self._batches(order[start_step:]), self.prefetch)

    def eval(self) -> Iterator[Batch]:
        """This process's shard in order, padded to eval_steps full batches."""
        order = eval_order(
            self.num_examples,
            batch_size=self.batch_size,
            process_index=self.process_index,
            process_count=self.process_count,
        )
        return prefetch(self._batches(order), self.prefetch)

    def _load(self, i: int) -> np.ndarray:
        image = images_lib.load(self.paths[i], self.image_size)
        if image.shape != self.image_shape:
            raise DataError(
                f'{self.paths[i]}: image is {image.shape[:2]}, not {self.image_shape[:2]} as '
                'the first one; set --config.image_size to resize them to one square size'
            )
        return image

    def _batches(self, order: np.ndarray) -> Iterator[Batch]:
        with ThreadPoolExecutor(self.workers) as pool:
            for index in order:
                real = index >= 0
                images = np.zeros((len(index), *self.image_shape), np.uint8)
                labels = np.zeros(len(index), np.int32)
                if real.any():
                    images[real] = np.stack(list(pool.map(self._load, index[real])))
                    labels[real] = self.labels[index[real]]
                yield Batch(images, labels, real.astype(np.float32), index.astype(np.int64))


# --- TFDS -------------------------------------------------------------------------------


class TfdsStream(_StepCounts):
    """Batches of a prepared TFDS split; each process reads only its shard's records.

    Within an epoch a process's shard is read in a file order and through a shuffle
    buffer both seeded from (seed, epoch, process): a full permutation would need random
    access, which TFDS's default TFRecord files do not give. Resuming skips the records
    of the steps already run before they are decoded.
    """

    def __init__(
        self,
        builder: Any,
        split: str,
        *,
        batch_size: int,
        image_size: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        shuffle_buffer: int = 10_000,
        prefetch: int = 4,
    ):
        self.builder = builder
        self.split = split
        self.num_examples = builder.info.splits[split].num_examples
        self.class_names = list(builder.info.features['label'].names)
        self.batch_size = batch_size
        self.image_size = image_size
        self.process_index, self.process_count = resolve_processes(process_index, process_count)
        local_batch_size(batch_size, self.process_count)
        self.shuffle_buffer = shuffle_buffer
        self.prefetch = prefetch
        start, stop = shard_bounds(self.num_examples, self.process_index, self.process_count)
        # An absolute slice: the shard tfds.even_splits would give, with its size known.
        self.shard = f'{split}[{start}:{stop}]'
        self.shard_size = stop - start

    @classmethod
    def from_name(
        cls,
        name: str,
        split: str,
        *,
        data_dir: str | None = None,
        manual_dir: str | None = None,
        **kwargs: Any,
    ) -> TfdsStream:
        builder = sources.tfds_builder(name, data_dir=data_dir, manual_dir=manual_dir)
        return cls(builder, split, **kwargs)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        shape = tuple(self.builder.info.features['image'].shape)
        if self.image_size:
            return (self.image_size, self.image_size, shape[-1])
        if None in shape:
            raise DataError(
                f'{self.builder.name}: images have no fixed size; set --config.image_size'
            )
        return shape

    def _dataset(self, shuffle_seed: int | None):
        import tensorflow_datasets as tfds

        return self.builder.as_dataset(
            split=self.shard,
            shuffle_files=shuffle_seed is not None,
            as_supervised=True,
            read_config=tfds.ReadConfig(shuffle_seed=shuffle_seed),
            decoders={'image': tfds.decode.SkipDecoding()},
        )

    def _decode(self, ds):
        import tensorflow as tf

        feature = self.builder.info.features['image']
        size, channels = self.image_size, feature.shape[-1]

        def decode(data, label):
            image = feature.decode_example(data)
            if size:
                image = tf.numpy_function(
                    lambda x: images_lib.resize(x, size), [image], tf.uint8, stateful=False
                )
                image.set_shape((size, size, channels))
            return image, tf.cast(label, tf.int32)

        return ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def train(self, seed: int, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This process's batches of `epoch` from `start_step` on (see the class doc)."""
        b = self.batch_size // self.process_count
        shuffle_seed = epoch_seed(seed, epoch, self.process_index)
        ds = self._dataset(shuffle_seed)
        ds = ds.shuffle(self.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
        ds = ds.take(self.steps_per_epoch * b).skip(start_step * b)
        ds = self._decode(ds).batch(b, drop_remainder=True).prefetch(2)

        def batches() -> Iterator[Batch]:
            for images, labels in ds.as_numpy_iterator():
                yield Batch(images, labels, np.ones(b, np.float32))

        return prefetch(batches(), self.prefetch)

    def eval(self) -> Iterator[Batch]:
        """This process's shard in order, padded to eval_steps full batches."""
        b = self.batch_size // self.process_count
        ds = self._decode(self._dataset(None)).batch(b).prefetch(2)
        shape = self.image_shape

        def batches() -> Iterator[Batch]:
            produced = 0
            for images, labels in ds.as_numpy_iterator():
                yield _padded(images, labels, b)
                produced += 1
            for _ in range(produced, self.eval_steps):
                yield _padded(np.zeros((0, *shape), np.uint8), np.zeros(0, np.int32), b)

        return prefetch(batches(), self.prefetch)


def _padded(images: np.ndarray, labels: np.ndarray, size: int) -> Batch:
    n = len(labels)
    pad = size - n
    return Batch(
        np.concatenate([images, np.zeros((pad, *images.shape[1:]), np.uint8)]),
        np.concatenate([labels.astype(np.int32), np.zeros(pad, np.int32)]),
        np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)]),
    )


def open_stream(
    dataset: str,
    split: str,
    *,
    batch_size: int,
    data_dir: str | None = None,
    manual_dir: str | None = None,
    cache_dir: str | None = None,
    image_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
) -> FolderStream | TfdsStream:
    """A stream of `split` of config.dataset: 'folder:...' or a TFDS name."""
    common = dict(
        batch_size=batch_size,
        image_size=image_size,
        process_index=process_index,
        process_count=process_count,
    )
    if dataset.startswith('folder:'):
        return FolderStream.from_folder(dataset[7:], split, cache_dir=cache_dir, **common)
    if dataset == 'digits' or ':' in dataset or '/' in dataset:
        raise ConfigError(
            f'{dataset!r} cannot stream: streaming reads folder:DIR or a TFDS name '
            "(digits and idx: datasets fit in memory: use input_mode='device')"
        )
    return TfdsStream.from_name(dataset, split, data_dir=data_dir, manual_dir=manual_dir, **common)

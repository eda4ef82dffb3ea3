"""Grain input pipelines: training crops and grouped evaluation crops.

Sources are any random-access object with `__len__` and `__getitem__` that
returns a dict with 'image' (encoded bytes, a numpy object scalar holding
them, or a file path) and 'score'. That covers `tfds.data_source(...)` of
our builders (see `tfds_builders.open_source`) and `RecordSource(records)`
over a reader's list. A plain list of `readers.Record` is wrapped for you.

Where the work happens: reading and decoding (+ resize) run in grain's
read threads (PIL releases the GIL, so this is parallel even with
worker_count=0); cropping, flipping, jitter and normalisation run in the
operations, in the worker processes when worker_count > 0.

Multi-host: each JAX process reads its own shard (shard_index/shard_count,
default jax.process_index()/jax.process_count()) and yields per-host batches
of global_batch_size / process_count examples; the trainer assembles them
with jax.make_array_from_process_local_data.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import math
import os
import shutil
import tempfile
import threading
import zlib
from typing import Any, Iterator, Optional, Sequence

import grain.python as grain
import numpy as np

from smartiqa_jax import preprocess
from smartiqa_jax.data import quality
from smartiqa_jax.data.readers import Record

log = logging.getLogger(__name__)

CROP_MODES = ('center', 'grid', 'random')


# --------------------------------------------------------------------------
# Sources


class RecordSource(grain.RandomAccessDataSource):
    """A reader's records as a grain source: i -> {'image': path, 'score', 'name'}."""

    def __init__(self, records: Sequence[Record]):
        self._items = [(r.image, float(r.score), r.name) for r in records]
        # In the repr, which grain checks when restoring an iterator's state:
        # a different file list must not pass for the same dataset.
        self._digest = zlib.crc32('\n'.join(r.name for r in records).encode())

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, score, name = self._items[index]
        return {'image': image, 'score': np.float32(score), 'name': name}

    def __repr__(self) -> str:
        return f'RecordSource({len(self)} images, names crc32 {self._digest:08x})'


def as_source(source: Any) -> Any:
    """Wraps a list of Record in RecordSource; other sources pass through."""
    if isinstance(source, (list, tuple)) and (not source or isinstance(source[0], Record)):
        return RecordSource(source)
    if not (hasattr(source, '__len__') and hasattr(source, '__getitem__')):
        raise TypeError(f'expected a random-access source or a list of Record, got {type(source)}')
    return source


def _name_of(element: dict[str, Any], index: int) -> str:
    name = element.get('name')
    if isinstance(name, np.ndarray):
        name = name.item()
    if isinstance(name, bytes):
        name = name.decode('utf-8', 'replace')
    if name:
        return str(name)
    image = element.get('image')
    return image if isinstance(image, str) else f'image #{index}'


def _load_pixels(source: Any, index: int, resize: preprocess.ResizeSpec,
                 min_side: int) -> Optional[np.ndarray]:
    """Decoded, resized uint8 (h, w, 3) of source[index], or None (warned) if bad."""
    element = source[index]
    name = _name_of(element, index)
    try:
        return _decode_resized(element, name, resize, min_side)
    except Exception as e:  # any failure costs this image only
        log.warning('skipping %s: %s', name, _why(e))
        return None


def _decode_resized(element: dict[str, Any], name: str, resize: preprocess.ResizeSpec,
                    min_side: int) -> np.ndarray:
    """A source element -> decoded, resized uint8 (h, w, 3); raises for a bad image."""
    pixels = preprocess.decode_image(preprocess.read_bytes(element['image']), name)
    return preprocess.resize_image(pixels, resize, min_side, name=name)


def _why(error: Exception) -> str:
    """Why an image failed: the message, after the exception type where that is not clear."""
    if isinstance(error, (preprocess.ImageDecodeError, OSError)):
        return str(error)
    return f'{type(error).__name__}: {error}' if str(error) else type(error).__name__


class DecodedImageCache:
    """Every image of a source decoded and resized once, as uint8, on local disk.

    Pixels live in one flat file that is memory-mapped, so worker processes
    share the operating system's page cache instead of each holding a copy
    (and pickling to a worker sends only the path). A fixed (h, w) resize
    needs N*h*w*3 bytes (KonIQ train at 512x384: 4.2 GB). Images that fail
    to decode are excluded and reported (see `valid_indices`). The file is
    made in `directory` (default: a new temporary folder) under a name of its
    own, so caches can share a folder, and deleted when the creating process
    exits.
    """

    def __init__(self, source: Any, resize: preprocess.ResizeSpec, min_side: int = 0,
                 directory: Optional[str] = None, num_threads: int = 0,
                 strict: bool = False, dataset: str = 'cache'):
        import concurrent.futures

        self.resize, self.min_side = resize, min_side
        owned = directory is None
        directory = directory or tempfile.mkdtemp(prefix='smartiqa_cache_')
        os.makedirs(directory, exist_ok=True)
        # A name of its own: another cache in the folder may be memory-mapped right now,
        # and rewriting its file under it would kill that process (SIGBUS).
        handle, self.path = tempfile.mkstemp(prefix='pixels_', suffix='.u8', dir=directory)
        os.close(handle)
        n = len(source)
        self.offsets = np.full(n, -1, np.int64)
        self.shapes = np.zeros((n, 3), np.int64)
        self.scores = np.zeros(n, np.float32)
        self.report = quality.DataReport(dataset, strict=strict)

        def work(i):
            element = source[i]
            name = _name_of(element, i)
            try:
                pixels = _decode_resized(element, name, resize, min_side)
            except Exception as e:  # any failure excludes this image only
                return i, name, None, _why(e), float(element['score'])
            return i, name, pixels, '', float(element['score'])

        offset = 0
        num_threads = num_threads or min(8, os.cpu_count() or 1)
        with open(self.path, 'wb') as f, concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
            for i, name, pixels, why, score in pool.map(work, range(n)):
                self.scores[i] = score
                if pixels is None:
                    self.report.exclude(name, why.removeprefix(f'{name}: '))
                    continue
                f.write(np.ascontiguousarray(pixels).tobytes())
                self.offsets[i], self.shapes[i] = offset, pixels.shape
                offset += pixels.size
        self.valid_indices = np.flatnonzero(self.offsets >= 0)
        self.report.kept = {'cached': len(self.valid_indices)}
        if owned:
            atexit.register(shutil.rmtree, directory, ignore_errors=True)
        else:
            atexit.register(_remove_file, self.path)
        self._memmap = None
        log.info('decoded cache: %d images, %.1f MB at %s', len(self.valid_indices),
                 offset / 1e6, self.path)

    def __getstate__(self):
        state = dict(self.__dict__)
        state['_memmap'] = None  # re-opened lazily in each worker process
        return state

    def pixels(self, index: int) -> Optional[np.ndarray]:
        """uint8 (h, w, 3) of image `index`, or None if it was excluded."""
        if self.offsets[index] < 0:
            return None
        if self._memmap is None:
            self._memmap = (np.memmap(self.path, np.uint8, 'r') if os.path.getsize(self.path)
                            else np.zeros(0, np.uint8))
        h, w, c = self.shapes[index]
        start = self.offsets[index]
        return np.asarray(self._memmap[start:start + h * w * c]).reshape(h, w, c)

    def __len__(self) -> int:
        return len(self.offsets)


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


class _PixelReader:
    """source or cache -> (uint8 pixels or None, score); one interface for both."""

    def __init__(self, source: Any, cache: Optional[DecodedImageCache],
                 resize: preprocess.ResizeSpec, min_side: int):
        self.source, self.cache = source, cache
        self.resize, self.min_side = resize, min_side

    def __len__(self) -> int:
        return len(self.source)

    def __repr__(self) -> str:
        # Part of the iterator state that grain checks on restore: must be stable.
        where = 'cache' if self.cache is not None else 'decode'
        return f'{self.source!r} via {where}, resize={self.resize}, min_side={self.min_side}'

    def read(self, index: int) -> tuple[Optional[np.ndarray], np.float32]:
        if self.cache is not None:
            return self.cache.pixels(index), np.float32(self.cache.scores[index])
        pixels = _load_pixels(self.source, index, self.resize, self.min_side)
        return pixels, np.float32(self.source[index]['score'])

    def score(self, index: int) -> np.float32:
        if self.cache is not None:
            return np.float32(self.cache.scores[index])
        return np.float32(self.source[index]['score'])


class _TrainPatchSource(grain.RandomAccessDataSource):
    """Each usable image `patches_per_image` times: i -> image images[j % n], with j = i or,
    given an `order`, order[i].

    Reading here (not in an operation) runs the decode in grain's read threads.
    """

    def __init__(self, reader: _PixelReader, image_indices: np.ndarray, patches_per_image: int,
                 order: Optional[np.ndarray] = None):
        self._reader, self._images, self._repeats = reader, image_indices, patches_per_image
        self._order = order   # a permutation of the patches, applied first (see the caller)

    def __len__(self) -> int:
        return len(self._images) * self._repeats

    def __repr__(self) -> str:
        return (f'TrainPatches({self._reader!r}, images={len(self._images)}, '
                f'patches_per_image={self._repeats})')

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._order is not None:
            i = int(self._order[i])
        index = int(self._images[i % len(self._images)])
        pixels, score = self._reader.read(index)
        return {'pixels': pixels, 'score': score, 'index': np.int32(index)}


class _EvalCropSource(grain.RandomAccessDataSource):
    """Crop c of image k at position k * crops + c; then padding up to `length`.

    Crops of one image are consecutive, so the few most recent decodes are
    memoised (per process) and an image is decoded about once, not `crops`
    times, even with many read threads asking for it at the same moment.
    """

    def __init__(self, reader: _PixelReader, crops: int, length: int, memo_size: int = 64):
        self._reader, self._crops, self._length = reader, crops, length
        self._memo_size = memo_size
        self._init_memo()

    def _init_memo(self):
        self._lock = threading.Lock()
        self._memo: dict[int, Any] = {}

    def __getstate__(self):
        state = {k: v for k, v in self.__dict__.items() if k not in ('_lock', '_memo')}
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._init_memo()

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return f'EvalCrops({self._reader!r}, crops={self._crops}, length={self._length})'

    def _pixels(self, index: int) -> tuple[Optional[np.ndarray], np.float32]:
        with self._lock:
            entry = self._memo.get(index)
            owner = entry is None
            if owner:
                entry = self._memo[index] = [threading.Event(), None]
                if len(self._memo) > self._memo_size:
                    del self._memo[next(iter(self._memo))]
        if owner:
            try:
                entry[1] = self._reader.read(index)
            finally:
                entry[0].set()
        entry[0].wait()
        if entry[1] is None:  # the owner raised; read again here to surface it
            return self._reader.read(index)
        return entry[1]

    def __getitem__(self, i: int) -> dict[str, Any]:
        num_real = len(self._reader) * self._crops
        if i >= num_real:
            return {'pixels': None, 'score': np.float32(0), 'index': np.int32(-1),
                    'crop': np.int32(0)}
        index, crop_id = divmod(i, self._crops)
        pixels, score = self._pixels(index)
        return {'pixels': pixels, 'score': score, 'index': np.int32(index),
                'crop': np.int32(crop_id)}


# --------------------------------------------------------------------------
# Operations (module level so that worker processes can unpickle them)


class _HasPixels(grain.FilterTransform):
    """Drops elements whose image failed to decode (already warned about)."""

    def filter(self, element: dict[str, Any]) -> bool:
        return element['pixels'] is not None


@dataclasses.dataclass
class _TrainAugment(grain.RandomMapTransform):
    """uint8 image -> normalised float32 (crop, crop, 3): random crop, flip, rotation, jitter."""
    crop_size: int
    hflip: bool
    color_jitter: bool
    rotate90: bool = False
    jpeg_aligned: bool = False

    def random_map(self, element, rng: np.random.Generator):
        pixels = element['pixels']
        height, width = pixels.shape[:2]
        offset = preprocess.random_crop_offset(height, width, self.crop_size, rng)
        if self.jpeg_aligned:
            offset = preprocess.jpeg_aligned_offset(offset, height, width, self.crop_size)
        patch = preprocess.crop(pixels, offset, self.crop_size)
        if self.hflip and rng.random() < 0.5:
            patch = patch[:, ::-1]
        if self.rotate90:
            patch = np.rot90(patch, int(rng.integers(4)))
        if self.color_jitter:
            patch = preprocess.color_jitter(np.ascontiguousarray(patch), rng)
        return {'image': preprocess.normalize(patch), 'score': np.float32(element['score'])}


@dataclasses.dataclass
class _EvalCrop(grain.MapTransform):
    """Deterministic crop `crop` of image `index` -> normalised float32 + mask.

    Random mode draws from a generator seeded by (seed, index, crop), so the
    crops do not depend on batch size, sharding or worker count.
    """
    crop_size: int
    crops: int
    mode: str
    seed: int
    jpeg_aligned: bool = False

    def map(self, element):
        pixels, index, crop_id = element['pixels'], int(element['index']), int(element['crop'])
        if pixels is None:  # padding, or an image that failed to decode
            image = np.zeros((self.crop_size, self.crop_size, 3), np.float32)
            return {'image': image, 'score': np.float32(element['score']),
                    'index': np.int32(index), 'mask': np.bool_(False)}
        h, w = pixels.shape[:2]
        if self.mode == 'center':
            offset = preprocess.center_crop_offset(h, w, self.crop_size)
        elif self.mode == 'grid':
            offset = preprocess.grid_crop_offsets(h, w, self.crop_size, self.crops)[crop_id]
        else:
            rng = np.random.default_rng([self.seed, index, crop_id])
            offset = preprocess.random_crop_offset(h, w, self.crop_size, rng)
        if self.jpeg_aligned:
            offset = preprocess.jpeg_aligned_offset(offset, h, w, self.crop_size)
        patch = preprocess.crop(pixels, offset, self.crop_size)
        return {'image': preprocess.normalize(patch), 'score': np.float32(element['score']),
                'index': np.int32(index), 'mask': np.bool_(True)}


# --------------------------------------------------------------------------
# Loaders


@dataclasses.dataclass
class Loader:
    """An iterable of batches; `iter(loader)` gives a grain DataLoaderIterator.

    The iterator's `get_state()` -> bytes and `set_state(bytes)` save and
    restore the exact position (store them in the training checkpoint, or use
    `checkpoint_args`). Attributes say what one host gets.
    """
    data_loader: grain.DataLoader
    batch_size: int          # per host
    num_images: int          # usable images in the whole split (all hosts)
    # Per host; training: per pass of patches_per_image. Without a cache an image is
    # found undecodable only when read, so it is counted here and its crops are then
    # dropped: such a pass yields fewer batches (the trainer, which repeats the loader,
    # counts an epoch in steps of this size, so its epochs then straddle passes).
    batches_per_epoch: int
    report: Optional[quality.DataReport] = None

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return iter(self.data_loader)


def _absl_flags_for_workers(worker_count: int) -> None:
    """Grain's worker processes read absl flags; outside an absl app none are parsed."""
    if worker_count > 0:
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()


def _shards(shard_index: Optional[int], shard_count: Optional[int]) -> tuple[int, int]:
    if shard_index is None or shard_count is None:
        import jax  # only for the defaults; workers never call this
        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f'shard_index {shard_index} not in [0, {shard_count})')
    return shard_index, shard_count


def _per_host_batch(batch_size: Optional[int], global_batch_size: Optional[int],
                    shard_count: int) -> int:
    if (batch_size is None) == (global_batch_size is None):
        raise ValueError('give exactly one of batch_size (per host) and global_batch_size')
    if global_batch_size is not None:
        if global_batch_size % shard_count:
            raise ValueError(f'global_batch_size {global_batch_size} is not divisible by '
                             f'the number of processes {shard_count}')
        return global_batch_size // shard_count
    return batch_size


def _checked_resize(resize: Any, crop_size: int) -> preprocess.ResizeSpec:
    resize = preprocess.parse_resize(resize)
    if isinstance(resize, tuple) and min(resize) < crop_size:
        raise ValueError(f'resize {resize} is smaller than crop_size {crop_size}')
    return resize


def make_decoded_cache(source: Any, *, resize: Any = preprocess.KONIQ_RESIZE,
                       crop_size: int = 224, directory: Optional[str] = None
                       ) -> DecodedImageCache:
    """Every image of `source` decoded and resized once, for several loaders to share.

    Pass the result as `cache` to loaders of the same source with the same
    `resize` and `crop_size` (e.g. the train loaders of the several shards one
    process reads): the split is then decoded and stored once, not once per
    loader. Prints a summary of the images that failed to decode.
    """
    source = as_source(source)
    resize = _checked_resize(resize, crop_size)
    decoded = DecodedImageCache(source, resize, crop_size, directory=directory)
    if decoded.report.problems:
        print(decoded.report.summary(), flush=True)
    return decoded


def _prepare(source: Any, resize: Any, crop_size: int, cache: Any
             ) -> tuple[_PixelReader, np.ndarray, Optional[quality.DataReport]]:
    """Source -> (pixel reader, usable image indices, cache report or None)."""
    source = as_source(source)
    resize = _checked_resize(resize, crop_size)
    if isinstance(cache, DecodedImageCache):
        built_for = (len(cache), cache.resize, cache.min_side)
        if built_for != (len(source), resize, crop_size):
            raise ValueError(f'the given cache holds {built_for[0]} images at resize '
                             f'{built_for[1]}, min side {built_for[2]}; this loader needs '
                             f'{len(source)} at resize {resize}, min side {crop_size}')
        decoded = cache
    elif cache:
        directory = cache if isinstance(cache, (str, os.PathLike)) else None
        decoded = make_decoded_cache(source, resize=resize, crop_size=crop_size,
                                     directory=directory)
    else:
        decoded = None
    images = decoded.valid_indices if decoded is not None else np.arange(len(source))
    if len(images) == 0:
        raise quality.DataError('no usable images in the source')
    report = decoded.report if decoded is not None else None
    return _PixelReader(source, decoded, resize, crop_size), images, report


def make_train_loader(source: Any, *, batch_size: Optional[int] = None,
                      global_batch_size: Optional[int] = None, seed: int = 0,
                      patches_per_image: int = 20, crop_size: int = 224,
                      resize: Any = preprocess.KONIQ_RESIZE, hflip: bool = True,
                      color_jitter: bool = False, rotate90: bool = False,
                      jpeg_aligned_crops: bool = False, worker_count: int = 0,
                      shard_index: Optional[int] = None, shard_count: Optional[int] = None,
                      cache: Any = False, num_epochs: Optional[int] = None,
                      read_threads: int = 16, worker_buffer_size: int = 2) -> Loader:
    """Training batches of random crops, reshuffled every epoch.

    Args:
      source: a random-access source (tfds data_source, RecordSource) or a list
        of readers.Record.
      batch_size: examples per batch on this host; or give global_batch_size,
        split evenly over shard_count processes (per host = global / count).
      seed: fixes the shuffle and every crop/flip/jitter draw; an epoch's order
        differs from the previous one's.
      patches_per_image: each image is used this many times per epoch (SPEC 2:
        20), each time with a fresh random crop; epoch = n_images * patches.
      crop_size: side of the square crops (224 for the Swin backbone).
      resize: (h, w) squash (default KonIQ's 512 high x 384 wide), an int for
        shorter side (aspect kept), None to keep the size, or 'koniq'/'HxW'.
        Images smaller than the crop are scaled up to fit it.
      hflip: horizontal flip with p = 0.5. color_jitter: SPEC 2's (0.1, 0.1,
        0.1, hue 0.05). rotate90: rotate by 0, 90, 180 or 270 degrees, each
        with p = 1/4 (with hflip: all 8 symmetries of the square crop); not in
        the paper, for training from scratch on few photos (configs/demo.py).
      jpeg_aligned_crops: crop offsets 2 past a multiple of 4
        (preprocess.jpeg_aligned_offset), so that the JPEG block edges of images
        used at their stored size (resize None) fall inside Swin's patches, at
        one place; not in the paper (configs/demo.py).
      worker_count: grain worker processes (0 = in this process). The caller's
        script needs an `if __name__ == '__main__':` guard for workers > 0.
        Each worker batches its own share of the patches, so a batch mixes
        patches of neighbouring passes, and a pass's images are not all in
        the same `batches_per_epoch` batches.
      shard_index, shard_count: this host's shard; default jax.process_index()
        and jax.process_count(). Shards are disjoint and equal-sized (the
        at most shard_count - 1 patches that do not divide are dropped, the
        same each pass, so all hosts take the same steps).
      cache: False; True to decode + resize every image once into a shared
        memory-mapped uint8 file in a temp dir; or a directory path for it;
        or a `make_decoded_cache` result to share with other loaders of the
        same source. Also excludes (with a summary) images that fail to decode.
      num_epochs: None repeats forever; otherwise stops after that many.

    Returns:
      Loader yielding {'image': float32 (B, crop, crop, 3) ImageNet-normalised
      NHWC, 'score': float32 (B,) labels as the source has them}, B = per-host
      batch; batches_per_epoch = n_images * patches // (B * shard_count). With
      num_epochs=None the stream runs on across passes, and a trainer's epoch
      of batches_per_epoch batches ends within a batch of a pass's end.
    """
    shard_index, shard_count = _shards(shard_index, shard_count)
    per_host = _per_host_batch(batch_size, global_batch_size, shard_count)
    _absl_flags_for_workers(worker_count)
    reader, images, report = _prepare(source, resize, crop_size, cache)
    # grain's sampler gives each shard a contiguous range of patch numbers and shuffles
    # every range with the same permutation; with patch i = image i % n, shards whose
    # ranges start a multiple of n apart would then read the same image at every step.
    # A fixed permutation of the patches, the same on every host, spreads each shard's
    # range over all images. One shard reads the patches in grain's order, as before.
    order = (np.random.default_rng([seed, 0x5A4D]).permutation(len(images) * patches_per_image)
             if shard_count > 1 else None)
    patches = _TrainPatchSource(reader, images, patches_per_image, order)
    sampler = grain.IndexSampler(
        num_records=len(patches),
        shard_options=grain.ShardOptions(shard_index, shard_count, drop_remainder=True),
        shuffle=True, num_epochs=num_epochs, seed=seed)
    operations = [
        # Only without a cache can an image fail here; dropping it keeps the
        # run alive (the warning names the file).
        None if reader.cache is not None else _HasPixels(),
        _TrainAugment(crop_size, hflip, color_jitter, rotate90, jpeg_aligned_crops),
        grain.Batch(per_host, drop_remainder=True),
    ]
    data_loader = grain.DataLoader(
        data_source=patches, sampler=sampler,
        operations=[op for op in operations if op is not None],
        worker_count=worker_count, worker_buffer_size=worker_buffer_size,
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * per_host))
    per_shard = len(patches) // shard_count
    return Loader(data_loader, per_host, len(images), per_shard // per_host, report)


def make_eval_loader(source: Any, *, batch_size: Optional[int] = None,
                     global_batch_size: Optional[int] = None, crops: int = 1,
                     crop_mode: str = 'center', seed: int = 0, crop_size: int = 224,
                     resize: Any = preprocess.KONIQ_RESIZE, jpeg_aligned_crops: bool = False,
                     worker_count: int = 0,
                     shard_index: Optional[int] = None, shard_count: Optional[int] = None,
                     cache: Any = False, read_threads: int = 16) -> Loader:
    """One pass of deterministic crops of every image, in image order.

    Args:
      crops, crop_mode: 'center' (crops must be 1), 'grid' (`crops` positions
        on an even grid, e.g. 20 -> 4 x 5) or 'random' (`crops` positions drawn
        from (seed, image index, crop number): reproducible, independent of
        batch size, sharding and workers). SPEC 2 test: 'random' with 20 crops
        as released, 'center' as the reproducible option.
      batch_size / global_batch_size, resize, crop_size, jpeg_aligned_crops,
      worker_count, shard_*, cache: as in make_train_loader.

    Returns:
      Loader yielding {'image': float32 (B, crop, crop, 3), 'score': float32
      (B,), 'index': int32 (B,) image index in the split (-1 for padding),
      'mask': bool (B,) False for padding and for images that failed to decode}.
      Image k's crops are the k*crops .. k*crops+crops-1 entries of the whole
      stream. Every batch is full: the stream is padded to a multiple of
      B * shard_count (times worker_count, each worker batching its own share),
      so all hosts run the same number of steps of one shape. Average with
      `aggregate_crops` after gathering every host's outputs.
    """
    if crop_mode not in CROP_MODES:
        raise ValueError(f'crop_mode must be one of {CROP_MODES}, got {crop_mode!r}')
    if crop_mode == 'center' and crops != 1:
        raise ValueError(f"crop_mode 'center' gives one crop per image, got crops={crops}")
    if seed < 0:
        raise ValueError(f'seed must be 0 or more, got {seed}')
    shard_index, shard_count = _shards(shard_index, shard_count)
    per_host = _per_host_batch(batch_size, global_batch_size, shard_count)
    _absl_flags_for_workers(worker_count)
    reader, _, report = _prepare(source, resize, crop_size, cache)
    num_images = len(reader)
    step = per_host * shard_count
    # grain gives a shard's record i to worker i % worker_count, which batches its own
    # records: each worker's share must be whole batches too.
    pad_to = step * max(worker_count, 1)
    length = math.ceil(num_images * crops / pad_to) * pad_to
    crop_source = _EvalCropSource(reader, crops, length)
    sampler = grain.IndexSampler(
        num_records=length,
        shard_options=grain.ShardOptions(shard_index, shard_count, drop_remainder=True),
        shuffle=False, num_epochs=1)
    data_loader = grain.DataLoader(
        data_source=crop_source, sampler=sampler,
        operations=[_EvalCrop(crop_size, crops, crop_mode, seed, jpeg_aligned_crops),
                    grain.Batch(per_host, drop_remainder=False)],
        worker_count=worker_count,
        read_options=grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=4 * per_host))
    return Loader(data_loader, per_host, num_images, length // step, report)


def aggregate_crops(indices: np.ndarray, predictions: np.ndarray, num_images: int,
                    mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-crop predictions -> per-image mean over its crops.

    Args:
      indices: int (N,) image index of each crop; entries < 0 are ignored.
      predictions: float (N,) or (N, 1) prediction per crop.
      num_images: number of images in the split.
      mask: optional bool (N,); False entries (padding) are ignored.

    Returns:
      float64 (num_images,): mean prediction per image; NaN for an image with
      no valid crop (it failed to decode), which metrics should drop.
    """
    indices = np.asarray(indices).reshape(-1)
    predictions = np.asarray(predictions, np.float64).reshape(-1)
    if indices.shape != predictions.shape:
        raise ValueError(f'indices {indices.shape} and predictions {predictions.shape} differ')
    keep = indices >= 0
    if mask is not None:
        keep &= np.asarray(mask, bool).reshape(-1)
    if np.any(indices[keep] >= num_images):
        raise ValueError(f'image index {indices[keep].max()} >= num_images {num_images}')
    sums = np.bincount(indices[keep], predictions[keep], minlength=num_images)
    counts = np.bincount(indices[keep], minlength=num_images)
    with np.errstate(invalid='ignore', divide='ignore'):
        return sums / counts


def image_scores(source: Any) -> np.ndarray:
    """float32 (num_images,) labels of a source in image order (for metrics)."""
    source = as_source(source)
    return np.array([source[i]['score'] for i in range(len(source))], np.float32)


def checkpoint_args(iterator: Any, restore: bool = False) -> Any:
    """The orbax `args` item that saves (or restores) a grain iterator's state.

    Use inside ocp.args.Composite(..., data_iter=checkpoint_args(it)) with a
    CheckpointManager; grain registers its handler with orbax.
    """
    if restore:
        return grain.PyGrainCheckpointRestore(iterator)
    return grain.PyGrainCheckpointSave(iterator)

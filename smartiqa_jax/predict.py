"""Scores image files with a SMART-IQA checkpoint.

  python -m smartiqa_jax.predict --checkpoint CKPT photos/ extra.jpg 'shots/*.png' \
      [--crops 20] [--crop-mode random|grid|center] [--seed 0] [--batch-size 8] \
      [--resize 512x384|short:N|none] [--output scores.csv|scores.json|scores.jsonl]

Inputs are files (any extension), folders (searched recursively for image extensions)
and glob patterns. Each image is decoded, resized, cut into `--crops` crops of 224, and
its score is the mean of its crops' scores (SPEC 2), on the checkpoint's label scale
(KonIQ MOS_zscore 0..100, higher is better, for the released models).

Rows: path, score, weight_stage1..4 (the stage attention averaged over the crops, as
fractions summing to 1; empty for models without stage attention) and error (empty, or
why the file could not be scored). They are written as each batch finishes, so an
interrupted run keeps every row it scored: CSV is appended and flushed per batch,
`.jsonl` gets one JSON object per line likewise, and `.json` (a JSON array) is rewritten
atomically (temporary file + rename) after every batch, so it is always valid JSON (for
runs over very many files prefer .csv or .jsonl, which are only appended to).
Without --output the CSV goes to stdout. The progress bar and the summary go to stderr.

Preprocessing: --resize defaults to the training config stored in the checkpoint (a
training workdir or step), else the KonIQ protocol, 512 high x 384 wide; so do
--[no-]jpeg-aligned-crops (data.jpeg_aligned_crops there, else off) and --symmetries
(data.eval_symmetries there, else 1: each crop alone; 2 with its mirror image, 4 its
rotations, 8 both, scores averaged). JPEGs larger than
twice the target are decoded at a reduced DCT scale (PIL `draft`), so a large photo is
never held at full size; other formats are box-reduced right after decoding, before
any array copy. Images over --max-pixels (PIL's decompression-bomb limit, 89 megapixels,
by default) are refused with an error row, as are images the resize would make larger than
that or PIL's limit (a thin strip scaled up to the crop size). So is a non-finite score.

Reproducible: random crops are drawn from (--seed, a hash of the file's bytes), so an
image's crops, and its score, depend neither on its batch nor on the other inputs. Every
batch has the same shape (the last one is padded), so the model compiles once.

An existing --output is never replaced unasked: --resume scores only the images it does
not list yet and adds their rows (a row torn by a kill is redone), --overwrite replaces
it. Ctrl-C stops the run with every finished batch written, and says how many.

Exit status: 0 when every input was scored, 1 when some could not be (the others are
still scored and written) or a folder or pattern matched no image, 2 for usage errors
(bad flag, no inputs, missing checkpoint, an existing --output), 130 after Ctrl-C.
"""

from __future__ import annotations

if __name__ == '__main__':   # first: a restart here pays for the imports below only once
    from smartiqa_jax import cpu_malloc
    cpu_malloc.reexec_with_tunables()

import argparse
import collections
import concurrent.futures
import csv
import dataclasses
import functools
import glob
import hashlib
import io
import json
import math
import os
import stat
import sys
import tempfile
import time
import warnings
from typing import Any, Iterable, Iterator, Optional, Sequence, TextIO

import numpy as np
from PIL import Image

from smartiqa_jax import compilation_cache, preprocess

# Extensions collected from folders; files named explicitly are tried whatever their name.
# AVIF and HEIC/HEIF where this Pillow reads them (AVIF from Pillow 11; HEIC with the
# pillow-heif plugin registered).
IMAGE_EXTENSIONS = frozenset({
    '.jpg', '.jpeg', '.jpe', '.jfif', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp',
    '.ppm', '.pgm', '.pbm', '.pnm', '.tga', '.ico'} | {
    ext for ext in ('.avif', '.heic', '.heif') if ext in Image.registered_extensions()})
CROP_MODES = ('random', 'grid', 'center')
CROP_SIZE = 224
DEFAULT_CROPS = 20          # SPEC 2 test protocol: 20 crops per image
STAGES = 4
COLUMNS = ['path', 'score'] + [f'weight_stage{i + 1}' for i in range(STAGES)] + ['error']


class UsageError(ValueError):
    """A command-line problem that maps to exit status 2."""


# ----------------------------------------------------------------------------- preprocessing


# How Preprocessing.describe names each `symmetries` above 1.
_AVERAGED = {2: 'with its mirror image', 4: 'over its 4 rotations',
             8: 'over its 4 rotations and their mirror images'}


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How an image file becomes model input.

    resize: preprocess.ResizeSpec applied before cropping: (height, width) squash, an int
      for the shorter side (aspect kept), or None for the decoded size. Images whose
      shorter side ends up below `crop_size` are scaled up to fit a crop.
    crops: crops per image; their scores are averaged.
    crop_mode: 'random' (seeded by `seed` and the file's bytes), 'grid' (evenly spaced,
      edge to edge) or 'center' (one crop).
    max_pixels: images with more pixels are refused (None: PIL's Image.MAX_IMAGE_PIXELS).
    jpeg_aligned: crop offsets 2 past a multiple of 4 (preprocess.jpeg_aligned_offset), as
      in training with `data.jpeg_aligned_crops` (the demo).
    symmetries: each crop is scored as the mean over this many of its symmetries: 1 the
      crop, 2 with its mirror image, 4 its rotations, 8 both (`data.eval_symmetries`).
    """

    resize: preprocess.ResizeSpec = preprocess.KONIQ_RESIZE
    crops: int = DEFAULT_CROPS
    crop_mode: str = 'random'
    seed: int = 0
    crop_size: int = CROP_SIZE
    max_pixels: Optional[int] = None
    jpeg_aligned: bool = False
    symmetries: int = 1

    def __post_init__(self):
        if self.crop_mode not in CROP_MODES:
            raise UsageError(f'crop mode must be one of {", ".join(CROP_MODES)}, got {self.crop_mode!r}')
        if self.crops < 1:
            raise UsageError(f'--crops must be at least 1, got {self.crops}')
        if self.crop_mode == 'center' and self.crops != 1:
            raise UsageError(f"crop mode 'center' gives one crop per image, got --crops {self.crops}")
        if self.seed < 0:
            raise UsageError(f'--seed must be 0 or more, got {self.seed}')
        if self.symmetries not in preprocess.SYMMETRIES:
            raise UsageError(f'--symmetries must be one of '
                             f'{", ".join(map(str, preprocess.SYMMETRIES))}, '
                             f'got {self.symmetries}')

    def describe(self) -> str:
        return (f'resize {format_resize(self.resize)}, {self.crops} {self.crop_mode} crop'
                f'{"s" if self.crops > 1 else ""} of {self.crop_size}'
                + (f' (seed {self.seed})' if self.crop_mode == 'random' else '')
                + (', JPEG-aligned' if self.jpeg_aligned else '')
                + (f', each crop averaged {_AVERAGED[self.symmetries]}'
                   if self.symmetries > 1 else ''))


def parse_resize(text: str) -> preprocess.ResizeSpec:
    """'512x384' (height x width) | 'short:N' | 'none' | 'koniq' -> ResizeSpec."""
    value = text.strip().lower()
    try:
        if value == 'none':
            return None
        if value == 'koniq':
            return preprocess.KONIQ_RESIZE
        if value.startswith('short:'):
            side = int(value.split(':', 1)[1])
            if side < 1:
                raise ValueError
            return side
        height, width = (int(v) for v in value.split('x'))
        if height < 1 or width < 1:
            raise ValueError
        return height, width
    except ValueError:
        raise UsageError(f'--resize {text!r}: expected HEIGHTxWIDTH (e.g. 512x384), '
                         'short:N (shorter side N, aspect kept) or none') from None


def format_resize(resize: preprocess.ResizeSpec) -> str:
    if resize is None:
        return 'none'
    if isinstance(resize, int):
        return f'short:{resize}'
    return f'{resize[0]}x{resize[1]}'


def checkpoint_data_config(checkpoint_dir: str | os.PathLike) -> dict:
    """The `data` part of the training config in a checkpoint's `config` item; {} if none
    (checkpoint.training_config)."""
    from smartiqa_jax import checkpoint
    return checkpoint.training_config(checkpoint_dir).get('data') or {}


def checkpoint_resize(checkpoint_dir: str | os.PathLike) -> tuple[bool, preprocess.ResizeSpec]:
    """The resize a training run used, from the `config` item of its checkpoint.

    Returns (found, resize); (False, None) for a checkpoint without a training config.
    """
    return stored_resize(checkpoint_data_config(checkpoint_dir))


def stored_resize(data: dict) -> tuple[bool, preprocess.ResizeSpec]:
    """checkpoint_resize from the `data` part of a training config already read."""
    if 'resize' not in data:
        return False, None
    value = data['resize']
    # train.py's convention: (h, w) squash; an empty tuple keeps the decoded size.
    if not value:
        return True, None
    if isinstance(value, int):
        return True, value
    return True, (int(value[0]), int(value[1]))


def _swaps_axes(img: Image.Image) -> bool:
    # EXIF orientations 5-8 are transposes: the stored image is the shown one turned 90.
    try:
        return img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
    except Exception:  # a broken EXIF block should not cost the image
        return False


def load_image(data: bytes, prep: Preprocessing, name: str = '<bytes>') -> np.ndarray:
    """Encoded bytes -> uint8 (h, w, 3) RGB at the size `prep.resize` asks for.

    Same pixels as `preprocess.decode_image` + `resize_image` (EXIF rotation, alpha over
    white, 16-bit scaling, bilinear resize), except that images more than twice the
    target size are first reduced cheaply: JPEGs are decoded at 1/2, 1/4 or 1/8 scale
    (PIL `draft`) and other formats are box-reduced by an integer factor before the RGB
    conversion. Both stay at least twice the target, so the final bilinear resize still
    averages over the pixels it replaces.

    Raises ImageDecodeError (message starts with `name`) when the bytes are empty, not an
    image, truncated, in a mode PIL cannot convert, over `prep.max_pixels` (None:
    Image.MAX_IMAGE_PIXELS), or when the resize would make more pixels than the larger of
    the two limits (a thin strip scaled up to the crop size).
    """
    if not data:
        raise preprocess.ImageDecodeError(f'{name}: empty file (0 bytes)')
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise preprocess.ImageDecodeError(f'{name}: refused as a possible decompression bomb '
                                          f'({e}); raise --max-pixels if you trust it') from e
    except Image.UnidentifiedImageError:
        raise preprocess.ImageDecodeError(
            f'{name}: not an image file (PIL recognises no image format in it)') from None
    except Exception as e:
        raise preprocess.ImageDecodeError(
            f'{name}: not a readable image ({type(e).__name__}: {e})') from e
    with img:
        pixels_count = img.width * img.height
        limit = prep.max_pixels if prep.max_pixels is not None else Image.MAX_IMAGE_PIXELS
        if limit and pixels_count > limit:
            raise preprocess.ImageDecodeError(
                f'{name}: {img.width}x{img.height} = {pixels_count} pixels, over the limit of '
                f'{limit} (PIL decompression-bomb guard); raise --max-pixels if you trust it')
        swapped = _swaps_axes(img)
        shown_h, shown_w = (img.width, img.height) if swapped else (img.height, img.width)
        # A --max-pixels below PIL's limit bounds the files read, not what the resize makes.
        target_h, target_w = preprocess.resized_shape(
            shown_h, shown_w, prep.resize, prep.crop_size, name=name,
            max_pixels=max(limit or 0, Image.MAX_IMAGE_PIXELS or 0))
        try:
            # Reduction limits in the stored (unrotated) frame: keep >= 2x the target.
            need_w, need_h = (2 * target_h, 2 * target_w) if swapped else (2 * target_w, 2 * target_h)
            # JPEG (and MPO, phones' JPEG variant) decode at a DCT scale; a no-op elsewhere.
            img.draft(None, (need_w, need_h))
            img.load()
            factor = min(img.width // need_w, img.height // need_h)
            if factor >= 2:
                try:
                    img = img.reduce(factor)
                except ValueError:  # a mode reduce() does not support: convert at full size
                    pass
            pixels = preprocess.to_rgb(img)
        except Exception as e:  # PIL raises many types for bad files
            raise preprocess.ImageDecodeError(
                f'{name}: cannot decode image ({type(e).__name__}: {e})') from e
    if pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise preprocess.ImageDecodeError(f'{name}: image has zero size {pixels.shape[:2]}')
    return preprocess.resize_image(pixels, (target_h, target_w), max_pixels=0)  # checked above


def content_key(data: bytes) -> int:
    """A 64-bit hash of a file's bytes: seeds its random crops independently of its path."""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), 'little')


def crop_offsets(height: int, width: int, prep: Preprocessing, key: int) -> list[tuple[int, int]]:
    """`prep.crops` top-left (y, x) offsets of crop_size windows in a (height, width) image."""
    size = prep.crop_size
    if prep.crop_mode == 'center':
        offsets = [preprocess.center_crop_offset(height, width, size)]
    elif prep.crop_mode == 'grid':
        offsets = preprocess.grid_crop_offsets(height, width, size, prep.crops)
    else:
        rng = np.random.default_rng([prep.seed, key])
        offsets = [preprocess.random_crop_offset(height, width, size, rng)
                   for _ in range(prep.crops)]
    if prep.jpeg_aligned:
        offsets = [preprocess.jpeg_aligned_offset(o, height, width, size) for o in offsets]
    return offsets


def image_crops(pixels: np.ndarray, prep: Preprocessing, key: int) -> np.ndarray:
    """uint8 (h, w, 3) -> float32 (crops, crop_size, crop_size, 3) ImageNet-normalised NHWC."""
    offsets = crop_offsets(pixels.shape[0], pixels.shape[1], prep, key)
    return np.stack([preprocess.normalize(preprocess.crop(pixels, o, prep.crop_size))
                     for o in offsets])


def prepare_file(path: str, prep: Preprocessing) -> np.ndarray:
    """An image file -> float32 (crops, 224, 224, 3); ImageDecodeError naming the file."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):   # reading a pipe would wait forever
            raise preprocess.ImageDecodeError(f'{path}: not a regular file (a pipe, socket '
                                              'or device)')
        with open(path, 'rb') as f:
            data = f.read()
    except FileNotFoundError:
        raise preprocess.ImageDecodeError(f'{path}: no such file') from None
    except IsADirectoryError:
        raise preprocess.ImageDecodeError(f'{path}: is a directory') from None
    except OSError as e:
        raise preprocess.ImageDecodeError(f'{path}: cannot read ({e.strerror or e})') from e
    return image_crops(load_image(data, prep, path), prep, content_key(data))


# ----------------------------------------------------------------------------- inputs


def _is_glob(text: str) -> bool:
    return any(c in text for c in '*?[')


def _folder_images(folder: str, warn: TextIO) -> list[str]:
    """The image files under `folder` (by extension; hidden ones and pipes left out), in
    sorted order, symlinked folders followed once. What it leaves out, and folders it
    cannot read, are warned about."""
    found, seen = [], {os.path.realpath(folder)}
    left_out: collections.Counter = collections.Counter()

    def unreadable(error: OSError) -> None:
        print(f'warning: {error.filename}: cannot read this folder ({error.strerror})',
              file=warn)

    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=True):
        kept = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(root, d))
            if not d.startswith('.') and real not in seen:   # a link loop ends here
                seen.add(real)
                kept.append(d)
        dirs[:] = kept
        for f in sorted(files):
            path = os.path.join(root, f)
            if f.startswith('.'):
                continue
            ext = os.path.splitext(f)[1].lower()
            if ext not in IMAGE_EXTENSIONS:
                left_out[ext or '(no extension)'] += 1
            elif os.path.exists(path) and not os.path.isfile(path):
                left_out['pipes, sockets, devices'] += 1
            else:
                found.append(path)   # a broken link too: its row says so
    if left_out:
        kinds = ', '.join(f'{kind} {n}' for kind, n in left_out.most_common())
        print(f'warning: {folder}: left out {sum(left_out.values())} files that are not '
              f'images by their extension ({kinds}); name a file to score it anyway',
              file=warn)
    return found


def find_inputs(specs: Sequence[str], warn: Optional[TextIO] = None,
                empty: Optional[list] = None) -> list[str]:
    """Files, folders (recursive, image extensions only) and globs -> ordered file list.

    An explicit path that does not exist stays in the list, so its row reports the
    problem; a glob or folder that yields nothing is warned about (and added to `empty`).
    A file reached twice, under any spelling (./a.jpg, a.jpg, a link to it), is kept
    once, as first given.
    """
    warn = warn or sys.stderr
    paths: list[str] = []
    for spec in specs:
        if os.path.isdir(spec):
            found = _folder_images(spec, warn)
            if not found:
                print(f'warning: {spec}: no image files in this folder', file=warn)
        elif os.path.exists(spec) or not _is_glob(spec):
            found = [spec]
        else:
            found = []
            for match in sorted(glob.glob(spec, recursive=True)):
                found.extend(_folder_images(match, warn) if os.path.isdir(match) else [match])
            if not found:
                print(f'warning: {spec}: no files match this pattern', file=warn)
        if not found and empty is not None:
            empty.append(spec)
        paths.extend(found)
    unique: dict[str, str] = {}
    for path in paths:
        unique.setdefault(os.path.realpath(path) if os.path.exists(path) else path, path)
    return list(unique.values())


# ----------------------------------------------------------------------------- the model


_TRACES = [0]  # how often the forward below was traced, i.e. compiled for a new shape


@functools.lru_cache(maxsize=None)
def _jitted_forward():
    import jax
    from flax import nnx

    from smartiqa_jax import sharding
    from smartiqa_jax.models import smartiqa

    def forward(graphdef, mesh, symmetries, state, images):
        _TRACES[0] += 1  # runs only while tracing
        model = nnx.merge(graphdef, state)

        def scores(views):
            out = model(views)
            return out['score'], out['stage_weights']

        with sharding.tracing_mesh(mesh):
            return smartiqa.mean_over_symmetries(scores, images, symmetries)

    # One jitted function for the process, the graph structure (and the mesh, or None)
    # static: scorers of the same model and batch shape (predict, then evaluate on several
    # datasets) share one compiled program. The state is an argument, not a closed-over
    # constant, so XLA does not fold (and copy) the weights into the program.
    return jax.jit(forward, static_argnums=(0, 1, 2))


class Scorer:
    """A model jitted for one batch shape: `batch_images` images x `crops` crops each.

    `scorer(crops)` takes float32 (n, crops, 224, 224, 3) with n <= batch_images, pads to
    the full batch with zeros (the model scores each crop on its own, so padding changes
    no real score), and returns per-image means over the crops as float64 numpy:
    {'score': (n,) on the label scale, 'stage_weights': (n, 4) fractions, or None}.

    With several local devices (GPUs, or a CPU split by `--cpu-devices`) the crops of a
    batch are sharded over all of them when their count divides by the devices', else
    one device scores them; `devices` says which.
    """

    def __init__(self, model, batch_images: int, crops: int, crop_size: int = CROP_SIZE,
                 symmetries: int = 1):
        from flax import nnx

        if batch_images < 1:
            raise UsageError(f'--batch-size must be at least 1, got {batch_images}')
        self.batch_images, self.crops, self.crop_size = batch_images, crops, crop_size
        self.symmetries = symmetries
        self.has_attention = model.config.fusion == 'attention'
        self.config = model.config
        self._graphdef, self._state = nnx.split(nnx.view(model, deterministic=True))
        self._forward = _jitted_forward()
        import jax
        devices = jax.local_devices()
        self._place = lambda batch: batch      # one device: jit takes the host array
        self._mesh = None
        self.devices = 1
        if len(devices) > 1 and batch_images * crops % len(devices) == 0:
            from smartiqa_jax import sharding
            self._mesh = sharding.make_mesh(devices)
            self._state = jax.device_put(self._state, sharding.replicated(self._mesh))
            self._place = functools.partial(jax.device_put,
                                            device=sharding.batch_sharding(self._mesh))
            self.devices = len(devices)

    @property
    def compilations(self) -> int:
        """Programs traced (and compiled) so far by the forward all scorers share."""
        return _TRACES[0]

    def __call__(self, crops: np.ndarray) -> dict[str, Optional[np.ndarray]]:
        n = crops.shape[0]
        if n > self.batch_images or crops.shape[1:] != (self.crops, self.crop_size, self.crop_size, 3):
            raise ValueError(f'expected at most ({self.batch_images}, {self.crops}, '
                             f'{self.crop_size}, {self.crop_size}, 3), got {crops.shape}')
        batch = np.zeros((self.batch_images * self.crops,) + crops.shape[2:], np.float32)
        batch[:n * self.crops] = crops.reshape((-1,) + crops.shape[2:])
        scores, weights = self._forward(self._graphdef, self._mesh, self.symmetries,
                                        self._state, self._place(batch))
        # Crop means on the host in float64: the same sum whatever the batch holds.
        scores = np.asarray(scores, np.float64)[:n * self.crops].reshape(n, self.crops).mean(1)
        if weights is not None:
            weights = np.asarray(weights, np.float64)[:n * self.crops]
            weights = weights.reshape(n, self.crops, -1).mean(1)
        return {'score': scores, 'stage_weights': weights}


@dataclasses.dataclass
class Result:
    """One input's outcome: score (label scale) and stage weights (4,), or an error."""
    path: str
    score: Optional[float] = None
    stage_weights: Optional[np.ndarray] = None
    error: str = ''

    def row(self, missing: Any = '') -> dict[str, Any]:
        """The output row: COLUMNS -> value (`missing` where there is none, and for a
        non-finite score, which comes with an error)."""
        weights = ([missing] * STAGES if self.stage_weights is None
                   else [float(w) for w in self.stage_weights])
        scored = self.score is not None and math.isfinite(self.score)
        row = {'path': self.path, 'score': float(self.score) if scored else missing}
        row.update({f'weight_stage{i + 1}': w for i, w in enumerate(weights)})
        row['error'] = self.error
        return row


def score_files(scorer: Scorer, paths: Sequence[str], prep: Preprocessing, *,
                workers: int = 0) -> Iterator[list[Result]]:
    """Scores `paths` in order; yields the results batch by batch (failures included).

    Decoding runs in `workers` threads (PIL releases the GIL; 0 = min(4, CPUs)) about a
    batch ahead of the model. A batch is yielded after the model scored it, with the
    failed files met since the previous batch, in input order; the last batch is padded.
    """
    if prep.crops != scorer.crops or prep.crop_size != scorer.crop_size:
        raise ValueError(f'scorer built for {scorer.crops} crops of {scorer.crop_size}, '
                         f'preprocessing gives {prep.crops} of {prep.crop_size}')
    workers = workers or min(4, os.cpu_count() or 1)
    # Enough decoded images to fill the next batch while the model runs, no more: each
    # holds its crops as float32 (20 crops: 12 MB).
    lookahead = scorer.batch_images + 2 * workers

    def work(path):
        try:
            return path, prepare_file(path, prep), ''
        except preprocess.ImageDecodeError as e:
            return path, None, str(e).removeprefix(f'{path}: ')
        except Exception as e:  # one file's failure must not stop the run
            detail = f'{type(e).__name__}: {e}' if str(e) else type(e).__name__
            return path, None, f'cannot prepare image ({detail})'

    pending: list[Result] = []
    crops: list[np.ndarray] = []
    slots: list[Result] = []

    def run_batch() -> list[Result]:
        out = scorer(np.stack(crops))
        for i, result in enumerate(slots):
            result.score = score = float(out['score'][i])
            if not np.isfinite(score):   # kept in `score`: evaluate's metrics become NaN
                result.error = (f'the model gave a non-finite score ({score}): the checkpoint '
                                'is diverged or broken')
                continue
            if out['stage_weights'] is not None:
                result.stage_weights = out['stage_weights'][i]
        done = list(pending)
        pending.clear()
        crops.clear()
        slots.clear()
        return done

    pool = concurrent.futures.ThreadPoolExecutor(workers)
    try:
        queue: collections.deque = collections.deque()
        it = iter(paths)
        for path in it:
            queue.append(pool.submit(work, path))
            if len(queue) >= lookahead:
                break
        while queue:
            path, image_crops_, error = queue.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                queue.append(pool.submit(work, nxt))
            result = Result(path, error=error)
            pending.append(result)
            if image_crops_ is not None:
                crops.append(image_crops_)
                slots.append(result)
                if len(crops) == scorer.batch_images:
                    yield run_batch()
        if crops:
            yield run_batch()
        elif pending:
            yield list(pending)
    finally:
        # Not waiting: on Ctrl-C a read that hangs (a stalled network mount) must not
        # hold the command.
        pool.shutdown(wait=False, cancel_futures=True)


# ----------------------------------------------------------------------------- output


class RowWriter:
    """Writes result rows as they come: CSV or JSON Lines appended and flushed per batch,
    or a JSON array rewritten atomically per batch. Opening truncates the file, unless
    `append` (a resumed run: `done_paths` read and repaired the file first).

    File names that are not valid in the file system's encoding (os.fsdecode's surrogate
    escapes) go into CSV as their original bytes (a `stream` is reconfigured to allow
    that) and into JSON as \\u escapes, which json.loads and os.fsencode turn back."""

    def __init__(self, path: Optional[str], stream: Optional[TextIO] = None, *,
                 append: bool = False):
        self.path = path
        self.format = self.output_format(path)
        self.written = 0   # rows written by this writer
        append = append and bool(path) and os.path.exists(path)
        # The JSON array is rewritten whole: it keeps every row, the earlier run's too.
        self._rows: list[dict] = (_read_rows(path, self.format)
                                  if append and self.format == 'json' else [])
        self._restore_errors: Optional[str] = None
        self._file = None
        if self.format == 'json':
            self._rewrite()
        else:
            if path:
                self._file = open(path, 'a' if append else 'w', newline='',
                                  errors='surrogateescape')
            else:
                self._file = stream or sys.stdout
                if (getattr(self._file, 'errors', None) == 'strict'
                        and hasattr(self._file, 'reconfigure')):
                    self._file.reconfigure(errors='surrogateescape')
                    self._restore_errors = 'strict'   # by close(): a notebook's stdout
            if self.format == 'csv':
                self._csv = csv.DictWriter(self._file, COLUMNS)
                if not append:
                    self._csv.writeheader()
                self._file.flush()

    @staticmethod
    def output_format(path: Optional[str]) -> str:
        """'csv' | 'json' | 'jsonl' for an --output path (None: CSV on stdout); UsageError
        for another suffix or a folder that does not exist. Touches nothing."""
        if not path:
            return 'csv'
        if os.path.isdir(path):
            raise UsageError(f'--output {path}: is a folder; give a file name ending in .csv, '
                             '.json or .jsonl')
        suffix = os.path.splitext(path)[1].lower()
        fmt = {'.json': 'json', '.jsonl': 'jsonl', '.csv': 'csv'}.get(suffix)
        if fmt is None:
            raise UsageError(f'--output {path}: the name must end in .csv, .json or .jsonl')
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(directory):
            raise UsageError(f'--output {path}: folder {directory} does not exist')
        return fmt

    @staticmethod
    def check_writable(path: Optional[str]) -> None:
        """UsageError if no file can be made in --output's folder (read-only, /proc, no
        permission): said before the model loads, not after."""
        if not path:
            return
        directory = os.path.dirname(os.path.abspath(path))
        try:
            fd, probe = tempfile.mkstemp(prefix='.scores-probe-', dir=directory)
            os.close(fd)
            os.remove(probe)
            if os.path.exists(path) and not os.access(path, os.W_OK):
                raise PermissionError(13, 'permission denied')
        except OSError as e:
            raise UsageError(f'--output {path}: cannot write there ({e.strerror or e})') from None

    @staticmethod
    def done_paths(path: str) -> list[str]:
        """The paths an earlier run wrote to `path` (for --resume). A row torn by a kill is
        cut off the file first; UsageError if it is not a file of this command."""
        fmt = RowWriter.output_format(path)
        with open(path, 'rb') as f:
            data = f.read()
        whole = data if fmt == 'json' or data.endswith(b'\n') else data[:data.rfind(b'\n') + 1]
        rows = _parse_rows(whole.decode(errors='surrogateescape'), fmt, path)
        if len(whole) < len(data):   # checked to be ours first; the torn row is redone
            with open(path, 'r+b') as f:
                f.truncate(len(whole))
        return [row['path'] for row in rows]

    def _rewrite(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix='.scores-', suffix='.json', dir=directory)
        with os.fdopen(fd, 'w', errors='surrogateescape') as f:
            json.dump(self._rows, f, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only
        os.replace(tmp, self.path)

    def write(self, results: Iterable[Result]) -> None:
        rows = [r.row(missing='' if self.format == 'csv' else None) for r in results]
        self.written += len(rows)
        if self.format == 'json':
            self._rows.extend(rows)
            self._rewrite()
            return
        for row in rows:
            if self.format == 'csv':
                self._csv.writerow(row)
            else:
                self._file.write(json.dumps(row) + '\n')
        self._file.flush()

    def close(self) -> None:
        if self._file is not None and self.path:
            self._file.close()
        elif self._restore_errors:
            self._file.flush()
            self._file.reconfigure(errors=self._restore_errors)


def _read_rows(path: str, fmt: str) -> list[dict]:
    """The rows of a scores file this command wrote (UsageError naming it otherwise)."""
    with open(path, newline='', errors='surrogateescape') as f:
        return _parse_rows(f.read(), fmt, path)


def _parse_rows(text: str, fmt: str, path: str) -> list[dict]:
    problem, rows = None, []
    try:
        if fmt == 'csv':
            reader = csv.DictReader(io.StringIO(text, newline=''))
            rows = list(reader)
            if reader.fieldnames not in (None, COLUMNS):
                problem = f'its header is {reader.fieldnames}, not {COLUMNS}'
        elif fmt == 'jsonl':
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text) if text.strip() else []
    except (ValueError, csv.Error) as e:   # json's errors are ValueErrors
        problem = f'unreadable ({e})'
    if problem is None and not (isinstance(rows, list) and all(
            isinstance(r, dict) and 'path' in r for r in rows)):
        problem = 'its rows have no path'
    if problem:
        raise UsageError(f'--output {path}: not a scores file of this command: {problem}; '
                         'give another --output, or --overwrite to replace it')
    return rows


# ----------------------------------------------------------------------------- command line


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, preprocessing and batching flags shared with evaluate and the scripts."""
    parser.add_argument('--checkpoint', required=True,
                        help='model checkpoint directory, training step directory or workdir, '
                             'or a released SMART-IQA PyTorch state_dict (.pth, .safetensors)')
    parser.add_argument('--crops', type=int, default=None,
                        help=f'crops per image, scores averaged (default {DEFAULT_CROPS}; '
                             '1 for --crop-mode center)')
    parser.add_argument('--crop-mode', default='random', choices=CROP_MODES,
                        help='random (seeded, SPEC 2 test protocol), grid or center; default random')
    parser.add_argument('--seed', type=int, default=0, help='seed of the random crops (default 0)')
    parser.add_argument('--resize', default=None,
                        help="HEIGHTxWIDTH squash, short:N (aspect kept) or none; default: the "
                             "checkpoint's training config, else KonIQ's 512x384")
    parser.add_argument('--jpeg-aligned-crops', action=argparse.BooleanOptionalAction,
                        default=None,
                        help="crop offsets 2 past a multiple of 4, so JPEG block edges fall "
                             "inside the 4x4 patches; default: the checkpoint's training config "
                             "(data.jpeg_aligned_crops, the demo's), else off")
    parser.add_argument('--symmetries', type=int, default=None,
                        choices=preprocess.SYMMETRIES,
                        help='score each crop as the mean over this many of its symmetries: '
                             '1 the crop, 2 with its mirror image, 4 its 90-degree rotations, '
                             "8 both; default: the checkpoint's training config "
                             "(data.eval_symmetries), else 1")
    parser.add_argument('--cpu-devices', type=int, default=0,
                        help='split the CPU into this many JAX devices and shard each batch '
                             'over them (2 on a 2-core CPU: about 1.3x the images/s); '
                             'default 0, one device')
    parser.add_argument('--batch-size', type=int, default=8,
                        help='images per model call (x crops = crops per call); default 8')
    parser.add_argument('--compilation-cache-dir', default=compilation_cache.DEFAULT_DIR,
                        help="JAX's persistent compilation cache: a model compiled before on "
                             "this machine loads instead of compiling ('' turns it off; "
                             f'default {compilation_cache.DEFAULT_DIR})')
    parser.add_argument('--dtype', choices=('float32', 'bfloat16'), default=None,
                        help="compute dtype (default: the checkpoint's)")
    parser.add_argument('--attention', choices=('auto', 'xla', 'pallas', 'cudnn'),
                        default='auto',
                        help='window attention kernel: auto (default: pallas with --dtype '
                             'bfloat16 on an NVIDIA GPU from Ampere on, else xla), xla (any '
                             'device), pallas (GPUs) or cudnn (GPUs, with --dtype bfloat16)')
    parser.add_argument('--workers', type=int, default=0,
                        help='image decoding threads (default min(4, CPUs))')
    parser.add_argument('--max-pixels', type=int, default=None,
                        help=f'refuse images with more pixels (default PIL\'s {Image.MAX_IMAGE_PIXELS})')


def load_for_scoring(args: argparse.Namespace, log: Optional[TextIO] = None):
    """(model, Preprocessing, checkpoint dir) from the flags of `add_model_flags`.

    Raises UsageError for a missing or unusable checkpoint and bad flag combinations.
    """
    from smartiqa_jax import checkpoint, sharding

    if args.workers < 0:
        raise UsageError(f'--workers must be 0 (min(4, CPUs)) or more, got {args.workers}')
    if args.max_pixels is not None and args.max_pixels < 1:
        raise UsageError(f'--max-pixels must be at least 1, got {args.max_pixels}')
    try:   # before anything starts JAX
        sharding.set_cpu_devices(getattr(args, 'cpu_devices', 0))
    except ValueError as e:
        raise UsageError(f'--cpu-devices: {e}') from None
    compilation_cache.enable(getattr(args, 'compilation_cache_dir', None))
    crops = args.crops if args.crops is not None else (1 if args.crop_mode == 'center' else DEFAULT_CROPS)
    if args.resize is not None:
        parse_resize(args.resize)  # a bad value fails before the checkpoint is loaded
    if args.max_pixels is not None and args.max_pixels > (Image.MAX_IMAGE_PIXELS or 0):
        # PIL refuses at open() beyond twice its own limit, before our check could allow it.
        Image.MAX_IMAGE_PIXELS = args.max_pixels
    try:
        directory = checkpoint.resolve(args.checkpoint)   # or a released .pth/.safetensors
    except checkpoint.CheckpointError as e:
        raise UsageError(f'--checkpoint: {e}') from None
    try:   # the checkpoint's training config, where it has one
        trained = checkpoint_data_config(directory)
    except checkpoint.CheckpointError as e:
        raise UsageError(f'--checkpoint {args.checkpoint}: {e}') from None
    if args.resize is None:
        found, stored = stored_resize(trained)
        resize = stored if found else preprocess.KONIQ_RESIZE
        source = 'from the checkpoint\'s training config' if found else 'KonIQ protocol'
    else:
        resize, source = parse_resize(args.resize), 'from --resize'
    jpeg_aligned = args.jpeg_aligned_crops
    if jpeg_aligned is None:
        jpeg_aligned = bool(trained.get('jpeg_aligned_crops', False))
    symmetries = args.symmetries
    if symmetries is None:
        symmetries = trained.get('eval_symmetries', 1)
    prep = Preprocessing(resize=resize, crops=crops, crop_mode=args.crop_mode, seed=args.seed,
                         max_pixels=args.max_pixels, jpeg_aligned=jpeg_aligned,
                         symmetries=symmetries)
    overrides = {'dtype': args.dtype} if args.dtype else {}
    if args.attention != 'auto':
        from smartiqa_jax.models import swin
        try:   # here, not per batch: every file would fail with the same error
            swin.check_attention_backend(args.attention)
        except ValueError as e:
            raise UsageError(f'--attention: {e}') from None
        overrides['attention'] = args.attention
    try:
        model = checkpoint.load(directory, **overrides)
    except (checkpoint.CheckpointError, ValueError, FileNotFoundError) as e:
        raise UsageError(f'--checkpoint {args.checkpoint}: {e}') from None
    c = model.config
    print(f'model: SMART-IQA {c.variant}/{c.fusion} from {directory} ({c.label_name}), '
          f'{c.dtype}, {model.backbone.attention} window attention; {prep.describe()} '
          f'[{source}]', file=log or sys.stderr)
    from smartiqa_jax.models.smartiqa import UNTRAINED_HEAD
    if c.label_name == UNTRAINED_HEAD:
        print('warning: this model\'s head is untrained (convert from-timm): its scores mean '
              'nothing until it is trained', file=log or sys.stderr)
    return model, prep, directory


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m smartiqa_jax.predict', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('inputs', nargs='+', metavar='PATH',
                        help='image files, folders (recursive) or glob patterns')
    add_model_flags(parser)
    parser.add_argument('--output', default=None,
                        help='scores.csv, scores.jsonl or scores.json (default: CSV on stdout); '
                             'an existing file is kept unless --resume or --overwrite')
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument('--resume', action='store_true',
                          help='--output exists: score only the images it does not list yet, '
                               'and add their rows to it')
    existing.add_argument('--overwrite', action='store_true',
                          help='--output exists: replace it')
    parser.add_argument('--no-progress', action='store_true', help='no progress bar')
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]):
    """parse_args that returns (args, None) or (None, exit status) instead of exiting."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse exits 2 on usage errors, 0 after --help
        return None, int(e.code or 0)
    return args, None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 all scored, 1 some failed, 2 usage)."""
    args, status = parse_args(_parser(), argv)
    if args is None:
        return status
    warnings.filterwarnings('ignore', category=Image.DecompressionBombWarning)
    empty: list[str] = []
    try:
        paths = find_inputs(args.inputs, empty=empty)
        if not paths:
            raise UsageError('no input images found in ' + ', '.join(args.inputs))
        # A bad --output fails before the slow load, and nothing written before is lost.
        RowWriter.output_format(args.output)
        exists = bool(args.output) and os.path.exists(args.output)
        if exists and not (args.resume or args.overwrite):
            raise UsageError(f'--output {args.output} exists: --resume scores only the images '
                             'it does not list yet, --overwrite replaces it')
        RowWriter.check_writable(args.output)
        if exists and args.resume:
            done = set(RowWriter.done_paths(args.output))
            todo = [p for p in paths if p not in done]
            print(f'--resume: {len(paths) - len(todo)} of the {len(paths)} images are in '
                  f'{args.output} already; scoring the other {len(todo)}', file=sys.stderr)
            if not todo:
                return 0
            paths = todo
        model, prep, _ = load_for_scoring(args)
        scorer = Scorer(model, args.batch_size, prep.crops, prep.crop_size, prep.symmetries)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    writer = RowWriter(args.output, append=args.resume)
    import tqdm

    start = time.perf_counter()
    scored, failed, total_score = 0, 0, 0.0
    bar = tqdm.tqdm(total=len(paths), unit='img', file=sys.stderr, disable=args.no_progress,
                    dynamic_ncols=True)
    try:
        for results in score_files(scorer, paths, prep, workers=args.workers):
            writer.write(results)
            for r in results:
                if r.error:
                    failed += 1
                    bar.write(f'warning: {r.path}: {r.error}', file=sys.stderr)
                else:
                    scored += 1
                    total_score += r.score
            bar.update(len(results))
    except KeyboardInterrupt:
        interrupted = True
    else:
        interrupted = False
    finally:
        bar.close()
        writer.close()
    if interrupted:
        where = (f'{os.path.abspath(args.output)}; the same command with --resume scores the '
                 'rest' if args.output else 'stdout')
        print(f'interrupted: {writer.written} rows written to {where}', file=sys.stderr)
        return 130
    elapsed = time.perf_counter() - start
    mean = f'{total_score / scored:.3f}' if scored else 'n/a'
    where = f' -> {os.path.abspath(args.output)}' if args.output else ''
    on = f' on {scorer.devices} devices' if scorer.devices > 1 else ''
    print(f'scored {scored} image{"s" if scored != 1 else ""}, failed {failed}; '
          f'mean score {mean}; {elapsed:.1f} s, {scored / max(elapsed, 1e-9):.2f} images/s{on}'
          f'{where}', file=sys.stderr)
    return 1 if failed or empty else 0


if __name__ == '__main__':
    sys.exit(main())

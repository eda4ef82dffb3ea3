"""Training-input throughput: crops/s from KonIQ-like 1024x768 JPEGs.

    python scripts/benchmark_input.py --images 64 --max_workers 2 --batches 20

Writes `--images` JPEGs (scikit-image photos resized to 1024x768, quality
90, like KonIQ's files) to a temp dir, then times the KonIQ training
pipeline (resize to 512x384, random 224 crop, flip, normalise, batch 32)
with and without the decoded-image cache for 0..max_workers grain workers.
Prints one table row per setting; the cache's one-off decode time is shown
separately. Not a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from smartiqa_jax.data import pipeline, readers  # noqa: E402


def write_koniq_like(folder: str, count: int) -> list[readers.Record]:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket(),
              data.immunohistochemistry(), data.hubble_deep_field(), data.retina()]
    rng = np.random.default_rng(0)
    scale = readers.ScoreScale('MOS_zscore', 0.0, 100.0)
    records = []
    for i in range(count):
        img = Image.fromarray(photos[i % len(photos)]).resize((1024, 768), Image.BILINEAR)
        if i // len(photos) % 2:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)  # vary the bytes a little
        path = os.path.join(folder, f'{i:05d}.jpg')
        img.save(path, quality=90)
        score = float(rng.uniform(0, 100))
        records.append(readers.Record(path, score, os.path.basename(path), scale))
    return records


def crops_per_second(records, *, workers: int, cache: bool, batch_size: int,
                     batches: int) -> tuple[float, float]:
    """(crops/s over `batches` batches after 2 warm-up batches, setup seconds)."""
    start = time.perf_counter()
    loader = pipeline.make_train_loader(
        records, batch_size=batch_size, seed=0, patches_per_image=20, worker_count=workers,
        cache=cache, shard_index=0, shard_count=1)
    setup = time.perf_counter() - start
    it = iter(loader)
    for _ in range(2):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    elapsed = time.perf_counter() - start
    assert batch['image'].shape == (batch_size, 224, 224, 3)
    del it
    return batches * batch_size / elapsed, setup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=64)
    parser.add_argument('--max_workers', type=int, default=os.cpu_count() or 1)
    parser.add_argument('--batch_size', type=int, default=32)
    parser.add_argument('--batches', type=int, default=20)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        records = write_koniq_like(folder, args.images)
        print(f'{args.images} JPEGs 1024x768, batch {args.batch_size}, '
              f'{args.batches} timed batches, {os.cpu_count()} CPUs, '
              f'python {platform.python_version()}')
        print(f'{"workers":>7} {"cache":>5} {"crops/s":>8} {"setup s":>8}')
        for cache in (False, True):
            for workers in range(args.max_workers + 1):
                rate, setup = crops_per_second(records, workers=workers, cache=cache,
                                               batch_size=args.batch_size, batches=args.batches)
                used = 'yes' if cache else 'no'
                print(f'{workers:>7} {used:>5} {rate:>8.0f} {setup:>8.1f}', flush=True)


if __name__ == '__main__':  # grain's worker processes re-import this file
    main()

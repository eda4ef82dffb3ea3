"""A run's data: the splits read from disk, the training feed of this process and the
splits scored with the multi-crop protocol (SPEC 2)."""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections
import numpy as np

from smartiqa_jax import sharding
from smartiqa_jax.metrics import quality_metrics
from smartiqa_jax.train_config import ConfigError


class DatasetNotFoundError(RuntimeError):
    """The config's dataset is not on disk; the message says how to get it."""


# How to obtain each dataset, for the message when it is missing.
_HOW_TO_GET = {
    'koniq10k': (
        'KonIQ-10k: download the 1024x768 images (koniq10k_1024x768.zip) and the '
        'metadata from https://database.mmsp-kn.de/koniq-10k-database.html, unzip so '
        'that ROOT/1024x768/*.jpg and ROOT/koniq10k_distributions_sets.csv exist (the '
        'split csv is also in ../shared/data/koniq10k/ beside the repository).'),
    'spaq': (
        'SPAQ: download from https://github.com/h4nwei/SPAQ; ROOT holds the images '
        'folder and "MOS and Image attribute scores.xlsx".'),
    'kadid10k': (
        'KADID-10k: download kadid10k.zip from https://database.mmsp-kn.de/kadid-10k-database.html; '
        'ROOT holds images/ and dmos.csv.'),
    'agiqa3k': (
        'AGIQA-3K: download from https://github.com/lcysyzxdxc/AGIQA-3k-Database; '
        'ROOT holds the images and data.csv.'),
    'csv': 'A CSV + folder dataset: ROOT is the CSV file, images relative to its folder.',
}


def expand_path(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else path


def csv_options(csv: ml_collections.ConfigDict) -> dict[str, Any]:
    """config.data.csv as keyword arguments of data.read_csv_folder ('' / (): its default)."""
    if csv.score_range and len(csv.score_range) != 2:
        raise ConfigError(f'config.data.csv.score_range must be (low, high), got {csv.score_range}')
    return dict(image_column=csv.image_column, score_column=csv.score_column,
                split_column=csv.split_column or None,
                group_column=csv.group_column or None,
                images_dir=expand_path(csv.images_dir) or None,
                score_range=tuple(csv.score_range) or None,
                higher_is_better=csv.higher_is_better)


def load_splits(dataset: str, root: str, *, seed: int = 0,
                csv: ml_collections.ConfigDict | None = None,
                setting: str = 'config.data.root'):
    """Records of every split of `dataset` under `root` (readers in smartiqa_jax.data).

    seed: the seeded split of datasets without an official one (SPAQ, KADID-10k,
    AGIQA-3K, a CSV without a split column); for 'demo', the dataset's own seed.
    csv: config.data.csv, the columns of a 'csv' dataset (`root` is then the CSV);
    None: the reader's defaults, columns image and score (cross-dataset sets).
    setting: the config key that gave `root`, for the message.
    Raises DatasetNotFoundError, naming where it looked and how to get the
    data, when the files are not there.
    """
    from smartiqa_jax import data
    root = expand_path(root)
    if dataset == 'demo':
        return data.load_splits('demo', root, seed)
    options = {} if dataset == 'koniq10k' else {'seed': seed}
    if dataset == 'csv' and csv is not None:
        options.update(csv_options(csv))
    problem = None
    if not root or not os.path.exists(root):
        problem = f'{root or "(empty)"} does not exist'
    else:
        try:
            return data.load_splits(dataset, root, **options)
        except FileNotFoundError as e:
            problem = str(e)
        except data.DataError as e:
            if 'not found' not in str(e):   # there, but unusable: say what is wrong with it
                hint = ''
                if dataset == 'csv' and 'missing column' in str(e):
                    hint = (' (config.data.csv.image_column, score_column, split_column and '
                            'group_column name the columns)' if csv is not None else
                            ' (a CSV given here is read with the columns image and score)')
                raise data.DataError(f'dataset {dataset!r} in {root} ({setting}): {e}{hint}') \
                    from None
            problem = str(e)
    raise DatasetNotFoundError(
        f'Dataset {dataset!r} not found: looked in {root or "(no path)"} '
        f'({setting}): {problem}.\n'
        f'{_HOW_TO_GET.get(dataset, "See the README for the supported datasets.")}\n'
        f'Then pass --config.data.root=ROOT (cross-dataset sets: --config.data.cross_datasets).\n'
        f'configs/demo.py trains on a built-in demo dataset without any download:\n'
        f'  python -m smartiqa_jax.train --config configs/demo.py')


def shard_layout(data_config, global_batch_size: int) -> tuple[int, int]:
    """(shards of the training stream, shards this process reads): config.data.shard_count."""
    processes = jax.process_count()
    shard_count = data_config.shard_count if data_config.shard_count > 0 else processes
    if shard_count % processes:
        raise ConfigError(f'config.data.shard_count {shard_count} must be a multiple of '
                          f'the {processes} processes.')
    if global_batch_size % shard_count:
        raise ConfigError(f'The batch size {global_batch_size} does not divide into '
                          f'{shard_count} data shards.')
    return shard_count, shard_count // processes


class TrainFeed:
    """The training batches this process contributes to each global batch.

    The data stream is cut into `shard_count` shards (config.data.shard_count,
    default: one per process); this process reads its share of them and
    concatenates their batches. So the global batch, and with it the whole
    run, depends on the shard count only, not on how many processes run it:
    one process reading two shards trains exactly as two processes reading
    one each.
    """

    def __init__(self, records, data_config: ml_collections.ConfigDict, *,
                 global_batch_size: int, seed: int):
        from smartiqa_jax.data import as_source, make_decoded_cache, make_train_loader
        index = jax.process_index()
        shard_count, per_process = shard_layout(data_config, global_batch_size)
        source = as_source(records)
        # Every shard samples from the whole split (its fixed share of the patches
        # spans all images; make_train_loader), so each needs every image: one decoded
        # cache per process, shared by its shards, not one each.
        cache = (make_decoded_cache(source, resize=_resize(data_config),
                                    crop_size=data_config.crop_size)
                 if data_config.cache else False)
        self.cache = cache   # also read by the calibration pass over the training split
        self.loaders = [
            make_train_loader(
                source, batch_size=global_batch_size // shard_count, seed=seed,
                patches_per_image=data_config.patches_per_image,
                crop_size=data_config.crop_size, resize=_resize(data_config),
                hflip=data_config.hflip, color_jitter=data_config.color_jitter,
                rotate90=data_config.rotate90, jpeg_aligned_crops=data_config.jpeg_aligned_crops,
                worker_count=data_config.num_workers,
                shard_index=shard, shard_count=shard_count, cache=cache)
            for shard in range(index * per_process, (index + 1) * per_process)]
        self.iterators = [iter(loader) for loader in self.loaders]
        self.batches_per_epoch = self.loaders[0].batches_per_epoch
        self.num_images = self.loaders[0].num_images

    def next(self) -> dict[str, np.ndarray]:
        parts = [next(it) for it in self.iterators]
        return {k: np.concatenate([p[k] for p in parts]) for k in ('image', 'score')}


def limit_records(records: list, count: int) -> list:
    """The first `count` records (every fifth first, to keep the label spread); all if count <= 0."""
    if count <= 0 or count >= len(records):
        return records
    order = list(range(0, len(records), 5)) + [i for i in range(len(records)) if i % 5]
    return [records[i] for i in sorted(order[:count])]


def _resize(data_config) -> Any:
    resize = data_config.resize
    return tuple(resize) if resize else None


class EvalSet:
    """One split scored with the multi-crop protocol (SPEC 2)."""

    def __init__(self, name: str, records, data_config, *, batch_size: int, seed: int,
                 cache: Any = None):
        """cache: a decoded cache of these records to share; None: per data_config.cache."""
        from smartiqa_jax.data import image_scores, make_eval_loader
        self.name = name
        self.loader = make_eval_loader(
            records, global_batch_size=batch_size, crops=data_config.eval_crops,
            crop_mode=data_config.eval_crop_mode, seed=seed,
            crop_size=data_config.crop_size, resize=_resize(data_config),
            jpeg_aligned_crops=data_config.jpeg_aligned_crops,
            worker_count=data_config.num_workers,
            cache=data_config.cache if cache is None else cache)
        self.labels = image_scores(records)

    def evaluate(self, eval_step, params, mesh) -> dict[str, float]:
        """Per-image SRCC/PLCC/KRCC/RMSE after averaging each image's crops.

        Images that failed to decode (no crop) are left out and not counted; a
        non-finite score of an image the model did see makes every metric NaN
        (a diverged model must not win an epoch on the images it still scores).
        """
        per_image, scored = self.predict(eval_step, params, mesh, with_scored=True)
        result = quality_metrics(per_image[scored], self.labels[scored])
        result['images'] = int(scored.sum())
        return result

    def predict(self, eval_step, params, mesh, *, with_scored: bool = False):
        """(n_images,) scores, each the mean of its crops; NaN where an image failed.

        with_scored: also return the (n_images,) bool mask of images with a crop.
        """
        from smartiqa_jax.data import aggregate_crops
        preds, indices, masks = [], [], []
        for batch in self.loader:
            images = sharding.shard_batch({'image': batch['image']}, mesh)['image']
            preds.append(_local_rows(eval_step(params, images)))
            indices.append(batch['index'])
            masks.append(batch['mask'])
        local = [np.concatenate(x) for x in (preds, indices, masks)]
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            local = [np.asarray(multihost_utils.process_allgather(x)).reshape(-1)
                     for x in local]
        per_image = aggregate_crops(local[1], local[0], self.loader.num_images, mask=local[2])
        if not with_scored:
            return per_image
        valid = (local[1] >= 0) & local[2].astype(bool)
        scored = np.bincount(local[1][valid], minlength=self.loader.num_images) > 0
        return per_image, scored


def _local_rows(array: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded global array that this process fed, in order."""
    if jax.process_count() == 1:
        return np.asarray(array)
    shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def train_split_fingerprint(records) -> dict:
    """{'images', 'sha1'} of the training records' names and labels, in order: what a
    resumed run compares (data.root may move; the images and labels may not change)."""
    import hashlib
    digest = hashlib.sha1()
    for r in records:
        digest.update(f'{r.name}\t{r.score!r}\n'.encode('utf-8', 'surrogateescape'))
    return {'images': len(records), 'sha1': digest.hexdigest()}


def check_splits(splits, config) -> None:
    for name in ('train', 'validation', 'test'):
        if not splits[name]:
            raise ConfigError(
                f'the {name} split of {config.data.dataset} in {config.data.root} is empty: '
                'the run trains on train, chooses its epoch on validation and tests on test '
                '(a CSV: check its split column, config.data.csv.split_column)')
    # Before any image is decoded (the decoded cache decodes the whole split first); the
    # trainer checks again with the images that did decode.
    if len(splits['train']) * config.data.patches_per_image < config.train.batch_size:
        raise no_full_batch(len(splits['train']), config)


def no_full_batch(num_images: int, config) -> ConfigError:
    return ConfigError(
        f'an epoch has no full batch: {num_images} training images x '
        f'{config.data.patches_per_image} patches (config.data.patches_per_image) < '
        f'config.train.batch_size {config.train.batch_size}')

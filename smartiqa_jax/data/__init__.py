"""Datasets, TFDS builders, the grain input pipeline and the demo dataset.

    splits = load_splits('koniq10k', '/data/koniq10k')        # prints a summary
    train = make_train_loader(splits['train'], global_batch_size=32, seed=0)
    test = make_eval_loader(splits['test'], batch_size=64, crops=20,
                            crop_mode='random', seed=0)
    per_image = aggregate_crops(indices, predictions, test.num_images)
"""

from smartiqa_jax.data.pipeline import (
    DecodedImageCache, Loader, RecordSource, aggregate_crops, as_source,
    checkpoint_args, image_scores, make_decoded_cache, make_eval_loader, make_train_loader)
from smartiqa_jax.data.quality import DataError, DataReport
from smartiqa_jax.data.readers import (
    READERS, Record, ScoreScale, Splits, read_agiqa3k, read_csv_folder, read_dataset,
    read_kadid10k, read_koniq10k, read_spaq, split_by_fractions)


def load_splits(dataset: str, *args, **kwargs) -> Splits:
    """Reads a dataset (see READERS) and prints what was kept and excluded.

    `dataset` is 'koniq10k' | 'spaq' | 'kadid10k' | 'agiqa3k' | 'csv' | 'demo';
    further arguments go to the reader (for 'demo': ensure_demo_dataset).
    """
    if dataset == 'demo':
        from smartiqa_jax.data import demo
        splits = demo.read_demo(*args, **kwargs)
    else:
        splits = read_dataset(dataset, *args, **kwargs)
    print(splits.report.summary(), flush=True)
    return splits


def load_split(dataset: str, split: str, *args, **kwargs) -> list[Record]:
    """One split's records of `load_splits(dataset, ...)`, e.g. ('koniq10k', 'train', root)."""
    return load_splits(dataset, *args, **kwargs)[split]

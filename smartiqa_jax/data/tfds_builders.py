"""TFDS builders over the readers: array_record files of the original bytes.

Each builder reads the folder the user unpacked (`manual_dir`, nothing is
downloaded) with the matching reader, decodes every image once to exclude
the ones that cannot be decoded (reported, or fatal with strict=True), and
writes the encoded bytes exactly as distributed (no re-encoding) with the
score and file name to array_record shards. No TensorFlow is needed: the
features used here serialise without it, and `open_source` reads back
through `tfds.data_source` with image decoding skipped, so the pipeline
gets the original bytes.

    python -m smartiqa_jax.data.tfds_builders koniq10k \
        --manual_dir /data/koniq10k --data_dir ~/tensorflow_datasets

Examples: {'image': bytes, 'score': float32, 'name': str}. The score scale
(label, low, high, higher_is_better) is in the dataset's metadata.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from smartiqa_jax.data import quality, readers

_VERSION = tfds.core.Version('1.0.0')


class _IqaBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared body: subclasses say how to read `manual_dir` into Splits."""

    VERSION = _VERSION
    RELEASE_NOTES = {'1.0.0': 'Original encoded images, score, file name.'}
    MANUAL_DOWNLOAD_INSTRUCTIONS = 'See the data section of the smartiqa-jax README.'
    # tfds looks for checksum/README files beside the builder's module via
    # `code_path`, which needs the optional importlib_resources package. These
    # builders download nothing, so there is nothing to look for.
    code_path = None

    def __init__(self, *, strict: bool = False, **kwargs):
        self._strict = strict
        self._splits: Optional[readers.Splits] = None
        super().__init__(**kwargs)

    def _read(self, manual_dir: str) -> readers.Splits:
        raise NotImplementedError

    def _scale(self) -> Optional[readers.ScoreScale]:
        """The score scale, known before reading (None: taken from the data)."""
        return None

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                # Stored as the file's bytes; decode with preprocess.decode_image
                # (EXIF, CMYK, 16-bit aware), not with tfds' decoder.
                'image': tfds.features.Image(encoding_format=None),
                'score': tfds.features.Scalar(np.float32),
                'name': tfds.features.Text(),
            }),
            supervised_keys=('image', 'score'),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        splits = self._read(os.fspath(dl_manager.manual_dir))
        self._splits = splits
        print(splits.report.summary(), flush=True)
        records = [r for recs in splits.splits.values() for r in recs]
        scale = records[0].scale
        self.info.metadata.update(dataclasses.asdict(scale))
        self.info.metadata['excluded'] = [dataclasses.asdict(p) for p in splits.report.problems]
        return {name: self._generate_examples(recs) for name, recs in splits.items() if recs}

    def _generate_examples(self, records: Sequence[readers.Record]):
        for r in records:
            # A path makes tfds copy the file's bytes unchanged.
            yield r.name, {'image': r.image, 'score': np.float32(r.score), 'name': r.name}


class SmartiqaKoniq10k(_IqaBuilder):
    """KonIQ-10k, official split; manual_dir holds 1024x768/ and the csvs."""

    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name='mos_zscore', description='MOS_zscore, 0..100'),
        tfds.core.BuilderConfig(name='mos', description='MOS, 1..5'),
    ]

    def _read(self, manual_dir):
        label = {'mos_zscore': 'MOS_zscore', 'mos': 'MOS'}[self.builder_config.name]
        return readers.read_koniq10k(manual_dir, label=label, strict=self._strict,
                                     verify_images=True)


class SmartiqaSpaq(_IqaBuilder):
    """SPAQ, seeded 0.7/0.1/0.2 split (seed 0); manual_dir holds Annotations/, TestImage/."""

    def _read(self, manual_dir):
        return readers.read_spaq(manual_dir, strict=self._strict, verify_images=True)


class SmartiqaKadid10k(_IqaBuilder):
    """KADID-10k, seeded 0.7/0.1/0.2 split by reference; manual_dir holds dmos.csv, images/."""

    def _read(self, manual_dir):
        return readers.read_kadid10k(manual_dir, strict=self._strict, verify_images=True)


class SmartiqaAgiqa3k(_IqaBuilder):
    """AGIQA-3K quality MOS, seeded 0.7/0.1/0.2 split; manual_dir holds data.csv + images."""

    def _read(self, manual_dir):
        return readers.read_agiqa3k(manual_dir, strict=self._strict, verify_images=True)


@dataclasses.dataclass(eq=False)
class CsvFolderConfig(tfds.core.BuilderConfig):
    """How to read a CSV + image folder (see readers.read_csv_folder)."""
    csv_name: str = 'labels.csv'
    images_subdir: str = ''
    image_column: str = 'image'
    score_column: str = 'score'
    split_column: Optional[str] = None
    group_column: Optional[str] = None
    fractions: tuple[float, float, float] = readers.DEFAULT_FRACTIONS
    seed: int = 0
    score_range: Optional[tuple[float, float]] = None
    higher_is_better: bool = True


class SmartiqaCsvFolder(_IqaBuilder):
    """Your own data: manual_dir holds the CSV; give a CsvFolderConfig per dataset."""

    BUILDER_CONFIGS = [CsvFolderConfig(name='default')]

    def _read(self, manual_dir):
        c = self.builder_config
        return readers.read_csv_folder(
            os.path.join(manual_dir, c.csv_name), os.path.join(manual_dir, c.images_subdir),
            image_column=c.image_column, score_column=c.score_column,
            split_column=c.split_column, group_column=c.group_column, fractions=c.fractions,
            seed=c.seed, score_range=c.score_range, higher_is_better=c.higher_is_better,
            strict=self._strict, verify_images=True, dataset=c.name)


BUILDERS = {
    'koniq10k': SmartiqaKoniq10k,
    'spaq': SmartiqaSpaq,
    'kadid10k': SmartiqaKadid10k,
    'agiqa3k': SmartiqaAgiqa3k,
    'csv': SmartiqaCsvFolder,
}


def build(dataset: str, manual_dir: str, data_dir: str, *, config: Any = None,
          strict: bool = False, overwrite: bool = False) -> tfds.core.DatasetBuilder:
    """Builds `dataset` from `manual_dir` into array_record files under `data_dir`.

    `config` is a builder config name ('mos' for KonIQ MOS 1..5) or, for
    'csv', a CsvFolderConfig. A dataset already built there is reused as it is
    (`already_built` tells beforehand), unless `overwrite`: then it is built again,
    e.g. from an edited CSV. Returns the builder; read it with `open_source(builder,
    split)`.
    """
    if dataset not in BUILDERS:
        raise ValueError(f'unknown dataset {dataset!r}; known: {sorted(BUILDERS)}')
    builder = BUILDERS[dataset](data_dir=data_dir, config=config, strict=strict,
                                file_format='array_record')
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        manual_dir=manual_dir, download_mode=mode))
    return builder


def already_built(dataset: str, data_dir: str, *, config: Any = None) -> Optional[str]:
    """The folder of `dataset` (with `config`) already built under `data_dir`, or None."""
    builder = BUILDERS[dataset](data_dir=data_dir, config=config, file_format='array_record')
    done = os.path.isfile(os.path.join(builder.data_dir, 'dataset_info.json'))
    return builder.data_dir if done else None


def open_source(builder_or_dir: Any, split: str) -> Any:
    """A random-access source of one built split: i -> {'image': bytes, 'score', 'name'}.

    `builder_or_dir` is a builder from `build` or the versioned directory it
    wrote (e.g. ~/tensorflow_datasets/smartiqa_koniq10k/mos_zscore/1.0.0).
    Images stay encoded (tfds decoding skipped): the pipeline decodes them.
    """
    if isinstance(builder_or_dir, (str, os.PathLike)):
        builder_or_dir = tfds.builder_from_directory(os.fspath(builder_or_dir))
    return builder_or_dir.as_data_source(
        split=split, decoders={'image': tfds.decode.SkipDecoding()})


def score_scale(builder_or_dir: Any) -> readers.ScoreScale:
    """The ScoreScale stored in a built dataset's metadata."""
    if isinstance(builder_or_dir, (str, os.PathLike)):
        builder_or_dir = tfds.builder_from_directory(os.fspath(builder_or_dir))
    m = builder_or_dir.info.metadata
    return readers.ScoreScale(m['label'], m['low'], m['high'], m['higher_is_better'])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (1, with the problem printed: bad data)."""
    parser = argparse.ArgumentParser(description='Build an IQA dataset as TFDS array_record.')
    parser.add_argument('dataset', choices=sorted(BUILDERS))
    parser.add_argument('--manual_dir', required=True, help='the unpacked dataset folder')
    parser.add_argument('--data_dir', default=os.path.expanduser('~/tensorflow_datasets'))
    parser.add_argument('--config', default=None, help="KonIQ: 'mos_zscore' (default) or 'mos'")
    parser.add_argument('--strict', action='store_true', help='fail on the first bad entry')
    parser.add_argument('--overwrite', action='store_true',
                        help='build again where this dataset is already built (e.g. an edited CSV)')
    csv = parser.add_argument_group('csv', 'your own CSV + image folder (CsvFolderConfig)')
    csv.add_argument('--csv_name', default='labels.csv', help='the CSV file in manual_dir')
    csv.add_argument('--images_subdir', default='',
                     help='image paths are relative to manual_dir/IMAGES_SUBDIR')
    csv.add_argument('--image_column', default='image')
    csv.add_argument('--score_column', default='score')
    csv.add_argument('--split_column', default=None,
                     help='train/validation/test per row; else a seeded split')
    csv.add_argument('--group_column', default=None,
                     help='seeded split: rows with one value stay in one split')
    csv.add_argument('--seed', type=int, default=0, help='seeded split')
    csv.add_argument('--score_range', type=float, nargs=2, metavar=('LOW', 'HIGH'),
                     default=None, help="the scale's ends (default: the scores' min and max)")
    csv.add_argument('--lower_is_better', action='store_true',
                     help='scores are distortion levels (DMOS), not quality')
    csv.add_argument('--name', default=None,
                     help='a name for this dataset (required): its folder under the builder\'s')
    args = parser.parse_args(argv)
    config = args.config
    if args.dataset == 'csv':
        if not args.name:
            parser.error('csv needs --name NAME, a name for this dataset (e.g. --name mydata)')
        config = CsvFolderConfig(
            name=args.name, csv_name=args.csv_name, images_subdir=args.images_subdir,
            image_column=args.image_column, score_column=args.score_column,
            split_column=args.split_column, group_column=args.group_column, seed=args.seed,
            score_range=tuple(args.score_range) if args.score_range else None,
            higher_is_better=not args.lower_is_better)
    try:
        existing = None if args.overwrite else already_built(args.dataset, args.data_dir,
                                                             config=config)
        builder = build(args.dataset, args.manual_dir, args.data_dir, config=config,
                        strict=args.strict, overwrite=args.overwrite)
    except (quality.DataError, FileNotFoundError) as e:
        print(f'tfds_builders: {e}', file=sys.stderr)
        return 1
    except ValueError as e:   # e.g. TFDS refusing a config name it has for another config
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        which = f'--name {args.name}' if args.dataset == 'csv' else f'--config {args.config}'
        print(f'tfds_builders: {args.dataset} ({which}): {first}', file=sys.stderr)
        return 1
    splits = {k: v.num_examples for k, v in builder.info.splits.items()}
    if existing:
        print(f'{builder.name} is already built at {builder.data_dir}: {splits}; reused as it '
              'is (--overwrite builds it again from manual_dir)')
    else:
        print(f'built {builder.name} at {builder.data_dir}: {splits}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Readers for IQA datasets in the layout their authors distribute.

Nothing is downloaded: each reader takes the folder the user unpacked and
returns `Splits`, a mapping 'train' | 'validation' | 'test' -> list of
`Record` (image path, score, score scale), plus a `DataReport` of what was
excluded. KonIQ-10k has an official split; SPAQ, KADID-10k and AGIQA-3K do
not, so they get a seeded split by fractions (KADID by reference image, so
no scene is in two splits). `read_csv_folder` covers users' own data.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import os
from typing import Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from smartiqa_jax.data import quality

log = logging.getLogger(__name__)

SPLITS = ('train', 'validation', 'test')
DEFAULT_FRACTIONS = (0.7, 0.1, 0.2)


@dataclasses.dataclass(frozen=True)
class ScoreScale:
    """Range and direction of a dataset's labels, e.g. KonIQ MOS_zscore 0..100."""
    label: str
    low: float
    high: float
    higher_is_better: bool = True


@dataclasses.dataclass(frozen=True)
class Record:
    """One labelled image.

    image: absolute path of the image file. name: the file as the metadata
    lists it. score: the label on `scale`. group: what must stay within one
    split (KADID reference image, demo source photo); '' = the image itself.
    """
    image: str
    score: float
    name: str
    scale: ScoreScale
    group: str = ''


@dataclasses.dataclass
class Splits:
    """Records per split name, and the report of what the reader excluded."""
    splits: dict[str, list[Record]]
    report: quality.DataReport

    def __getitem__(self, split: str) -> list[Record]:
        if split not in self.splits:
            raise KeyError(f'no split {split!r}; have {sorted(self.splits)}')
        return self.splits[split]

    def __iter__(self):
        return iter(self.splits)

    def __len__(self) -> int:
        return len(self.splits)

    def items(self):
        return self.splits.items()


# --------------------------------------------------------------------------
# Shared machinery: one place for validation and splitting.


# Split names a split column may use besides train / validation / test.
SPLIT_ALIASES = {'training': 'train', 'val': 'validation', 'valid': 'validation',
                 'testing': 'test'}


@dataclasses.dataclass
class _Row:
    name: str
    score: object
    split: Optional[str] = None
    group: str = ''


def split_by_fractions(records: Sequence[Record], fractions: Sequence[float],
                       seed: int) -> dict[str, list[Record]]:
    """Seeded split of whole groups into train/validation/test by `fractions`.

    Groups (Record.group, or the image name when empty) are shuffled with
    `seed` and cut by cumulative count, so a group never spans two splits and
    the same seed always gives the same split. `fractions` are (train,
    validation, test) and must sum to 1; a fraction of 0 gives an empty split.
    """
    split_of = _split_groups({r.group or r.name for r in records}, fractions, seed)
    out = {s: [] for s in SPLITS}
    for r in records:
        out[split_of[r.group or r.name]].append(r)
    return out


def _split_groups(groups: Iterable[str], fractions: Sequence[float], seed: int
                  ) -> dict[str, str]:
    """{group: split} of split_by_fractions."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError('split fractions must be 3 non-negative numbers summing to 1, '
                         f'got {fractions}')
    groups = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(groups))
    bounds = np.round(np.cumsum(fractions) * len(groups)).astype(int)
    return {groups[g]: SPLITS[int(np.searchsorted(bounds, position, side='right'))]
            for position, g in enumerate(order)}


def _assemble(rows: Iterable[_Row], *, dataset: str, images_dir: str,
              scale: ScoreScale, strict: bool, verify_images: bool,
              fractions: Sequence[float], seed: int,
              split_names: Optional[Mapping[str, str]] = None) -> Splits:
    """Validates rows (duplicates, scores, files, optional decode) and splits them.

    Without a split column the seeded split is made from the metadata (every
    listed row with a usable score), before any image file is looked at: a
    missing or undecodable file leaves its own split one image short and moves
    no other image. (The TFDS builders decode every image to check it, the
    trainer does not; both must give the same test set.)
    """
    report = quality.DataReport(dataset, strict=strict)
    scored = []   # (row number, row, score): scores first, so that of a name listed
    for number, row in enumerate(rows, 1):   # twice the row with a usable score is kept
        score, why = quality.parse_score(row.score)
        if score is None:
            report.exclude(row.name, why)
            continue
        scored.append((number, row, score))
    scored = quality.drop_duplicates(scored, lambda e: e[1].name, report, row_of=lambda e: e[0])
    # Split values and their names are matched whatever their case ('Train', 'TEST').
    names = {str(k).strip().lower(): v for k, v in (split_names or {}).items()}
    listed = []   # (row, score, split named by the metadata or None)
    for _, row, score in scored:
        split = None
        if row.split is not None:
            key = str(row.split).strip().lower()
            split = names.get(key, SPLIT_ALIASES.get(key, key))
            if split not in SPLITS:
                report.exclude(row.name, f'unknown split {row.split!r}')
                continue
        listed.append((row, score, split))
    if listed and any(split is None for _, _, split in listed):
        split_of = _split_groups({row.group or row.name for row, _, _ in listed}, fractions, seed)
        listed = [(row, score, split_of[row.group or row.name]) for row, score, _ in listed]
    records, record_split = [], []
    for row, score, split in listed:
        path = os.path.join(images_dir, row.name)
        why = quality.check_file(path)
        if why:
            report.exclude(row.name, f'{why} ({path})')
            continue
        records.append(Record(os.path.abspath(path), score, row.name, scale, row.group))
        record_split.append(split)
    if verify_images and records:
        reasons = quality.find_undecodable([r.image for r in records], [r.name for r in records])
        keep = []
        for r, s, why in zip(records, record_split, reasons):
            if why:
                report.exclude(r.name, why)
            else:
                keep.append((r, s))
        records, record_split = [r for r, _ in keep], [s for _, s in keep]
    if not records:
        raise quality.DataError(
            f'{dataset}: no usable images left in {images_dir}\n{report.summary()}')
    splits = {s: [] for s in SPLITS}
    for r, s in zip(records, record_split):
        splits[s].append(r)
    report.kept = {s: len(v) for s, v in splits.items()}
    log.info('%s', report.summary())
    return Splits(splits, report)


def _find(root: str, candidates: Sequence[str], what: str) -> str:
    """First existing path among root/candidate; DataError naming them all if none."""
    for c in candidates:
        path = os.path.join(root, c)
        if os.path.exists(path):
            return path
    tried = ', '.join(os.path.join(root, c) for c in candidates)
    raise quality.DataError(f'{what} not found; looked for: {tried}')


def _read_csv(path: str, required: Sequence[str]) -> list[dict[str, str]]:
    """CSV rows as dicts; DataError naming the file when a column is missing."""
    if os.path.isdir(path):
        raise quality.DataError(f'{path}: a folder; a CSV file is expected')
    try:
        with open(path, newline='', encoding='utf-8-sig') as f:
            # A short row's missing fields read as '' (an empty score, an empty name:
            # excluded with that reason), not None.
            reader = csv.DictReader(f, restval='')
            header = [h.strip() for h in (reader.fieldnames or [])]
            reader.fieldnames = header
            missing = [c for c in required if c not in header]
            if missing:
                hint = next((f'; the file seems to separate its columns with {name}, and a '
                             'comma-separated file is expected' for sep, name in
                             ((';', 'semicolons'), ('\t', 'tabs'))
                             if len(header) == 1 and sep in header[0]), '')
                raise quality.DataError(
                    f'{path}: missing column(s) {missing}; header is {header}{hint}')
            rows, end = [], reader.line_num
            for row in reader:
                # A stray double quote makes one field of the lines up to the next one.
                if any('\n' in row[c] or '\r' in row[c] for c in required):
                    raise quality.DataError(
                        f'{path}, line {end + 1}: a value runs over lines {end + 1}-'
                        f'{reader.line_num}; an unbalanced double quote (")?')
                rows.append(row)
                end = reader.line_num
            return rows
    except UnicodeDecodeError as e:
        raise quality.DataError(f'{path}: not UTF-8 text ({e}); save the CSV as UTF-8') from None
    except csv.Error as e:
        raise quality.DataError(f'{path}, line {reader.line_num}: {e} (an unbalanced double '
                                'quote (")?)') from None


# --------------------------------------------------------------------------
# KonIQ-10k


KONIQ_SETS_CSV = 'koniq10k_distributions_sets.csv'
KONIQ_SCORES_CSV = 'koniq10k_scores_and_distributions.csv'
KONIQ_SETS = {'training': 'train', 'validation': 'validation', 'test': 'test'}


def read_koniq10k(root: str, *, label: str = 'MOS_zscore',
                  images_dir: Optional[str] = None, metadata_dir: Optional[str] = None,
                  strict: bool = False, verify_images: bool = False) -> Splits:
    """KonIQ-10k with the official split (training 7,058 / validation 1,000 / test 2,015).

    Layout: `root/1024x768/*.jpg` (the images zip) and beside it
    `koniq10k_distributions_sets.csv` (split; from the authors' repository) and,
    for label='MOS', `koniq10k_scores_and_distributions.csv`. The csvs may also
    sit in `root/metadata/`. Labels:
      - 'MOS_zscore' (default, SPEC 2): 0..100, higher is better. The sets csv's
        `MOS` column already holds these values; when the scores csv is there
        its `MOS_zscore` column is used instead (same numbers).
      - 'MOS': the raw 1..5 mean opinion score; only in the scores csv (the
        sets csv's `MOS` is 0..100, so it cannot stand in).
    """
    if label not in ('MOS_zscore', 'MOS'):
        raise ValueError(f"KonIQ label must be 'MOS_zscore' or 'MOS', got {label!r}")
    meta = metadata_dir or root
    meta_dirs = [meta, os.path.join(meta, 'metadata')]
    sets_path = next((os.path.join(d, KONIQ_SETS_CSV) for d in meta_dirs
                      if os.path.exists(os.path.join(d, KONIQ_SETS_CSV))), None)
    scores_path = next((os.path.join(d, KONIQ_SCORES_CSV) for d in meta_dirs
                        if os.path.exists(os.path.join(d, KONIQ_SCORES_CSV))), None)
    if sets_path is None:
        raise quality.DataError(
            f'KonIQ-10k: {KONIQ_SETS_CSV} (the official split) not found in {meta_dirs}; '
            'it is in the KonIQ authors\' repository (metadata/) and in '
            '../shared/data/koniq10k/ beside this one')
    sets = _read_csv(sets_path, ['image_name', 'MOS', 'set'])
    scores = {}
    if scores_path is not None:
        for row in _read_csv(scores_path, ['image_name', 'MOS', 'MOS_zscore']):
            scores[row['image_name'].strip()] = row
    if label == 'MOS' and scores_path is None:
        raise quality.DataError(
            f'KonIQ-10k: label MOS (1..5) needs {KONIQ_SCORES_CSV} in {meta_dirs}; '
            f'the MOS column of {KONIQ_SETS_CSV} is on 0..100 (= MOS_zscore)')

    report_rows = []
    for row in sets:
        name = row['image_name'].strip()
        if scores:
            # The scores csv is authoritative for values; a name it lacks is a bad score.
            value = scores.get(name, {}).get(label)
        else:
            value = row['MOS']
        report_rows.append(_Row(name, value, split=row['set']))
    if images_dir is None:
        images_dir = _find(root, ['1024x768', 'images', '512x384', '.'], 'KonIQ-10k image folder')
        if os.path.basename(images_dir) == '512x384':
            log.warning('%s: the half-size KonIQ-10k release; the protocol (SPEC 2) squashes '
                        'the 1024x768 photos to 512 high x 384 wide, so these are resized '
                        'again from other pixels: use koniq10k_1024x768.zip for the paper\'s '
                        'numbers', images_dir)
    scale = (ScoreScale('MOS_zscore', 0.0, 100.0) if label == 'MOS_zscore'
             else ScoreScale('MOS', 1.0, 5.0))
    return _assemble(report_rows, dataset='KonIQ-10k', images_dir=images_dir, scale=scale,
                     strict=strict, verify_images=verify_images, fractions=DEFAULT_FRACTIONS,
                     seed=0, split_names=KONIQ_SETS)


# --------------------------------------------------------------------------
# SPAQ


SPAQ_XLSX = 'MOS and Image attribute scores.xlsx'


def read_spaq(root: str, *, images_dir: Optional[str] = None,
              fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
              strict: bool = False, verify_images: bool = False) -> Splits:
    """SPAQ: 11,125 smartphone photos, MOS 0..100, seeded split by fractions.

    Layout: `root/Annotations/MOS and Image attribute scores.xlsx` (columns
    `Image name, MOS, ...`) and `root/TestImage/*.jpg`; the xlsx may also sit
    in `root` itself. Images are large (about 4000x3000), so they are resized
    before cropping: a cross-dataset test of a KonIQ-trained model uses the
    checkpoint's own resize (KonIQ's 512x384 squash); training on SPAQ may keep
    the aspect instead (resize=int, e.g. 512).
    """
    import openpyxl  # only SPAQ needs it

    xlsx = _find(root, [os.path.join('Annotations', SPAQ_XLSX), SPAQ_XLSX], 'SPAQ score sheet')
    try:
        book = openpyxl.load_workbook(xlsx, read_only=True, data_only=True)
    except Exception as e:   # zipfile.BadZipFile, KeyError, InvalidFileException...
        raise quality.DataError(f'{xlsx}: not a readable .xlsx workbook '
                                f'({type(e).__name__}: {e})') from None
    try:
        sheet_rows = book.worksheets[0].iter_rows(values_only=True)
        first = next(sheet_rows, None)
        if first is None:
            raise quality.DataError(f'{xlsx}: the first sheet is empty')
        header = [str(h).strip() if h is not None else '' for h in first]
        for col in ('Image name', 'MOS'):
            if col not in header:
                raise quality.DataError(f'{xlsx}: missing column {col!r}; header is {header}')
        i_name, i_mos = header.index('Image name'), header.index('MOS')
        rows = [_Row(str(r[i_name]).strip(), r[i_mos]) for r in sheet_rows
                if r and r[i_name] is not None]
    finally:
        book.close()
    if images_dir is None:
        images_dir = _find(root, ['TestImage', 'images', '.'], 'SPAQ image folder')
    return _assemble(rows, dataset='SPAQ', images_dir=images_dir,
                     scale=ScoreScale('MOS', 0.0, 100.0), strict=strict,
                     verify_images=verify_images, fractions=fractions, seed=seed)


# --------------------------------------------------------------------------
# KADID-10k


def read_kadid10k(root: str, *, images_dir: Optional[str] = None,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                  strict: bool = False, verify_images: bool = False) -> Splits:
    """KADID-10k: 10,125 distorted images of 81 references, seeded split by reference.

    Layout: `root/dmos.csv` (columns `dist_img,ref_img,dmos,var`) and
    `root/images/` holding the distorted and reference PNGs. `dmos` is 1..5 and,
    despite its name, higher is better. Splitting by `ref_img` keeps every
    version of a scene in one split, so test scenes are unseen in training.
    """
    csv_path = _find(root, ['dmos.csv'], 'KADID-10k dmos.csv')
    rows = [_Row(r['dist_img'].strip(), r['dmos'], group=r['ref_img'].strip())
            for r in _read_csv(csv_path, ['dist_img', 'ref_img', 'dmos'])]
    if images_dir is None:
        images_dir = _find(root, ['images', '.'], 'KADID-10k image folder')
    return _assemble(rows, dataset='KADID-10k', images_dir=images_dir,
                     scale=ScoreScale('dmos', 1.0, 5.0), strict=strict,
                     verify_images=verify_images, fractions=fractions, seed=seed)


# --------------------------------------------------------------------------
# AGIQA-3K


def read_agiqa3k(root: str, *, images_dir: Optional[str] = None,
                 fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                 strict: bool = False, verify_images: bool = False) -> Splits:
    """AGIQA-3K: 2,982 AI-generated images, quality MOS (`mos_quality`, about 0..5).

    Layout: `root/data.csv` (columns `name,prompt,adj1,adj2,style,mos_quality,
    std_quality,mos_align,std_align`) and the images in `root/AGIQA-3K/`
    (or `root/images/`, or `root` itself). Seeded split by fractions.
    """
    csv_path = _find(root, ['data.csv'], 'AGIQA-3K data.csv')
    rows = [_Row(r['name'].strip(), r['mos_quality'])
            for r in _read_csv(csv_path, ['name', 'mos_quality'])]
    if images_dir is None:
        images_dir = _find(root, ['AGIQA-3K', 'AGIQA-3k', 'images', '.'], 'AGIQA-3K image folder')
    return _assemble(rows, dataset='AGIQA-3K', images_dir=images_dir,
                     scale=ScoreScale('mos_quality', 0.0, 5.0), strict=strict,
                     verify_images=verify_images, fractions=fractions, seed=seed)


# --------------------------------------------------------------------------
# Users' own data: a CSV and a folder of images.


def read_csv_folder(csv_path: str, images_dir: Optional[str] = None, *,
                    image_column: str = 'image', score_column: str = 'score',
                    split_column: Optional[str] = None,
                    split_names: Optional[Mapping[str, str]] = None,
                    group_column: Optional[str] = None,
                    score_range: Optional[tuple[float, float]] = None,
                    higher_is_better: bool = True,
                    fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
                    strict: bool = False, verify_images: bool = False,
                    dataset: Optional[str] = None) -> Splits:
    """A CSV listing image files (relative to `images_dir`) and their scores.

    images_dir defaults to the CSV's folder. With `split_column` the split
    comes from that column (values train/validation/test, or mapped through
    `split_names`; training, val, valid and testing are understood without it; in
    any case);
    otherwise a seeded split by
    `fractions`, keeping rows with the same `group_column` value together.
    `score_range` (low, high), low < high, defaults to the min/max of the scores read.
    """
    required = [image_column, score_column] + [c for c in (split_column, group_column) if c]
    table = _read_csv(csv_path, required)
    rows = [_Row(r[image_column].strip(), r[score_column],
                 split=r[split_column] if split_column else None,
                 group=r[group_column].strip() if group_column else '') for r in table]
    images_dir = images_dir or os.path.dirname(os.path.abspath(csv_path))
    if score_range is not None:
        try:
            low, high = (float(v) for v in score_range)
        except (TypeError, ValueError):
            raise quality.DataError(f'{csv_path}: score_range must be (low, high), '
                                    f'got {score_range!r}') from None
        if not low < high:
            raise quality.DataError(f'{csv_path}: score_range {score_range!r} must have low < '
                                    'high (higher_is_better gives the direction)')
    if score_range is None:
        values = [v for v in (quality.parse_score(r.score)[0] for r in rows) if v is not None]
        score_range = (min(values), max(values)) if values else (0.0, 1.0)
    scale = ScoreScale(score_column, float(score_range[0]), float(score_range[1]), higher_is_better)
    return _assemble(rows, dataset=dataset or os.path.basename(csv_path), images_dir=images_dir,
                     scale=scale, strict=strict, verify_images=verify_images,
                     fractions=fractions, seed=seed, split_names=split_names)


READERS: dict[str, Callable[..., Splits]] = {
    'koniq10k': read_koniq10k,
    'spaq': read_spaq,
    'kadid10k': read_kadid10k,
    'agiqa3k': read_agiqa3k,
    'csv': read_csv_folder,
}


def read_dataset(name: str, *args, **kwargs) -> Splits:
    """`READERS[name](*args, **kwargs)` with a clear error for unknown names."""
    if name not in READERS:
        raise ValueError(f'unknown dataset {name!r}; known: {sorted(READERS)}')
    return READERS[name](*args, **kwargs)

"""Tests a checkpoint on IQA datasets and prints the paper's Table III (SRCC, PLCC).

  python -m smartiqa_jax.evaluate --checkpoint CKPT --datasets koniq,spaq,kadid,agiqa \
      --data-root /data [--koniq-root DIR --spaq-root DIR ...] [--split test|all] \
      [--crops 20 --crop-mode random --seed 0] [--resize ...] [--output-dir DIR]
  python -m smartiqa_jax.evaluate --checkpoint CKPT --datasets csv --csv-root my/labels.csv \
      --csv-score-column mos [--csv-split-column set] --split all

Each dataset is read with its reader (smartiqa_jax.data: official KonIQ split, seeded
splits for the others). The split tested defaults per dataset (`default_split`): the
held-out test split of the dataset the checkpoint trained on (KonIQ-10k for a released
model), every image of the others, as cross-dataset tests take them; `--split` sets one
for all. Every image is scored exactly
as `smartiqa_jax.predict` scores it (same decode, resize, crops, symmetries, crop
average; resize, JPEG-aligned crops and symmetries default to the checkpoint's), and
SRCC / PLCC / KRCC / RMSE come from scipy.stats on the per-image predictions.

PLCC is the raw Pearson correlation of predictions and labels (no fit), as in the
released code. `plcc_logistic` is PLCC after the customary monotonic 4-parameter
logistic fit of the predictions to the labels; it is labelled as such wherever it
appears. The average is the plain mean over the datasets evaluated.

Dataset roots: `--<name>-root DIR`, or `--data-root DIR` holding one folder per dataset
(e.g. DIR/koniq10k, DIR/spaq, DIR/kadid10k, DIR/agiqa3k; see DATASETS for the names
tried). A dataset that is not found stops the run before the model is loaded, with the
paths that were tried.

Written to --output-dir (default: evaluation/<the --checkpoint's name>, created before
anything is scored): table3.md, table3.csv, results.json and predictions_<dataset>.csv
(one row per image: label, prediction, stage weights, error; each written as soon as
its dataset is scored). Exit status: 0 done (images that could not be
decoded are left out of the metrics and counted), 2 usage or missing data.
"""

from __future__ import annotations

if __name__ == '__main__':   # first: a restart here pays for the imports below only once
    from smartiqa_jax import cpu_malloc
    cpu_malloc.reexec_with_tunables()

import argparse
import collections
import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats

from smartiqa_jax import predict
from smartiqa_jax.predict import UsageError


@dataclasses.dataclass(frozen=True)
class Dataset:
    """reader: smartiqa_jax.data reader name; title: as the paper writes it; folders:
    names tried under --data-root."""
    reader: str
    title: str
    folders: tuple[str, ...]


DATASETS: dict[str, Dataset] = {
    'koniq': Dataset('koniq10k', 'KonIQ-10k', ('koniq10k', 'koniq-10k', 'KonIQ-10k', 'koniq')),
    'spaq': Dataset('spaq', 'SPAQ', ('spaq', 'SPAQ')),
    'kadid': Dataset('kadid10k', 'KADID-10K', ('kadid10k', 'kadid-10k', 'KADID-10k', 'kadid')),
    'agiqa': Dataset('agiqa3k', 'AGIQA-3K', ('agiqa3k', 'agiqa-3k', 'AGIQA-3K', 'AGIQA-3k', 'agiqa')),
    # The user's own: --csv-root FILE and the --csv-* column flags.
    'csv': Dataset('csv', 'CSV', ()),
}
ALIASES = {'koniq10k': 'koniq', 'kadid10k': 'kadid', 'agiqa3k': 'agiqa'}
SPLIT_CHOICES = ('test', 'validation', 'train', 'all')
METRICS = ('srcc', 'plcc', 'plcc_logistic', 'krcc', 'rmse')


# ----------------------------------------------------------------------------- metrics


def logistic_4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """The 4-parameter logistic of VQEG practice: b2 + (b1 - b2) / (1 + exp(-(x - b3) / |b4|))."""
    return b2 + (b1 - b2) * scipy.special.expit((x - b3) / (abs(b4) + 1e-12))


def plcc_after_logistic(pred: np.ndarray, target: np.ndarray) -> float:
    """PLCC between labels and predictions mapped by a least-squares 4-parameter logistic.

    NaN when the fit does not converge or the correlation is undefined.
    """
    pred = np.asarray(pred, np.float64)
    target = np.asarray(target, np.float64)
    if pred.size < 5 or np.ptp(pred) == 0 or np.ptp(target) == 0:
        return float('nan')  # 4 parameters need more points than that to mean anything
    start = [target.max(), target.min(), float(np.median(pred)), float(pred.std())]
    try:
        with warnings.catch_warnings():
            # Only the fitted curve is used, so an inestimable covariance does not matter.
            warnings.simplefilter('ignore', scipy.optimize.OptimizeWarning)
            params, _ = scipy.optimize.curve_fit(logistic_4, pred, target, p0=start, maxfev=20000)
    except (RuntimeError, ValueError):
        return float('nan')
    fitted = logistic_4(pred, *params)
    if np.ptp(fitted) == 0:
        return float('nan')
    # A falling curve (b1 < b2) fits predictions that fall as the labels rise: the
    # correlation then keeps that direction's sign, as SRCC does, instead of reading as
    # a positive PLCC.
    direction = 1.0 if params[0] >= params[1] else -1.0
    return direction * float(scipy.stats.pearsonr(fitted, target)[0])


def dataset_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """SRCC, PLCC (raw), PLCC after the logistic fit, KRCC, RMSE (label units) of (N,) arrays."""
    from smartiqa_jax.metrics import quality_metrics
    values = quality_metrics(pred, target)
    values['plcc_logistic'] = plcc_after_logistic(pred, target)
    return {k: values[k] for k in METRICS}


# ----------------------------------------------------------------------------- data


def dataset_key(name: str) -> str:
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in DATASETS:
        raise UsageError(f'unknown dataset {name!r}; choose from {", ".join(DATASETS)}')
    return key


def find_root(key: str, explicit: Optional[str], data_root: Optional[str]) -> str:
    """The folder of dataset `key`: its --<key>-root, or the first match under --data-root.

    Raises UsageError naming every path that was tried.
    """
    info = DATASETS[key]
    if key == 'csv':
        if explicit and os.path.isfile(explicit):
            return explicit
        raise UsageError('--datasets csv needs --csv-root FILE, a CSV of image paths and '
                         'scores' + (f'; {explicit} is not a file' if explicit else ''))
    if explicit:
        if os.path.isdir(explicit):
            return explicit
        raise UsageError(f'{info.title}: --{key}-root {explicit} is not a folder')
    if not data_root:
        raise UsageError(f'{info.title}: no data folder given; pass --{key}-root DIR or '
                         f'--data-root DIR holding one of {", ".join(info.folders)}')
    tried = [os.path.join(data_root, f) for f in info.folders]
    for path in tried:
        if os.path.isdir(path):
            return path
    raise UsageError(f'{info.title}: not found; looked in {", ".join(tried)} '
                     f'(or pass --{key}-root DIR)')


# read_csv_folder's keyword -> (--csv-* flag's attribute, default when neither the flag
# nor the checkpoint's training run gives it).
CSV_FLAGS = {'image_column': ('csv_image_column', 'image'),
             'score_column': ('csv_score_column', 'score'),
             'split_column': ('csv_split_column', None),
             'group_column': ('csv_group_column', None),
             'images_dir': ('csv_images_dir', None),
             'score_range': ('csv_score_range', None),
             'seed': ('csv_split_seed', 0)}


def csv_options(args: argparse.Namespace, trained: Optional[dict] = None) -> dict:
    """data.read_csv_folder's keyword arguments: the --csv-* flags given, else `trained`'s
    (the CSV settings of the run that trained the checkpoint, `trained_split_options`),
    else the defaults."""
    trained = trained or {}
    options = {}
    for option, (attribute, default) in CSV_FLAGS.items():
        value = getattr(args, attribute)
        options[option] = value if value is not None else trained.get(option, default)
    if isinstance(options['score_range'], str):
        try:
            low, high = (float(v) for v in options['score_range'].split(','))
        except ValueError:
            raise UsageError(f'--csv-score-range takes LOW,HIGH, got {args.csv_score_range!r}') \
                from None
        options['score_range'] = (low, high)
    if 'higher_is_better' in trained:
        options['higher_is_better'] = trained['higher_is_better']
    return options


def trained_split_options(training_config: dict, key: str, root: str) -> Optional[dict]:
    """The split settings of the run that trained the checkpoint, if it trained on dataset
    `key` (for a CSV: one of the same file name): its seed, and a CSV's columns. Testing
    with them keeps the test split the run never trained on. None otherwise.

    A CSV's image folder (csv.images_dir) is taken only when `root` is the very file the
    run trained on: a CSV of the same name elsewhere (moved, or another dataset's
    labels.csv) finds its images beside it, or where --csv-images-dir says."""
    data = training_config.get('data') or {}
    if data.get('dataset') != DATASETS[key].reader:
        return None
    if key == 'koniq':
        return {}   # the official split
    if key != 'csv':
        return {'seed': int(data.get('split_seed') or 0)}
    from smartiqa_jax.train_data import expand_path   # as the trainer read them
    trained_root = str(data.get('root', ''))
    if os.path.basename(trained_root) != os.path.basename(root):
        return None
    same_file = expand_path(trained_root) == expand_path(root)
    csv = data.get('csv') or {}
    options = {'seed': int(data.get('split_seed') or 0)}
    for option in ('image_column', 'score_column', 'split_column', 'group_column',
                   'images_dir', 'score_range', 'higher_is_better'):
        value = csv.get(option)
        if value in (None, '', [], ()) or (option == 'images_dir' and not same_file):
            continue
        options[option] = (tuple(value) if option == 'score_range' else
                           expand_path(value) if option == 'images_dir' else value)
    return options


def default_split(key: str, training_config: dict, trained: Optional[dict]) -> str:
    """The split of dataset `key` tested when --split is not given: 'test' for the dataset
    the checkpoint trained on (`trained`: its split settings, `trained_split_options`; a
    checkpoint without its training config, such as a released model, trained on KonIQ),
    'all' for the others: a cross-dataset test takes the whole dataset, none of which the
    model saw."""
    if not training_config.get('data'):
        return 'test' if DATASETS[key].reader == 'koniq10k' else 'all'
    return 'test' if trained is not None else 'all'


def read_records(key: str, root: str, split: str, options: Optional[dict] = None, *,
                 with_excluded: bool = False):
    """The records (smartiqa_jax.data.Record) of one split, or of all splits for 'all'.

    options: keyword arguments for the reader (the CSV's columns, csv_options).
    with_excluded: also return the entries the reader left out of the whole dataset
    (data.quality.Problem: a missing file, an unusable score), which no split holds.
    """
    from smartiqa_jax import data
    info = DATASETS[key]
    if split == 'all' and options and options.get('split_column'):
        # Every row, whatever its split column says (rows with a value no split is known
        # by would be left out otherwise).
        options = {k: v for k, v in options.items() if k != 'split_column'}
    try:
        splits = data.load_splits(info.reader, root, **(options or {}))
    except (data.DataError, FileNotFoundError) as e:
        raise UsageError(f'{info.title} in {root}: {e}') from None
    if split == 'all':
        records = [r for name in splits for r in splits[name]]
    else:
        records = splits[split]
        if not records:
            raise UsageError(f'{info.title} in {root}: the {split} split is empty')
    return (records, list(splits.report.problems)) if with_excluded else records


# ----------------------------------------------------------------------------- evaluation


def evaluate_records(scorer: predict.Scorer, records, prep: predict.Preprocessing, *,
                     workers: int = 0, progress: bool = True, desc: str = '',
                     predictions: Optional[str] = None) -> dict:
    """Scores `records` and computes the metrics on the images that could be scored.

    predictions: a CSV file (predictions_<dataset>.csv) that gets each image's row as its
    batch finishes, so a run stopped part way keeps what it scored.
    Returns {'n_images', 'n_failed', 'metrics': dataset_metrics(...), 'rows': one dict per
    image (name, path, label, score, weight_stage1..4, error)}.
    """
    import tqdm

    bar = tqdm.tqdm(total=len(records), unit='img', file=sys.stderr, disable=not progress,
                    desc=desc, dynamic_ncols=True)
    rows, pred, target = [], [], []
    # Names as the file system gives them (surrogate escapes written back as their bytes).
    out = (open(predictions, 'w', newline='', errors='surrogateescape') if predictions
           else contextlib.nullcontext())
    with out:
        writer = csv.DictWriter(out, ['name', 'label'] + predict.COLUMNS) if predictions else None
        if writer:
            writer.writeheader()
        paths = [r.image for r in records]
        for batch in predict.score_files(scorer, paths, prep, workers=workers):
            first = len(rows)
            for record, result in zip(records[first:first + len(batch)], batch):
                rows.append({'name': record.name, 'label': record.score, **result.row()})
                if result.error:
                    print(f'warning: {result.path}: {result.error}', file=sys.stderr)
                # Left out only when unscored (not decodable); a NaN score makes the
                # metrics NaN.
                if result.score is not None:
                    pred.append(result.score)
                    target.append(record.score)
            if writer:
                writer.writerows(rows[first:])
                out.flush()
            bar.update(len(batch))
    bar.close()
    metrics = dataset_metrics(np.array(pred), np.array(target))
    return {'n_images': len(pred), 'n_failed': len(records) - len(pred), 'metrics': metrics,
            'rows': rows}


def average(results: dict[str, dict]) -> dict[str, float]:
    """Plain mean of each metric over the datasets (NaN if any dataset's is NaN)."""
    return {m: float(np.mean([r['metrics'][m] for r in results.values()])) for m in METRICS}


def _fmt(value: float, digits: int = 4) -> str:
    return 'n/a' if value is None or not math.isfinite(value) else f'{value:.{digits}f}'


def format_table(results: dict[str, dict], model_name: str, logistic: bool = False) -> str:
    """Markdown in the layout of the paper's Table III: one row per model, SRCC and PLCC per
    dataset and their average. PLCC is raw; with `logistic`, a second row gives PLCC after
    the 4-parameter logistic fit (SRCC does not change under a monotonic fit)."""
    titles = [DATASETS[k].title for k in results] + ['Average']
    header = '| Model | ' + ' | '.join(f'{t} SRCC | {t} PLCC' for t in titles) + ' |'
    rule = '|---|' + '---|---|' * len(titles)
    avg = average(results)
    cells = [(r['metrics']['srcc'], r['metrics']['plcc']) for r in results.values()]
    cells.append((avg['srcc'], avg['plcc']))
    lines = [header, rule,
             f'| {model_name} | ' + ' | '.join(f'{_fmt(s)} | {_fmt(p)}' for s, p in cells) + ' |']
    if logistic:
        cells = [r['metrics']['plcc_logistic'] for r in results.values()] + [avg['plcc_logistic']]
        lines.append(f'| {model_name}, PLCC after 4-parameter logistic fit | '
                     + ' | '.join(f'- | {_fmt(p)}' for p in cells) + ' |')
    return '\n'.join(lines)


def format_details(results: dict[str, dict], splits: dict[str, str]) -> str:
    """Markdown: per dataset the image counts and every metric. 'failed': images of the
    split that did not decode; 'excluded': entries the reader left out of the whole
    dataset (missing files, unusable scores) before any split."""
    lines = ['| Dataset | split | images | failed | excluded | SRCC | PLCC (raw) | '
             'PLCC (logistic) | KRCC | RMSE |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for key, r in results.items():
        m = r['metrics']
        lines.append(f'| {DATASETS[key].title} | {splits[key]} | {r["n_images"]} | '
                     f'{r["n_failed"]} | {r.get("n_excluded", 0)} | '
                     f'{_fmt(m["srcc"])} | {_fmt(m["plcc"])} | {_fmt(m["plcc_logistic"])} | '
                     f'{_fmt(m["krcc"])} | {_fmt(m["rmse"], 3)} |')
    return '\n'.join(lines)


def _nan_to_none(tree):
    # Strict JSON has no NaN; an undefined metric is null.
    if isinstance(tree, dict):
        return {k: _nan_to_none(v) for k, v in tree.items()}
    if isinstance(tree, float) and not math.isfinite(tree):
        return None
    return tree


def output_name(checkpoint_arg: str) -> str:
    """The default output folder's name: the --checkpoint given (a workdir's, a model
    folder's or a file's name; a step folder as <workdir>_step<N>)."""
    path = Path(os.path.abspath(os.path.expanduser(checkpoint_arg)))
    if path.name.isdigit() and path.parent.name == 'checkpoints':
        return f'{path.parent.parent.name}_step{path.name}'
    if path.name == 'model':   # a calibrated run's model/: the run's name
        return path.parent.name
    return path.stem if path.suffix in ('.pth', '.pt', '.safetensors') else path.name


def make_output_dir(out_dir: str) -> None:
    """Creates `out_dir` if needed; UsageError if it cannot be a folder (before any scoring)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise UsageError(f'--output-dir {out_dir}: a file, not a folder')
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:   # a file above it, no permission...
        raise UsageError(f'--output-dir {out_dir}: cannot create the folder '
                         f'({e.strerror or e})') from None


def write_outputs(out_dir: str, results: dict[str, dict], summary: dict, markdown: str) -> None:
    """table3.md, table3.csv (one row per dataset + average) and results.json (the
    predictions_*.csv are written as each dataset is scored, `evaluate_records`)."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, 'table3.md'), 'w') as f:
        f.write(markdown + '\n')
    with open(os.path.join(out_dir, 'table3.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        counts = ('n_images', 'n_failed', 'n_excluded')
        writer.writerow(['dataset', 'split', *counts, *METRICS])
        for key, r in results.items():
            writer.writerow([key, summary['splits'][key], *(r.get(c, 0) for c in counts),
                             *(r['metrics'][m] for m in METRICS)])
        avg = summary['average']
        writer.writerow(['average', '+'.join(dict.fromkeys(summary['splits'].values())),
                         *(sum(r.get(c, 0) for r in results.values()) for c in counts),
                         *(avg[m] for m in METRICS)])
    with open(os.path.join(out_dir, 'results.json'), 'w') as f:
        json.dump(_nan_to_none(summary), f, indent=2)


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='python -m smartiqa_jax.evaluate', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    predict.add_model_flags(parser)
    parser.add_argument('--datasets', default='koniq',
                        help=f'comma-separated, from {",".join(DATASETS)} (default koniq)')
    parser.add_argument('--data-root', default=None, help='folder holding one folder per dataset')
    for key, info in DATASETS.items():
        if key != 'csv':
            parser.add_argument(f'--{key}-root', default=None, help=f'the {info.title} folder')
    csv_flags = parser.add_argument_group(
        'your own data (--datasets csv)',
        'A CSV of image paths and scores. Split values (any case) train|training, '
        'validation|val|valid, test|testing; without a split column, a seeded '
        '0.7/0.1/0.2 split (--split all takes every row).')
    csv_flags.add_argument('--csv-root', default=None, metavar='FILE', help='the CSV file')
    csv_flags.add_argument('--csv-image-column', default=None,
                           help='default: the training run\'s for its CSV, else image')
    csv_flags.add_argument('--csv-score-column', default=None,
                           help='default: the training run\'s for its CSV, else score')
    csv_flags.add_argument('--csv-split-column', default=None)
    csv_flags.add_argument('--csv-group-column', default=None,
                           help='rows with the same value stay in one split (seeded split)')
    csv_flags.add_argument('--csv-images-dir', default=None,
                           help="image paths are relative to it (default: the CSV's folder)")
    csv_flags.add_argument('--csv-score-range', default=None, metavar='LOW,HIGH',
                           help="the labels' scale (default: their min and max)")
    csv_flags.add_argument('--csv-split-seed', type=int, default=None,
                           help='default: the training run\'s for its CSV, else 0')
    parser.add_argument('--split', default=None, choices=SPLIT_CHOICES,
                        help='split to test on, for every dataset (all = every image); default: '
                             'test for the dataset the checkpoint trained on (KonIQ-10k for a '
                             'released model), all for the others (cross-dataset)')
    parser.add_argument('--logistic', action='store_true',
                        help='add a Table III row of PLCC after a 4-parameter logistic fit')
    parser.add_argument('--output-dir', default=None,
                        help='where the tables go (default: evaluation/<the --checkpoint\'s name>)')
    parser.add_argument('--no-progress', action='store_true')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns the exit status (0 done, 2 usage or missing data)."""
    args, status = predict.parse_args(_parser(), argv)
    if args is None:
        return status
    try:
        keys = list(dict.fromkeys(dataset_key(n) for n in args.datasets.split(',') if n.strip()))
        if not keys:
            raise UsageError('--datasets is empty')
        roots = {k: find_root(k, getattr(args, f'{k}_root'), args.data_root) for k in keys}
        try:   # a training workdir's model: its own split settings, where they apply
            from smartiqa_jax import checkpoint
            training_config = checkpoint.training_config(checkpoint.resolve(args.checkpoint))
        except checkpoint.CheckpointError:
            training_config = {}   # load_for_scoring below says what is wrong
        records, excluded, splits = {}, {}, {}
        for k in keys:
            trained = trained_split_options(training_config, k, roots[k])
            splits[k] = args.split or default_split(k, training_config, trained)
            if trained is not None and splits[k] != 'all':
                settings = ', '.join(f'{o}={v!r}' for o, v in trained.items())
                print(f'{DATASETS[k].title}: the {splits[k]} split as the checkpoint\'s '
                      f'training run made it ({settings or "the official split"}; flags '
                      'given override these)', file=sys.stderr)
            options = csv_options(args, trained) if k == 'csv' else trained
            records[k], excluded[k] = read_records(k, roots[k], splits[k], options,
                                                   with_excluded=True)
        if args.output_dir:
            make_output_dir(args.output_dir)   # before the model is loaded
        model, prep, directory = predict.load_for_scoring(args)
        out_dir = args.output_dir or os.path.join('evaluation', output_name(args.checkpoint))
        make_output_dir(out_dir)
        scorer = predict.Scorer(model, args.batch_size, prep.crops, prep.crop_size,
                                prep.symmetries)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    start = time.perf_counter()
    results = {}
    for key in keys:
        results[key] = evaluate_records(
            scorer, records[key], prep, workers=args.workers, progress=not args.no_progress,
            desc=DATASETS[key].title,
            predictions=os.path.join(out_dir, f'predictions_{key}.csv'))
        results[key]['n_excluded'] = len(excluded[key])
        results[key]['excluded'] = dict(collections.Counter(
            p.reason.split(' (')[0] for p in excluded[key]))
    elapsed = time.perf_counter() - start
    c = model.config
    model_name = f'SMART-IQA {c.variant}/{c.fusion}'
    summary = {
        'checkpoint': str(directory), 'model': model_name, 'label': c.label_name,
        'splits': splits, 'preprocessing': prep.describe(),
        'plcc': 'raw Pearson correlation (no fit); plcc_logistic: after a 4-parameter logistic fit',
        'datasets': {k: {'title': DATASETS[k].title, 'root': os.path.abspath(roots[k]),
                         'n_images': r['n_images'], 'n_failed': r['n_failed'],
                         'n_excluded': r['n_excluded'], 'excluded': r['excluded'],
                         **r['metrics']}
                     for k, r in results.items()},
        'average': average(results), 'seconds': round(elapsed, 1),
    }
    tested = ', '.join(f'{DATASETS[k].title} {s}' for k, s in splits.items())
    markdown = (f'{model_name} ({directory}), splits: {tested}; {prep.describe()}. '
                f'PLCC is raw (no logistic fit); Average is the mean over the datasets.\n\n'
                + format_table(results, model_name, args.logistic) + '\n\n'
                + format_details(results, splits))
    write_outputs(out_dir, results, summary, markdown)
    n = sum(r['n_images'] for r in results.values())
    print(markdown)
    print(f'\n{n} images in {elapsed:.1f} s ({n / max(elapsed, 1e-9):.2f} images/s); '
          f'tables in {os.path.abspath(out_dir)}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

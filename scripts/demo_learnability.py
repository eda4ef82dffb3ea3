"""Is the demo dataset learnable across content? A check that needs no network.

    python scripts/demo_learnability.py [--root ~/.cache/smartiqa_jax/demo] [--seed 0]
    python scripts/demo_learnability.py --folder DIR    # any folder with labels.csv

Fits gradient boosting (scikit-learn: `pip install scikit-learn`) on 15
hand-made statistics of each whole training image (sharpness, noise,
JPEG blockiness, flat-pixel fractions, contrast, saturation, colour cast) and
prints the SRCC of its predictions on the validation and test photos, then
per test photo and per distortion. The statistics know nothing of the photo's
content, so a high test SRCC says the labels can be learned from some photos
and carried to others; a low one, that the dataset asks for what no model
could learn from its training photos.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os

import numpy as np
from PIL import Image
from scipy import ndimage, stats

from smartiqa_jax.data import demo

SPLITS = ('train', 'validation', 'test')


def statistics(image: np.ndarray) -> list[float]:
    """15 content-blind quality statistics of a uint8 RGB image."""
    rgb = image.astype(np.float32)
    gray = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    lap = ndimage.laplace(gray)
    gx, gy = np.abs(np.diff(gray, axis=1)), np.abs(np.diff(gray, axis=0))
    # Finest-scale diagonal wavelet band: its median absolute value estimates the noise.
    hh = gray[:-1:2, :-1:2] - gray[1::2, :-1:2] - gray[:-1:2, 1::2] + gray[1::2, 1::2]
    columns = gx.mean(axis=0)
    return [
        gray.std(), gray.mean(),
        np.abs(lap).mean(), np.median(np.abs(lap)),
        gx.mean(), gx.mean() / (gray.std() + 1.0),
        np.median(np.abs(hh)) / 0.6745,
        columns[7::8].mean() / (columns.mean() + 1e-3),      # JPEG 8x8 block edges
        (gx < 0.5).mean(), (gy < 0.5).mean(),                # flat pixels (downsampling)
        (gx < 0.5).mean() * (gy < 0.5).mean(),
        (rgb.max(-1) - rgb.min(-1)).mean(),                  # saturation
        (rgb[..., 0] - rgb[..., 2]).mean(),                  # warm cast
        stats.kurtosis(lap.ravel()),
        np.percentile(np.abs(lap), 90) / (np.percentile(np.abs(lap), 50) + 1.0),
    ]


def main(argv=None) -> dict[str, float]:
    """Prints the report; returns SRCC per split."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--root', default='~/.cache/smartiqa_jax/demo')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--folder', help='a made demo dataset (labels.csv + images/), '
                        'e.g. an older version; default: make or find it under --root')
    args = parser.parse_args(argv)
    try:
        from sklearn.ensemble import GradientBoostingRegressor
    except ImportError:
        raise SystemExit('demo_learnability needs scikit-learn: pip install scikit-learn') from None

    folder = args.folder or demo.ensure_demo_dataset(os.path.expanduser(args.root), args.seed)
    with open(os.path.join(folder, 'labels.csv'), newline='') as f:
        rows = list(csv.DictReader(f))
    features = {s: [] for s in SPLITS}
    labels = {s: [] for s in SPLITS}
    for row in rows:
        with Image.open(os.path.join(folder, row['image'])) as img:
            features[row['split']].append(statistics(np.asarray(img.convert('RGB'))))
        labels[row['split']].append(float(row['score']))
    model = GradientBoostingRegressor(n_estimators=300, max_depth=3, random_state=0)
    model.fit(features['train'], labels['train'])
    print(f'{folder}: gradient boosting on {len(features["train"][0])} statistics')
    result = {}
    for split in SPLITS:
        result[split] = float(stats.spearmanr(model.predict(features[split]), labels[split])[0])
        print(f'  {split:10s} SRCC {result[split]:.3f}  ({len(labels[split])} images)')
    test_rows = [r for r in rows if r['split'] == 'test']
    predictions = model.predict(features['test'])
    for key in ('source', 'distortion'):
        groups = collections.defaultdict(list)
        for row, p in zip(test_rows, predictions):
            groups[row[key]].append((p, float(row['score'])))
        per = ', '.join(f'{name} {stats.spearmanr(*zip(*pairs))[0]:.2f}'
                        for name, pairs in sorted(groups.items()))
        print(f'  test SRCC by {key}: {per}')
    return result


if __name__ == '__main__':
    main()

"""Stage-attention analysis (paper section IV-F, Fig. 6): how much each Swin stage counts.

  python scripts/attention_analysis.py --checkpoint CKPT photo1.jpg photos/ --out attention/
  python scripts/attention_analysis.py --checkpoint CKPT --dataset koniq --root /data/koniq10k \
      --pick lowest,middle,highest --count 3 --out attention/

For each image: the attention-fusion model's four stage weights (softmax over stages,
averaged over the image's crops, shown in percent) and its predicted score; with
--dataset, also the true label. Images from a dataset are picked by their true label:
the `--count` lowest, the ones around the median, and the highest of `--split`.

Writes to --out: stage_weights.csv and stage_weights.json (fractions summing to 1) and
attention.png (each image above a bar chart of its weights). Only models with the
attention fusion have stage weights; others are refused (exit status 2). Preprocessing
and crop flags are those of `smartiqa_jax.predict`.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from typing import Optional, Sequence

import numpy as np

from smartiqa_jax import evaluate, predict
from smartiqa_jax.predict import UsageError

PICKS = ('lowest', 'middle', 'highest')
STAGE_NAMES = [f'Stage {i + 1}' for i in range(predict.STAGES)]


def pick_records(records, picks: Sequence[str], count: int) -> list[tuple[str, object]]:
    """(pick, record) pairs: the `count` records with the lowest / middle / highest labels.

    A record is listed once, under its first pick, when the groups overlap (small splits).
    """
    order = sorted(records, key=lambda r: (r.score, r.name))
    n = len(order)
    count = min(count, n)
    start_of = {'lowest': 0, 'middle': max(0, (n - count) // 2), 'highest': n - count}
    chosen, seen = [], set()
    for pick in picks:
        for record in order[start_of[pick]:start_of[pick] + count]:
            if record.image not in seen:
                seen.add(record.image)
                chosen.append((pick, record))
    return chosen


def plot(items: list[dict], prep: predict.Preprocessing, path: str, title: str,
         cols: int = 4) -> None:
    """attention.png: per image, the picture as the model sees it (resized) over a bar chart
    of its stage weights in percent, titled with the predicted (and true) score; `cols`
    images per row."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    cols = max(1, min(len(items), cols))
    rows = math.ceil(len(items) / cols)
    fig = plt.figure(figsize=(3.2 * cols, 4.6 * rows), layout='constrained')
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=[3, 1.6] * rows)
    for i, item in enumerate(items):
        r, c = divmod(i, cols)
        ax = fig.add_subplot(grid[2 * r, c])
        with open(item['path'], 'rb') as f:
            ax.imshow(predict.load_image(f.read(), prep, item['path']))
        ax.set_axis_off()
        caption = f'predicted {item["score"]:.2f}'
        if item.get('label') is not None:
            caption += f'\ntrue {item["label"]:.2f}'
        if item.get('pick'):
            caption = f'{item["pick"]}: ' + caption
        ax.set_title(f'{os.path.basename(item["path"])}\n{caption}', fontsize=8)
        bars = fig.add_subplot(grid[2 * r + 1, c])
        percent = 100 * np.asarray(item['stage_weights'])
        drawn = bars.bar(range(len(percent)), percent, color=['#4c72b0', '#55a868', '#c44e52', '#8172b2'])
        bars.bar_label(drawn, fmt='%.1f', fontsize=7)
        bars.set_xticks(range(len(percent)), [s.replace('Stage ', 'S') for s in STAGE_NAMES], fontsize=7)
        bars.set_ylim(0, max(100 / len(percent) * 1.6, percent.max() * 1.25))
        bars.set_ylabel('weight (%)', fontsize=7)
        bars.tick_params(axis='y', labelsize=7)
    fig.suptitle(title, fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_tables(items: list[dict], out_dir: str) -> None:
    columns = ['path', 'pick', 'label', 'score'] + [f'weight_stage{i + 1}' for i in range(predict.STAGES)]
    with open(os.path.join(out_dir, 'stage_weights.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for it in items:
            writer.writerow([it['path'], it.get('pick') or '',
                             '' if it.get('label') is None else it['label'], it['score'],
                             *[float(w) for w in it['stage_weights']]])
    with open(os.path.join(out_dir, 'stage_weights.json'), 'w') as f:
        json.dump([{**it, 'stage_weights': [float(w) for w in it['stage_weights']]}
                   for it in items], f, indent=1)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='scripts/attention_analysis.py', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('images', nargs='*', metavar='IMAGE',
                        help='image files, folders or globs (or use --dataset)')
    predict.add_model_flags(parser)
    parser.add_argument('--dataset', default=None,
                        help=f'pick images from a dataset: {", ".join(evaluate.DATASETS)}')
    parser.add_argument('--root', default=None, help='the dataset folder')
    parser.add_argument('--split', default='test', choices=evaluate.SPLIT_CHOICES)
    parser.add_argument('--pick', default='lowest,middle,highest',
                        help='comma-separated groups by true label (default all three)')
    parser.add_argument('--count', type=int, default=2, help='images per group (default 2)')
    parser.add_argument('--out', required=True, help='output folder')
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args, status = predict.parse_args(_parser(), argv)
    if args is None:
        return status
    try:
        if bool(args.images) == bool(args.dataset):
            raise UsageError('give either IMAGE paths or --dataset NAME --root DIR')
        if args.dataset:
            key = evaluate.dataset_key(args.dataset)
            if not args.root:
                raise UsageError('--dataset needs --root DIR (the dataset folder)')
            picks = [p.strip() for p in args.pick.split(',') if p.strip()]
            unknown = set(picks) - set(PICKS)
            if unknown or not picks:
                raise UsageError(f'--pick {args.pick!r}: choose from {",".join(PICKS)}')
            if args.count < 1:
                raise UsageError('--count must be at least 1')
            records = evaluate.read_records(key, evaluate.find_root(key, args.root, None), args.split)
            chosen = pick_records(records, picks, args.count)
            paths = [r.image for _, r in chosen]
            extra = [{'pick': p, 'label': float(r.score)} for p, r in chosen]
        else:
            paths = predict.find_inputs(args.images)
            if not paths:
                raise UsageError('no input images found in ' + ', '.join(args.images))
            extra = [{'pick': None, 'label': None} for _ in paths]
        model, prep, directory = predict.load_for_scoring(args)
        if model.config.fusion != 'attention':
            raise UsageError(f'{directory}: this model uses fusion {model.config.fusion!r}; only '
                             "the 'attention' fusion (the full SMART-IQA) has stage weights")
        scorer = predict.Scorer(model, args.batch_size, prep.crops, prep.crop_size,
                                prep.symmetries)
    except UsageError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    items, failed = [], 0
    results = [r for batch in predict.score_files(scorer, paths, prep, workers=args.workers)
               for r in batch]
    for result, more in zip(results, extra):
        if result.error:
            failed += 1
            print(f'warning: {result.path}: {result.error}', file=sys.stderr)
            continue
        items.append({'path': result.path, **more, 'score': result.score,
                      'stage_weights': result.stage_weights})
    if not items:
        print('error: no image could be scored', file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    write_tables(items, args.out)
    c = model.config
    plot(items, prep, os.path.join(args.out, 'attention.png'),
         f'Stage attention of SMART-IQA {c.variant} ({os.path.basename(str(directory))}); '
         f'{prep.describe()}', cols=args.count if args.dataset else 4)
    mean = 100 * np.mean([it['stage_weights'] for it in items], axis=0)
    print(f'{len(items)} images; mean stage weights '
          + ', '.join(f'{s} {m:.1f}%' for s, m in zip(STAGE_NAMES, mean))
          + f'; wrote stage_weights.csv, stage_weights.json, attention.png to {os.path.abspath(args.out)}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())

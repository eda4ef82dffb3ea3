"""Small on-disk datasets in the exact layouts of SPEC 3, shared by the data tests.

No tests here: helpers that write images and metadata into a tmp_path.
"""

from __future__ import annotations

import csv
import os

import numpy as np
from PIL import Image


def write_image(path: str, size=(60, 80), seed: int = 0, mode: str = 'RGB', fmt=None) -> str:
    """A random-texture image of (height, width) `size` saved at `path`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[0], size[1], 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    if mode != 'RGB':
        img = img.convert(mode)
    img.save(path, fmt)
    return path


def write_csv(path: str, header, rows) -> str:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def make_koniq(root: str, n: int = 9, with_scores_csv: bool = True) -> list[str]:
    """KonIQ layout: 1024x768/*.jpg, the sets csv (MOS 0..100) and the scores csv."""
    names = [f'{1000 + i}.jpg' for i in range(n)]
    sets = ['training', 'validation', 'test']
    set_rows, score_rows = [], []
    for i, name in enumerate(names):
        write_image(os.path.join(root, '1024x768', name), seed=i)
        zscore, mos = 10.0 * i, 1.0 + 0.4 * i
        c = [0.0, 0.1, 0.2, 0.3, 0.4]
        set_rows.append([name, *c, 100, zscore, 0.5, sets[i % 3]])
        score_rows.append([name, *c, 100, mos, 0.5, zscore])
    write_csv(os.path.join(root, 'koniq10k_distributions_sets.csv'),
              ['image_name', 'c1', 'c2', 'c3', 'c4', 'c5', 'c_total', 'MOS', 'SD', 'set'], set_rows)
    if with_scores_csv:
        header = ['image_name', 'c1', 'c2', 'c3', 'c4', 'c5', 'c_total', 'MOS', 'SD', 'MOS_zscore']
        write_csv(os.path.join(root, 'koniq10k_scores_and_distributions.csv'), header, score_rows)
    return names


def make_spaq(root: str, n: int = 20) -> list[str]:
    """SPAQ layout: Annotations/MOS and Image attribute scores.xlsx, TestImage/*.jpg."""
    import openpyxl

    names = [f'{i:05d}.jpg' for i in range(1, n + 1)]
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(['Image name', 'MOS', 'Brightness', 'Colorfulness', 'Contrast', 'Noisiness',
                  'Sharpness'])
    for i, name in enumerate(names):
        write_image(os.path.join(root, 'TestImage', name), seed=i)
        sheet.append([name, 5.0 * i, 50, 50, 50, 50, 50])
    os.makedirs(os.path.join(root, 'Annotations'), exist_ok=True)
    book.save(os.path.join(root, 'Annotations', 'MOS and Image attribute scores.xlsx'))
    return names


def make_kadid(root: str, refs: int = 10, per_ref: int = 3) -> list[str]:
    """KADID layout: dmos.csv (dist_img,ref_img,dmos,var) and images/ with refs."""
    rows = []
    for r in range(1, refs + 1):
        ref = f'I{r:02d}.png'
        write_image(os.path.join(root, 'images', ref), seed=100 + r)
        for d in range(1, per_ref + 1):
            name = f'I{r:02d}_{d:02d}_01.png'
            write_image(os.path.join(root, 'images', name), seed=1000 * r + d)
            rows.append([name, ref, 1.0 + 0.1 * d + 0.01 * r, 0.2])
    write_csv(os.path.join(root, 'dmos.csv'), ['dist_img', 'ref_img', 'dmos', 'var'], rows)
    return [row[0] for row in rows]


def make_agiqa(root: str, n: int = 20) -> list[str]:
    """AGIQA-3K layout: data.csv and the images in AGIQA-3K/."""
    rows = []
    for i in range(n):
        name = f'AttnGAN_normal_{i:03d}.jpg'
        write_image(os.path.join(root, 'AGIQA-3K', name), seed=i)
        rows.append([name, f'a prompt {i}', 'adj', '', 'baroque', 0.2 * i, 0.5, 3.0, 0.5])
    write_csv(os.path.join(root, 'data.csv'),
              ['name', 'prompt', 'adj1', 'adj2', 'style', 'mos_quality', 'std_quality',
               'mos_align', 'std_align'], rows)
    return [row[0] for row in rows]


def make_csv_folder(root: str, n: int = 12, size=(60, 80), with_split: bool = False,
                    score_of=lambda i: float(i)) -> str:
    """Generic layout: labels.csv (image,score[,split]) and images/*.png; returns the csv."""
    rows = []
    for i in range(n):
        name = f'images/img{i:03d}.png'
        write_image(os.path.join(root, name), size=size, seed=i)
        row = [name, score_of(i)]
        if with_split:
            row.append(['train', 'validation', 'test'][i % 3])
        rows.append(row)
    header = ['image', 'score'] + (['split'] if with_split else [])
    return write_csv(os.path.join(root, 'labels.csv'), header, rows)

"""A small synthetic IQA dataset made on first use from photos that installed packages ship.

Sources: the natural photographs inside scikit-image, and matplotlib's
grace_hopper.jpg (no download), cut into up to four 240x320 regions each.
Every region appears pristine and with six distortions at five levels (31
images). The label is a pseudo-MOS on 0..100, higher is better:

    loss = WEIGHT[type] * SEVERITY[level]     (pristine: PRISTINE_LOSS = 0.05)
    mos  = clip(100 * (1 - loss) + N(0, 1.5), 0, 100)

with SEVERITY = 0.12, 0.27, 0.43, 0.60, 0.78 for levels 1..5 and WEIGHT
from 0.75 (colour) to 1.0 (blur, JPEG); the normal term is seeded per image
and stands in for rater disagreement: it is independent of content. Why not a
full-reference metric: SSIM against the pristine region depends so much on
content (noise barely moves SSIM on busy texture, a lot on sky) that a model
trained from scratch on a handful of photos ranked unseen photos backwards
(SRCC -0.3). A label that is the same function of the distortion on every
photo can be learned from some photos and transferred to others.

That rule holds only where the distortions can be seen: a level-5 blur of a
region with no fine detail looks like the pristine one, yet is labelled 22.
So regions are chosen by fine detail (`detail`: the mean absolute difference,
in gray levels, between a region and its Gaussian blur of sigma 1.5), from the
photo and from the photo scaled to 3/4 (more distinct content, and finer
texture), most detailed first, and only those with detail >= MIN_DETAIL.
Three photos have no such region and are left out: clock (1.0), moon (1.7)
and retina (2.5 at best, even scaled down), smooth images on which blur and
downsampling are nearly invisible. (Version 1 kept them and ranked regions by
pixel standard deviation; hand-made features with gradient boosting, a check
of learnability that needs no network (scripts/demo_learnability.py), ranked
its unseen test photos at SRCC 0.66, and retina's images among themselves at
0.44; on this version they reach 0.88.)

Splits are by source photo (all regions of a photo in one split), so the
validation and test photos are never seen in training. The files use the
generic CSV + folder layout, read by `readers.read_csv_folder`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from smartiqa_jax.data import readers

DEMO_VERSION = 2
TILE = (240, 320)                # (height, width) of every demo image
SEVERITY = (0.12, 0.27, 0.43, 0.60, 0.78)   # quality loss at levels 1..5
PRISTINE_LOSS = 0.05             # pristine regions get MOS about 95
RATER_NOISE = 1.5                # std of the label noise, MOS points
STORE_QUALITY = 95               # JPEG quality of the stored files
MIN_DETAIL = 3.0                 # least fine detail (gray levels, see `detail`) of a region
REGION_SCALES = (1.0, 0.75)      # the photo's scales that regions are cut from


def _photos() -> dict[str, np.ndarray]:
    """Natural photos bundled with scikit-image (no pooch download) and matplotlib, uint8 RGB.

    Left out: synthetic or document images (colorwheel, logo, page, text,
    horse), tiny ones (microaneurysms), and those that need a download.
    stereo_motorcycle's two views are one scene, so only the left is used;
    chelsea and cat are the same photo.
    """
    from matplotlib import cbook
    from skimage import data

    loaders: dict[str, Callable[[], np.ndarray]] = {
        'astronaut': data.astronaut, 'coffee': data.coffee, 'chelsea': data.chelsea,
        'rocket': data.rocket, 'immunohistochemistry': data.immunohistochemistry,
        'hubble_deep_field': data.hubble_deep_field, 'retina': data.retina,
        'motorcycle': lambda: data.stereo_motorcycle()[0],
        'camera': data.camera, 'coins': data.coins, 'moon': data.moon,
        'clock': data.clock, 'grass': data.grass, 'gravel': data.gravel, 'brick': data.brick,
        'grace_hopper': lambda: np.asarray(Image.open(
            cbook.get_sample_data('grace_hopper.jpg', asfileobj=False)).convert('RGB')),
    }
    photos = {}
    for name, load in loaders.items():
        image = np.asarray(load())
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        photos[name] = image[:, :, :3].astype(np.uint8)
    return photos


def detail(region: np.ndarray) -> float:
    """Fine detail of a uint8 RGB region: mean |gray - Gaussian blur (sigma 1.5) of gray|."""
    gray = region.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return float(np.abs(gray - ndimage.gaussian_filter(gray, 1.5)).mean())


def _windows(photo: np.ndarray) -> list[np.ndarray]:
    """The non-overlapping TILE windows of a photo, centred as a grid."""
    th, tw = TILE
    h, w = photo.shape[:2]
    rows, cols = h // th, w // tw
    y0, x0 = (h - rows * th) // 2, (w - cols * tw) // 2
    return [photo[y0 + r * th:y0 + (r + 1) * th, x0 + c * tw:x0 + (c + 1) * tw]
            for r in range(rows) for c in range(cols)]


def _regions(photo: np.ndarray, count: int) -> list[np.ndarray]:
    """Up to `count` TILE windows with detail >= MIN_DETAIL, the most detailed first.

    Candidates are the non-overlapping windows of the photo at each of
    REGION_SCALES (Lanczos-resized; a scale that leaves the photo smaller than
    a tile is skipped). Ties keep the order scale, then row-major position.
    """
    th, tw = TILE
    h, w = photo.shape[:2]
    candidates = []
    for scale in REGION_SCALES:
        size = (int(round(w * scale)), int(round(h * scale)))
        if size[0] < tw or size[1] < th:
            continue
        scaled = photo if scale == 1.0 else np.asarray(
            Image.fromarray(photo).resize(size, Image.LANCZOS))
        candidates += _windows(scaled)
    scored = [(detail(x), i) for i, x in enumerate(candidates)]
    order = sorted((i for d, i in scored if d >= MIN_DETAIL), key=lambda i: (-scored[i][0], i))
    return [candidates[i] for i in order[:count]]


# Distortions: (image uint8 HxWx3, level 1..5, rng) -> uint8 image, or for
# JPEG the encoded bytes (stored as they are, so the artefacts are exact).

def _blur(x, level, rng):
    sigma = (0.8, 1.5, 2.5, 4.0, 6.0)[level - 1]
    return ndimage.gaussian_filter(x.astype(np.float32), (sigma, sigma, 0))


def _noise(x, level, rng):
    std = (6, 12, 20, 32, 50)[level - 1]
    return x.astype(np.float32) + rng.normal(0.0, std, x.shape)


def _jpeg(x, level, rng):
    buf = io.BytesIO()
    Image.fromarray(x).save(buf, 'JPEG', quality=(40, 20, 10, 6, 3)[level - 1])
    return buf.getvalue()


def _contrast(x, level, rng):
    keep = (0.75, 0.55, 0.40, 0.28, 0.18)[level - 1]
    x = x.astype(np.float32)
    return x.mean() + keep * (x - x.mean())


def _colour(x, level, rng):
    # Desaturation plus a warm cast, so gray sources are distorted too.
    amount = (0.3, 0.5, 0.7, 0.85, 1.0)[level - 1]
    cast = np.array([1.0, 0.35, -1.0], np.float32) * (12, 24, 40, 60, 85)[level - 1]
    x = x.astype(np.float32)
    gray = x @ np.array([0.299, 0.587, 0.114], np.float32)
    return (1 - amount) * x + amount * gray[:, :, None] + cast


def _downsample(x, level, rng):
    factor = (2, 3, 4, 6, 8)[level - 1]
    h, w = x.shape[:2]
    small = Image.fromarray(x).resize((w // factor, h // factor), Image.BILINEAR)
    return np.asarray(small.resize((w, h), Image.NEAREST))


DISTORTIONS = {
    'blur': _blur, 'noise': _noise, 'jpeg': _jpeg,
    'contrast': _contrast, 'colour': _colour, 'downsample': _downsample,
}
# Per-type calibration: how much of SEVERITY a type's level costs. Contrast
# and colour changes look milder than blur/JPEG at the same level.
WEIGHT = {'blur': 1.0, 'noise': 0.95, 'jpeg': 1.0, 'contrast': 0.8,
          'colour': 0.75, 'downsample': 0.9}


def pseudo_mos(distortion: Optional[str], level: int, rng: np.random.Generator) -> float:
    """The demo label, 0..100 higher is better (module docstring has the rule)."""
    loss = PRISTINE_LOSS if distortion is None else WEIGHT[distortion] * SEVERITY[level - 1]
    return float(np.clip(100.0 * (1.0 - loss) + rng.normal(0.0, RATER_NOISE), 0.0, 100.0))


def _encode(image) -> bytes:
    if isinstance(image, bytes):
        return image
    pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, 'JPEG', quality=STORE_QUALITY)
    return buf.getvalue()


def _params(seed, regions_per_photo, fractions) -> dict:
    return {'version': DEMO_VERSION, 'seed': seed, 'regions_per_photo': regions_per_photo,
            'fractions': list(fractions), 'tile': list(TILE), 'min_detail': MIN_DETAIL,
            'scales': list(REGION_SCALES)}


def ensure_demo_dataset(root: str, seed: int = 0, *, regions_per_photo: int = 4,
                        fractions: Sequence[float] = (0.6, 0.2, 0.2)) -> str:
    """Creates the demo dataset under `root` unless it is already there; returns its folder.

    The folder holds `labels.csv` (columns image, score, split, source,
    distortion, level) and `images/*.jpg` (240 high x 320 wide). Same
    arguments -> the same files, byte for byte; other arguments -> another
    folder, so both can coexist. With the defaults: 13 photos, 34 regions,
    31 versions each (1054 images, 31 MB) in a few seconds. Safe against
    concurrent callers: it is written to a temporary folder and renamed into
    place.
    """
    params = _params(seed, regions_per_photo, fractions)
    key = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    path = os.path.join(root, f'demo_v{DEMO_VERSION}_seed{seed}_{key}')
    if os.path.exists(os.path.join(path, 'labels.csv')):
        return path
    os.makedirs(root, exist_ok=True)
    _remove_abandoned_builds(root)
    tmp = tempfile.mkdtemp(prefix=TMP_PREFIX, dir=root)
    try:
        _generate(tmp, seed, regions_per_photo, fractions)
        with open(os.path.join(tmp, 'params.json'), 'w') as f:
            json.dump(params, f, indent=1)
        # mkdtemp makes the folder its creator's alone; the dataset is for anyone who
        # may read `root` (a shared data folder, a container of another user).
        umask = os.umask(0)
        os.umask(umask)
        for folder, _, _ in os.walk(tmp):
            os.chmod(folder, 0o777 & ~umask)
        try:
            os.rename(tmp, path)
        except OSError:  # another process finished first, or a broken folder is in the way
            if not os.path.exists(os.path.join(path, 'labels.csv')):
                raise OSError(f'{path} exists but holds no labels.csv (an interrupted '
                              'removal?): delete that folder and run again') from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


TMP_PREFIX = '.demo_tmp_'


def _remove_abandoned_builds(root: str, older_than_s: float = 3600.0) -> None:
    """Removes the temporary folders of builds killed before their cleanup (a build takes
    seconds; one older than an hour is nobody's)."""
    import time
    for name in os.listdir(root):
        folder = os.path.join(root, name)
        try:
            stale = (name.startswith(TMP_PREFIX) and os.path.isdir(folder)
                     and time.time() - os.path.getmtime(folder) > older_than_s)
        except OSError:   # removed by another process meanwhile
            continue
        if stale:
            shutil.rmtree(folder, ignore_errors=True)


def _generate(out: str, seed: int, regions_per_photo: int, fractions: Sequence[float]) -> None:
    os.makedirs(os.path.join(out, 'images'))
    photos = _photos()
    regions = {name: _regions(photo, regions_per_photo) for name, photo in photos.items()}
    names = sorted(name for name in photos if regions[name])   # photos with enough detail
    # Split by photo: the same seeded group split the readers use.
    stub = [readers.Record('', 0.0, n, readers.ScoreScale('mos', 0, 100), n) for n in names]
    split_of = {r.name: s for s, recs in readers.split_by_fractions(stub, fractions, seed).items()
                for r in recs}
    rows = []
    for photo_id, name in enumerate(names):
        for region_id, region in enumerate(regions[name]):
            versions = [(None, 0)] + [(d, lvl) for d in DISTORTIONS for lvl in range(1, 6)]
            for version_id, (distortion, level) in enumerate(versions):
                # One generator per image, keyed by what it is, not by loop order.
                rng = np.random.default_rng([seed, photo_id, region_id, version_id])
                if distortion is None:
                    image = region
                else:
                    image = DISTORTIONS[distortion](region, level, rng)
                tag = 'pristine' if distortion is None else f'{distortion}{level}'
                file_name = f'{name}_r{region_id}_{tag}.jpg'
                with open(os.path.join(out, 'images', file_name), 'wb') as f:
                    f.write(_encode(image))
                rows.append((f'images/{file_name}', f'{pseudo_mos(distortion, level, rng):.2f}',
                             split_of[name], name, distortion or 'none', level))
    with open(os.path.join(out, 'labels.csv'), 'w', newline='') as f:
        writer = csv.writer(f)
        writer.writerow(['image', 'score', 'split', 'source', 'distortion', 'level'])
        writer.writerows(rows)


def read_demo(root: str, seed: int = 0, **kwargs) -> readers.Splits:
    """ensure_demo_dataset(root, seed, **kwargs) read as Splits (scores 0..100)."""
    path = ensure_demo_dataset(root, seed, **kwargs)
    return readers.read_csv_folder(
        os.path.join(path, 'labels.csv'), path, split_column='split', group_column='source',
        score_range=(0.0, 100.0), dataset='demo')


if __name__ == '__main__':
    import sys
    print(ensure_demo_dataset(sys.argv[1] if len(sys.argv) > 1 else 'demo_data'))

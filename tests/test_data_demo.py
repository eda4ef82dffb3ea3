"""The demo dataset: deterministic, split by source photo, learnable labels."""

import csv
import hashlib
import importlib.util
import os

import numpy as np
import pytest

from smartiqa_jax.data import demo

# Photos with at least one region of enough detail: the 16 shipped ones
# less clock, moon and retina.
PHOTOS = 13


def digest(folder: str) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(os.path.join(folder, 'images'))):
        h.update(name.encode())
        with open(os.path.join(folder, 'images', name), 'rb') as f:
            h.update(f.read())
    with open(os.path.join(folder, 'labels.csv'), 'rb') as f:
        h.update(f.read())
    return h.hexdigest()


def rows(folder: str) -> list[dict]:
    with open(os.path.join(folder, 'labels.csv'), newline='') as f:
        return list(csv.DictReader(f))


def test_demo_is_deterministic_idempotent_and_split_by_photo(tmp_path):
    a = demo.ensure_demo_dataset(str(tmp_path / 'a'), seed=0, regions_per_photo=1)
    b = demo.ensure_demo_dataset(str(tmp_path / 'b'), seed=0, regions_per_photo=1)
    assert digest(a) == digest(b)
    mtime = os.path.getmtime(os.path.join(a, 'labels.csv'))
    assert demo.ensure_demo_dataset(str(tmp_path / 'a'), seed=0, regions_per_photo=1) == a
    assert os.path.getmtime(os.path.join(a, 'labels.csv')) == mtime  # not regenerated

    table = rows(a)
    assert len(table) == PHOTOS * 31
    sources = {s: {r['source'] for r in table if r['split'] == s}
               for s in ('train', 'validation', 'test')}
    assert all(sources.values())
    assert not sources['train'] & sources['validation']
    assert not sources['train'] & sources['test']
    assert not sources['validation'] & sources['test']
    scores = np.array([float(r['score']) for r in table])
    assert 0 <= scores.min() and scores.max() <= 100

    # The label follows the distortion level the same way on every photo.
    levels = np.array([int(r['level']) for r in table])
    means = [scores[levels == lvl].mean() for lvl in range(6)]
    assert all(x > y + 5 for x, y in zip(means, means[1:]))

    other = demo.ensure_demo_dataset(str(tmp_path / 'a'), seed=1, regions_per_photo=1)
    assert other != a and digest(other) != digest(a)


def test_demo_folder_is_for_every_reader_and_broken_builds_are_named_or_cleared(tmp_path):
    umask = os.umask(0o022)
    try:
        path = demo.ensure_demo_dataset(str(tmp_path), seed=0, regions_per_photo=1)
    finally:
        os.umask(umask)
    for folder in (path, os.path.join(path, 'images')):
        assert os.stat(folder).st_mode & 0o777 == 0o755, folder   # not mkdtemp's 0700
    # A build killed an hour ago left its temporary folder: the next build clears it.
    stale = tmp_path / (demo.TMP_PREFIX + 'killed')
    stale.mkdir()
    os.utime(stale, (0, 0))
    os.remove(os.path.join(path, 'labels.csv'))    # and a half-removed dataset
    with pytest.raises(OSError, match=f'{path} exists but holds no labels.csv .* delete that '
                                      'folder'):
        demo.ensure_demo_dataset(str(tmp_path), seed=0, regions_per_photo=1)
    assert not stale.exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(demo.TMP_PREFIX)]


def test_read_demo_gives_splits_with_0_100_scale(tmp_path):
    splits = demo.read_demo(str(tmp_path), regions_per_photo=1)
    assert not splits.report.problems
    assert sum(len(v) for v in splits.splits.values()) == PHOTOS * 31
    r = splits['test'][0]
    assert (r.scale.low, r.scale.high, r.scale.higher_is_better) == (0.0, 100.0, True)
    from PIL import Image
    with Image.open(r.image) as img:
        assert img.size == (320, 240)


def test_regions_are_detailed_enough_for_every_distortion_to_show():
    photos = demo._photos()
    kept = {name: demo._regions(photo, 4) for name, photo in photos.items()}
    assert sorted(name for name, regions in kept.items() if not regions) == [
        'clock', 'moon', 'retina']
    assert sum(len(r) for r in kept.values()) == 34
    for regions in kept.values():
        details = [demo.detail(r) for r in regions]
        assert all(d >= demo.MIN_DETAIL for d in details)
        assert details == sorted(details, reverse=True)
        assert all(r.shape == (*demo.TILE, 3) and r.dtype == np.uint8 for r in regions)
    # Level 1 blur changes every kept region measurably: detail falls by 20% or more.
    rng = np.random.default_rng(0)
    for regions in kept.values():
        for r in regions:
            blurred = np.clip(np.round(demo._blur(r, 1, rng)), 0, 255).astype(np.uint8)
            assert demo.detail(blurred) < 0.8 * demo.detail(r)


def test_labels_are_learnable_across_photos_by_content_blind_statistics(tmp_path, capsys):
    """scripts/demo_learnability.py on the default dataset: what the README states."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        'scripts', 'demo_learnability.py')
    spec = importlib.util.spec_from_file_location('demo_learnability', path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    srcc = script.main(['--root', str(tmp_path)])
    assert srcc['train'] > 0.98
    assert srcc['validation'] > 0.8 and srcc['test'] > 0.85
    assert 'test SRCC by source: brick' in capsys.readouterr().out
